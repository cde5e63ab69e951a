"""A classic Mixture of Experts (Jacobs et al. 1991) on scikit-learn's bundled digits.

Four small MLP experts and a learned router, trained two ways, against a single expert of
the same size (equal compute per input when the router picks one expert):

- "combine then loss": the router mixes the experts' outputs and one loss is taken;
- "mixture loss": each expert is judged on its own output and the gate weights the losses
  (``moekit.expert_weighted_loss``), the original objective that makes experts compete.

Runs offline in a few seconds:  python examples/classic_moe_digits.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from moekit import MoE, expert_weighted_loss


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def data(seed: int):
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(Xtr, torch.float32), t(ytr, torch.long), t(Xte, torch.float32), t(yte, torch.long)


def train(model: nn.Module, X, y, epochs: int, objective: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        if isinstance(model, MoE):
            out = model(X, return_expert_outputs=objective == "mixture")
            if objective == "mixture":
                per_expert = F.cross_entropy(
                    out.expert_outputs.flatten(0, 1), y.repeat_interleave(out.expert_outputs.shape[1]), reduction="none"
                ).view_as(out.routing.weights)  # [T*k] -> [T, k]
                loss = expert_weighted_loss(out.routing.weights, per_expert, out.expert_mask)
            else:
                loss = F.cross_entropy(out.output, y)
            loss = loss + out.aux_loss
        else:
            loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, X, y) -> float:
    model.eval()
    logits = model(X).output if isinstance(model, MoE) else model(X)
    return (logits.argmax(-1) == y).float().mean().item()


def run(epochs: int = 300, hidden: int = 4, num_experts: int = 4, seed: int = 0) -> dict[str, float]:
    Xtr, ytr, Xte, yte = data(seed)
    scores = {}
    torch.manual_seed(seed)
    single = mlp(hidden)
    train(single, Xtr, ytr, epochs, "combine")
    scores["single expert"] = accuracy(single, Xte, yte)
    for objective in ("combine", "mixture"):
        torch.manual_seed(seed)
        moe = MoE.from_experts(
            [mlp(hidden) for _ in range(num_experts)], d_model=64, router="topk", top_k=1,
            renormalize=False, aux_loss_coef=0.01,
        )
        train(moe, Xtr, ytr, epochs, objective)
        name = "MoE, combine then loss" if objective == "combine" else "MoE, mixture loss (Jacobs 1991)"
        scores[name] = accuracy(moe, Xte, yte)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=4, help="hidden width of every expert")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    scores = run(a.epochs, a.hidden, a.experts, a.seed)
    print(f"digits, test accuracy ({a.experts} experts of hidden width {a.hidden}, top-1 routing):")
    for name, acc in scores.items():
        print(f"  {name:<34} {acc:.3f}")


if __name__ == "__main__":
    main()
