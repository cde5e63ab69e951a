"""Running a model over a corpus and collecting routing statistics, the token-level view,
routing consistency, expert similarity, training dynamics, and each layer's FFN inputs
(what upcycling, composition, pruning and merging fit to).

Everything hooks the :class:`moekit.MoE` modules of the model (so any model holding them
works, a Hugging Face checkpoint loaded by moekit included) and keeps running sums only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.analysis.stats import LayerAccumulator, LayerStats
from moekit.layers.moe import MoE


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """``(layer index, MoE module)`` of every MoE in ``model``: block indices for a
    :class:`moekit.models.Transformer`, else the order the modules appear in."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        found = [(i, b.ffn) for i, b in enumerate(blocks) if isinstance(getattr(b, "ffn", None), MoE)]
        if found:
            return found
    return list(enumerate(m for m in model.modules() if isinstance(m, MoE)))


class _Recorder:
    """Forward hooks that keep each MoE layer's last output."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no MoE layer to analyse")
        self.outputs: dict[int, object] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in self.layers]

    def _hook(self, layer: int):
        def hook(module, args, output):
            self.outputs[layer] = output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model: nn.Module, tokens: torch.Tensor) -> None:
    device = next(model.parameters()).device
    model(tokens.to(device))


@torch.no_grad()
def routing_stats(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    label_names: list[str] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[LayerStats]:
    """Statistics of every MoE layer over ``batches`` of ``(tokens [B, S], labels [B, S] or None)``.

    ``labels`` index ``label_names``; with them each layer gets a label x expert table and a
    specialisation score. ``progress`` shows a tqdm bar (``total`` batches when known).
    """
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    accs = {i: LayerAccumulator(i, m.config.num_experts, m.config.top_k, label_names) for i, m in rec.layers}
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, total=total, desc="routing", unit="batch", dynamic_ncols=True)
    try:
        for tokens, labels in it:
            rec.outputs.clear()
            _forward(model, tokens)
            for i, _ in rec.layers:
                out = rec.outputs[i]
                r = out.routing
                accs[i].add(r.indices, r.probs, r.logits, r.mask,
                            None if labels is None else labels.reshape(-1), out.stats.tokens_per_expert)
    finally:
        rec.close()
        model.train(was_training)
    return [accs[i].finish() for i, _ in rec.layers]


@torch.no_grad()
def token_routes(model: nn.Module, tokens: torch.Tensor) -> dict[int, list[list[int]]]:
    """Which experts each token of ``tokens`` ``[S]`` went to: ``{layer: [[e1, e2], ...]}``."""
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    try:
        _forward(model, tokens.reshape(1, -1))
        return {i: rec.outputs[i].routing.indices.tolist() for i, _ in rec.layers}
    finally:
        rec.close()
        model.train(was_training)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of tokens with the same top-1 expert, with the same set of k experts)."""
    top1 = float((a[:, 0] == b[:, 0]).float().mean())
    same_set = float((a.sort(-1).values == b.sort(-1).values).all(-1).float().mean())
    return top1, same_set


@torch.no_grad()
def jitter_consistency(model: nn.Module, batches: Iterable[torch.Tensor], jitter: float = 0.01,
                       seed: int = 0) -> dict[int, dict[str, float]]:
    """How often each token's routing survives multiplicative router-input jitter
    ``U(1-j, 1+j)``: per layer, the fraction of tokens keeping their top-1 expert and their
    whole set of experts."""
    rec = _Recorder(model)
    was_training = model.training
    model.eval()
    jitter_on = [False]

    def jitter_input(module, args):  # the router's input times U(1-j, 1+j), only when switched on
        if not jitter_on[0]:
            return None
        x = args[0]
        return (x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter), *args[1:])

    hooks = [m.router.register_forward_pre_hook(jitter_input) for _, m in rec.layers]
    sums: dict[int, list[float]] = {i: [0.0, 0.0, 0] for i, _ in rec.layers}
    torch.manual_seed(seed)
    try:
        for tokens in batches:
            routes = []
            for on in (False, True):
                jitter_on[0] = on
                rec.outputs.clear()
                _forward(model, tokens)
                routes.append({i: rec.outputs[i].routing.indices for i, _ in rec.layers})
            for i, _ in rec.layers:
                top1, same = _agreement(routes[0][i], routes[1][i])
                n = routes[0][i].shape[0]
                sums[i][0] += top1 * n
                sums[i][1] += same * n
                sums[i][2] += n
    finally:
        for h in hooks:
            h.remove()
        rec.close()
        model.train(was_training)
    return {i: {"top1_kept": s[0] / max(s[2], 1), "set_kept": s[1] / max(s[2], 1)} for i, s in sums.items()}


