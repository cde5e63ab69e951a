"""Expert pruning: keep, per MoE layer, the ``keep`` experts that matter most on calibration
text, and drop the rest with their router rows.

Scores (higher = kept), each over the calibration tokens:

- ``frequency``: how often the router chooses the expert (slots in its top-k).
- ``gate``: the mean routing weight the expert gets (0 where not chosen).
- ``reap`` (REAP, arXiv 2510.13999): the mean, over the tokens routed to the expert, of
  its routing weight times the norm of its output.

With the renormalised top-k router, a pruned model computes exactly what the full model
computes when the dropped experts' router logits are ``-inf``: the kept experts' weights are
a softmax over the chosen logits alone. (Without renormalisation the softmax's denominator
loses the dropped experts' mass and the weights grow.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moekit.models import Transformer

METHODS = ("frequency", "gate", "reap")
PRUNABLE_ROUTERS = ("topk", "switch")  # a gate and nothing else per expert


@torch.no_grad()
def expert_scores(model: Transformer, tokens: torch.Tensor, by: str = "frequency",
                  hidden: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: [E] scores}`` of every MoE layer on calibration ``tokens`` ``[B, S]``
    (``hidden``: each layer's FFN inputs on them, when the caller has them already)."""
    from moekit.analysis.collect import ffn_inputs

    if by not in METHODS:
        raise ValueError(f"by must be one of {list(METHODS)}, got {by!r}")
    if tokens.numel() == 0:
        raise ValueError("the calibration tokens are empty")
    hidden = ffn_inputs(model, tokens) if hidden is None else hidden  # per layer [N, d]
    was_training = model.training
    model.eval()
    out = {}
    try:
        for i, block in enumerate(model.blocks):
            if not block.is_moe:
                continue
            moe = block.ffn
            E = moe.config.num_experts
            routing = moe.router(hidden[i].to(moe.router.gate.weight.dtype))
            idx, w = routing.indices.reshape(-1), routing.weights.reshape(-1).float()  # [N, k] -> [N*k]
            if by == "frequency":
                out[i] = torch.bincount(idx, minlength=E).float()
            elif by == "gate":
                out[i] = torch.zeros(E).index_add_(0, idx, w) / hidden[i].shape[0]
            else:
                rows = torch.arange(hidden[i].shape[0]).repeat_interleave(routing.indices.shape[1])  # [N*k]
                score = torch.zeros(E)
                for e in range(E):
                    chosen = idx == e
                    if chosen.any():
                        y = moe.experts.expert_forward(e, hidden[i][rows[chosen]])  # [n_e, d]
                        score[e] = (w[chosen] * y.float().norm(dim=-1)).mean()
                out[i] = score
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def prune_experts(model: Transformer, keep: int | dict[int, list[int]], scores: dict[int, torch.Tensor] | None = None,
                  top_k: int | None = None) -> Transformer:
    """A new model keeping ``keep`` experts per MoE layer: the highest-scoring ones, or the
    given ``{layer: [expert ids]}``. ``top_k`` (default: the model's) must be at most the
    experts kept. The source model is left unchanged."""
    from moekit.interop.hf import build_from_state

    config = model.config
    m = config.moe
    if config.dense:
        raise ValueError("this model has no MoE layers to prune")
    if m.router not in PRUNABLE_ROUTERS:
        raise ValueError(f"pruning supports the {list(PRUNABLE_ROUTERS)} routers (a gate row per expert), "
                         f"got router {m.router!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= m.num_experts:
            raise ValueError(f"keep must be in 1..num_experts (1..{m.num_experts}), got {keep}")
        if scores is None:
            raise ValueError("give the experts' scores (expert_scores) or the ids to keep per layer")
        chosen = {i: sorted(s.topk(keep).indices.tolist()) for i, s in scores.items()}
        n = keep
    else:
        chosen = {i: sorted(ids) for i, ids in keep.items()}
        sizes = {len(ids) for ids in chosen.values()}
        if len(sizes) != 1:
            raise ValueError(f"every layer must keep the same number of experts, got {sorted(sizes)}")
        n = sizes.pop()
    moe_layers = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    if sorted(chosen) != moe_layers:
        raise ValueError(f"the experts to keep must name every MoE layer {moe_layers}, got {sorted(chosen)}")
    k = m.top_k if top_k is None else top_k
    if not 1 <= k <= n:
        raise ValueError(f"top_k ({k}) must be in 1..{n} (the experts kept); pass top_k to lower it")
    new = replace(config, moe=replace(m, num_experts=n, top_k=k))
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for i, ids in chosen.items():
        index = torch.tensor(ids)
        b = f"blocks.{i}.ffn."
        for name in [k_ for k_ in state if k_.startswith(b + "experts.")]:
            state[name] = state[name].index_select(0, index).contiguous()  # [E, ...] -> [n, ...]
        for name in (b + "router.gate.weight", b + "router.gate.bias"):
            if name in state:
                state[name] = state[name].index_select(0, index).contiguous()
    return build_from_state(new, state, next(model.parameters()).device)


def prune_to(src: str | Path, dst: str | Path, keep: int, by: str = "frequency", data: str | Path | None = None,
             top_k: int | None = None, overwrite: bool = False) -> str:
    """``moekit prune``: the model at ``src`` (a moekit run or a Hugging Face MoE directory)
    pruned to ``keep`` experts per layer, scored on the text ``data``, written as a moekit run
    at ``dst``. Everything is checked before ``dst`` is touched."""
    from moekit.data.corpus import calibration_tokens
    from moekit.checkpoint import check_destination
    from moekit.interop import load_model
    from moekit.interop.hf import save_run

    if by not in METHODS:
        raise ValueError(f"--by must be one of {list(METHODS)}, got {by!r}")
    if data is None:
        raise ValueError("--data FILE is needed: the experts are scored on calibration text")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"model path {src} does not exist")
    dst = check_destination(dst, (src,), overwrite)
    loaded = load_model(src)
    m = loaded.model.config.moe
    if not loaded.model.config.dense and not 1 <= keep <= m.num_experts:
        raise ValueError(f"--keep must be in 1..{m.num_experts} (the experts per layer), got {keep}")
    if not loaded.model.config.dense and top_k is None and keep < m.top_k:
        raise ValueError(f"--keep {keep} is fewer than top_k ({m.top_k}); pass --top-k {keep} or fewer")
    tokens = calibration_tokens(data, loaded.tokenizer, min(256, loaded.model.config.max_seq_len))
    scores = expert_scores(loaded.model, tokens, by) if not loaded.model.config.dense else None
    model = prune_experts(loaded.model, keep, scores, top_k)
    save_run(dst, model, loaded.tokenizer,
              {"pruned_from": str(src), "by": by, "keep": keep})
    before, after = loaded.model.num_params().total, model.num_params().total
    return (f"wrote a model with {keep} of {m.num_experts} experts per layer (by {by}) to {dst}: "
            f"{after / 1e6:.2f}M parameters, {100 * (1 - after / before):.0f}% fewer")
