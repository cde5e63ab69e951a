"""Expert merging (after MC-SMoE, ICLR 2024): fold each MoE layer's experts into ``into``
groups and average each group into one expert.

Per layer, on calibration text:

1. **Group**: the ``into`` most used experts are the groups' centres; every other expert
   joins the centre whose outputs on the calibration rows are most alike (cosine).
2. **Align**: a member's hidden units are matched to its centre's (the permutation that
   maximises the correlation of their activations, solved exactly with
   ``scipy.optimize.linear_sum_assignment``), and its gate, up and down weights permuted
   to match: a SwiGLU FFN computes the same function under any permutation of its hidden
   units, so only the alignment of what is averaged changes.
3. **Average**: each group's aligned weights, weighted by how often each expert was chosen.

The merged expert keeps its centre's router row. Merging experts that are identical (an
upcycled model's copies) is exact with renormalised top-k weights; in general the function
changes, which ``benchmarks/shrink.py`` measures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.models import Transformer
from moekit.shrink.prune import PRUNABLE_ROUTERS, expert_scores


def _hidden(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s hidden activations ``silu(x w1) * (x w3)`` ``[M, f]``."""
    return torch.nn.functional.silu(x @ experts.w1[e]) * (x @ experts.w3[e])


def align(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` of ``other``'s hidden units (columns, ``[M, f]``) that best
    matches ``reference``'s: ``other[:, p]`` lines up with ``reference`` (maximum total
    correlation)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("merging experts aligns their neurons with scipy: pip install scipy") from None

    def standard(h: torch.Tensor) -> torch.Tensor:
        h = h - h.mean(0)
        return h / h.norm(dim=0).clamp_min(1e-12)

    corr = standard(reference).t() @ standard(other)  # [f, f]: reference unit i vs other unit j
    rows, cols = linear_sum_assignment(corr.detach().double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


@torch.no_grad()
def merge_experts(model: Transformer, into: int, tokens: torch.Tensor, top_k: int | None = None,
                  rows: int = 1024) -> Transformer:
    """A new model with ``into`` experts per MoE layer, merged as the module doc says, on the
    calibration ``tokens`` ``[B, S]`` (``rows`` of each layer's FFN inputs are used to compare
    and align experts). ``top_k`` (default: the model's, capped at ``into``)."""
    from dataclasses import replace

    from moekit.analysis.collect import ffn_inputs
    from moekit.interop.hf import build_from_state
    from moekit.layers.experts import SwiGLUExperts

    config, m = model.config, model.config.moe
    if config.dense:
        raise ValueError("this model has no MoE layers to merge")
    if m.router not in PRUNABLE_ROUTERS or m.expert != "swiglu":
        raise ValueError(f"merging supports SwiGLU experts under the {list(PRUNABLE_ROUTERS)} routers, got "
                         f"{m.expert!r} experts and router {m.router!r}")
    if not 1 <= into <= m.num_experts:
        raise ValueError(f"into must be in 1..num_experts (1..{m.num_experts}), got {into}")
    k = min(m.top_k, into) if top_k is None else top_k
    if not 1 <= k <= into:
        raise ValueError(f"top_k ({k}) must be in 1..{into} (the experts after merging)")
    hidden = ffn_inputs(model, tokens)
    usage = expert_scores(model, tokens, "frequency", hidden)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for i, count in usage.items():
        experts = model.blocks[i].ffn.experts
        assert isinstance(experts, SwiGLUExperts)
        x = hidden[i][torch.linspace(0, hidden[i].shape[0] - 1, min(rows, hidden[i].shape[0])).long()]
        outputs = torch.stack([experts.expert_forward(e, x).flatten() for e in range(m.num_experts)])  # [E, M*d]
        unit = outputs / outputs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        centres = sorted(count.topk(into).indices.tolist())
        similarity = unit @ unit[centres].t()  # [E, into]
        group = similarity.argmax(1)
        group[centres] = torch.arange(into)
        b = f"blocks.{i}.ffn."
        merged = {name: [] for name in ("w1", "w3", "w2")}
        for g, centre in enumerate(centres):
            members = (group == g).nonzero().flatten().tolist()
            reference = _hidden(experts, centre, x)
            weight = count[members] + 1e-6  # usage-weighted; an unused member still counts a little
            weight = weight / weight.sum()
            parts = {name: 0.0 for name in merged}
            for e, w in zip(members, weight.tolist()):
                p = torch.arange(m.d_ff) if e == centre else align(reference, _hidden(experts, e, x))
                parts["w1"] = parts["w1"] + w * experts.w1[e][:, p]  # [d, f], units permuted
                parts["w3"] = parts["w3"] + w * experts.w3[e][:, p]
                parts["w2"] = parts["w2"] + w * experts.w2[e][p]  # [f, d]
            for name in merged:
                merged[name].append(parts[name])
        for name, tensors in merged.items():
            state[f"{b}experts.{name}"] = torch.stack(tensors).contiguous()  # into x [in, out]
        index = torch.tensor(centres)
        for name in (b + "router.gate.weight", b + "router.gate.bias"):
            if name in state:
                state[name] = state[name].index_select(0, index).contiguous()
    new = replace(config, moe=replace(m, num_experts=into, top_k=k))
    return build_from_state(new, state, next(model.parameters()).device)


def merge_to(src: str | Path, dst: str | Path, into: int, data: str | Path, top_k: int | None = None,
             overwrite: bool = False) -> str:
    """``moekit merge-experts``: the model at ``src`` with its experts merged into ``into``
    per layer on the calibration text ``data``, written as a moekit run at ``dst``."""
    from moekit.data.corpus import calibration_tokens
    from moekit.checkpoint import check_destination
    from moekit.interop import load_model
    from moekit.interop.hf import save_run

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"model path {src} does not exist")
    dst = check_destination(dst, (src,), overwrite)
    loaded = load_model(src)
    tokens = calibration_tokens(data, loaded.tokenizer, min(256, loaded.model.config.max_seq_len))
    model = merge_experts(loaded.model, into, tokens, top_k)
    save_run(dst, model, loaded.tokenizer,
              {"merged_from": str(src), "into": into})
    before, after = loaded.model.num_params().total, model.num_params().total
    return (f"wrote a model with {into} merged experts per layer to {dst}: {after / 1e6:.2f}M parameters, "
            f"{100 * (1 - after / before):.0f}% fewer")