@torch.no_grad()
def checkpoint_consistency(model_a: nn.Module, model_b: nn.Module,
                           batches: Iterable[torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per layer, the fraction of tokens that two models (e.g. two checkpoints of one run)
    send to the same top-1 expert and to the same set of experts."""
    recs = [_Recorder(model_a), _Recorder(model_b)]
    modes = [model_a.training, model_b.training]
    model_a.eval()
    model_b.eval()
    sums: dict[int, list[float]] = {}
    try:
        for tokens in batches:
            for rec, model in zip(recs, (model_a, model_b)):
                rec.outputs.clear()
                _forward(model, tokens)
            for i, _ in recs[0].layers:
                a, b = recs[0].outputs[i].routing.indices, recs[1].outputs[i].routing.indices
                top1, same = _agreement(a, b)
                s = sums.setdefault(i, [0.0, 0.0, 0])
                s[0] += top1 * a.shape[0]
                s[1] += same * a.shape[0]
                s[2] += a.shape[0]
    finally:
        for rec in recs:
            rec.close()
        model_a.train(modes[0])
        model_b.train(modes[1])
    return {i: {"top1_kept": s[0] / max(s[2], 1), "set_kept": s[1] / max(s[2], 1)} for i, s in sums.items()}


@torch.no_grad()
def expert_similarity(moe: MoE) -> torch.Tensor:
    """``[E, E]`` cosine similarity between the experts' flattened weights (values near 1
    mark redundant experts)."""
    experts = moe.experts
    if hasattr(experts, "weights"):
        flat = torch.cat([w.detach().reshape(w.shape[0], -1).float() for w in experts.weights()], dim=1)  # [E, P]
    else:  # arbitrary modules
        flat = torch.stack([torch.cat([p.detach().reshape(-1).float() for p in m.parameters()])
                            for m in experts.experts])
    flat = F.normalize(flat, dim=1)
    return flat @ flat.t()


def training_dynamics(metrics_path: str | Path) -> dict:
    """From a run's ``metrics.jsonl``: per logged step, each MoE layer's max/mean load, the
    entropy of its load distribution (log E = uniform) and, when logged, its mean router
    entropy per token. Returns ``{"steps": [...], "layers": {i: {"max_over_mean": [...],
    "load_entropy": [...], "router_entropy": [...]}}}``."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: training dynamics need the run's metrics.jsonl")
    steps, layers = [], {}
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc})") from None
        loads = rec.get("tokens_per_expert")
        if not loads:
            continue
        steps.append(rec["step"])
        entropies = rec.get("router_entropy") or [None] * len(loads)
        for i, (load, ent) in enumerate(zip(loads, entropies)):
            t = torch.tensor(load, dtype=torch.float64)
            mean = float(t.mean())
            p = t / t.sum() if t.sum() > 0 else t
            d = layers.setdefault(i, {"max_over_mean": [], "load_entropy": [], "router_entropy": []})
            d["max_over_mean"].append(float(t.max()) / mean if mean > 0 else 0.0)
            d["load_entropy"].append(float(-(p[p > 0] * p[p > 0].log()).sum()))
            d["router_entropy"].append(ent)
    return {"steps": steps, "layers": layers}


def windows(stream: torch.Tensor, labels: torch.Tensor | None, seq_len: int, batch_size: int,
            max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Consecutive ``[batch, seq_len]`` windows of a token stream (and its labels), at most
    ``max_tokens`` tokens; the last partial window is dropped."""
    n = stream.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        toks = torch.stack([stream[r * seq_len:(r + 1) * seq_len] for r in rows])
        labs = None if labels is None else torch.stack([labels[r * seq_len:(r + 1) * seq_len] for r in rows])
        yield toks.long(), labs


@torch.no_grad()
def ffn_inputs(model: nn.Module, tokens: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Each layer's feed-forward input (after its norm) on ``tokens`` ``[B, S]``:
    one ``[B*S, d_model]`` float32 tensor per layer."""
    if tokens.dim() != 2:
        raise ValueError(f"calibration tokens must be [batch, seq] ids, got shape {tuple(tokens.shape)}")
    captured: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [block.ffn_norm.register_forward_hook(
        lambda _m, _i, out, i=i: captured[i].append(out.reshape(-1, out.shape[-1]).float()))
        for i, block in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, tokens.shape[0], batch):
            model(tokens[start:start + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [torch.cat(c) for c in captured]
