"""Expert offloading: run a model whose routed experts do not all fit in memory.

Everything but the routed experts loads as usual; the experts stay in their safetensors
files (a moekit run's ``model.safetensors``, or a Hugging Face directory's shards in the
per-expert or the fused layout) and are read one expert at a time
(:class:`moekit.interop.expert_files.ExpertSource`) into an :class:`~moekit.inference.expert_cache.ExpertCache` that never holds more than the
budget. Each MoE layer's experts become :class:`OffloadedExperts`, which compute exactly
what :class:`~moekit.layers.experts.SwiGLUExperts` computes, with weights taken from the
cache. Prefetch guesses the next layer's experts while a layer runs: a pre-hook on block
``L``'s FFN norm applies block ``L+1``'s norm and router to the residual stream and
starts reading the experts it picks (Mixtral-offloading's speculative prefetch), so the
read overlaps block ``L``'s experts and block ``L+1``'s attention.

The figures (hit rate, prefetch accuracy, tokens/s against the resident model) come from
``benchmarks/offload.py``; docs/shrink.md has them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.budget import parse_bytes
from moekit.config import ModelConfig
from moekit.inference.expert_cache import ExpertCache, OffloadStats
from moekit.layers.experts import swiglu, swiglu_add_
from moekit.layers.router import TopKRouter
from moekit.ops.swiglu import segments

class OffloadedExperts(nn.Module):
    """A layer's SwiGLU experts whose weights live in an :class:`ExpertCache`: the same
    computation as :class:`~moekit.layers.experts.SwiGLUExperts` on the same weights, each
    expert taken from the cache (read on a miss) for the span of its rows. Inference only."""

    def __init__(self, cache: ExpertCache, layer: int, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.num_experts, self.d_model, self.d_ff, self.d_out = num_experts, d_model, d_ff, d_model
        self.adapters = nn.ModuleDict()  # none: LoRA needs the weights in memory

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, d_model]`` sorted by expert -> ``[N, d_model]``."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("offloaded experts run inference only (their weights are not parameters); load the "
                               "model without expert_memory to train it")
        out = x.new_empty(x.shape[0], self.d_out)
        for e, a, b in segments(tokens_per_expert):
            with self.cache.expert(self.layer, e) as w:
                swiglu(w, x[a:b], out[a:b])
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        with self.cache.expert(self.layer, e) as w:
            return swiglu(w, x)

    def expert_add_(self, e: int, x: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        with self.cache.expert(self.layer, e) as w:
            swiglu_add_(w, x, out, weight)


class ExpertOffload:
    """The offloaded experts of one model: the cache, its source and the prefetch hooks.
    :func:`offload_experts` makes one and sets it as ``model.expert_offload``; generation
    reports its counters (:attr:`moekit.inference.GenerationStats.offload`)."""

    def __init__(self, model: nn.Module, source, cache: ExpertCache, per_token: int):
        self.model, self.source, self.cache, self.per_token = model, source, cache, per_token
        self._hooks = []
        if cache.prefetching:
            blocks = model.blocks
            for i in source.layers:
                if i > 0 and blocks[i].ffn.router.learned:  # a hash router needs the token ids
                    hook = blocks[i - 1].ffn_norm.register_forward_pre_hook(self._prefetcher(i))
                    self._hooks.append(hook)

    @property
    def stats(self) -> OffloadStats:
        return self.cache.stats

    def _prefetcher(self, layer: int):
        block = self.model.blocks[layer]
        E = block.ffn.config.num_experts

        router, k = block.ffn.router, self.per_token

        def hook(_module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1])  # [..., d] -> [T, d]
            with torch.no_grad():
                h = block.ffn_norm.forward(flat)  # .forward: not this norm's own prefetch hook
                if flat.shape[0] == 1 and type(router) is TopKRouter:  # decoding: the k largest logits, likeliest first
                    likeliest = torch.topk(F.linear(h[0], router.gate.weight, router.gate.bias), k).indices
                else:
                    chosen = router(h).indices[:, :k].reshape(-1)  # [T, top_k] -> [T*k]
                    counts = torch.bincount(chosen, minlength=E)
                    likeliest = torch.argsort(counts, descending=True, stable=True)[: int((counts > 0).sum())]
            self.cache.prefetch(layer, likeliest.tolist(), keep_layers=(layer - 1,))

        return hook

    def close(self) -> None:
        """Remove the hooks, finish reads under way and close the files."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.cache.close()
        self.source.close()


def offload_experts(model: nn.Module, source, expert_memory: str | int, policy: str = "lru",
                    prefetch: bool | int = True, counts: Iterable[Iterable[float]] | None = None) -> ExpertOffload:
    """Replace every MoE layer's routed experts of ``model`` (a :class:`moekit.Transformer`,
    possibly built on the meta device) by :class:`OffloadedExperts` reading from ``source``
    (an :class:`~moekit.interop.expert_files.ExpertSource`) under ``expert_memory`` (bytes,
    or ``"4GB"``). ``prefetch``: read each token's ``top_k`` likeliest next-layer experts
    ahead (``True``), only the ``n`` likeliest (an int: 1 reads the surest guess, measured in
    docs/shrink.md), or none (``False``). ``counts[layer][expert]``: LFU's starting counts
    (routing statistics of the model). Returns the :class:`ExpertOffload`, also set as
    ``model.expert_offload``."""
    budget = parse_bytes(expert_memory, "expert memory")
    config = model.config
    top_k = config.moe.top_k
    per_token = top_k if prefetch is True else int(prefetch)
    if isinstance(prefetch, float) or not 0 <= per_token <= top_k:
        raise ValueError(f"prefetch must be True, False or a number of experts per token in 0..top_k={top_k}, "
                         f"got {prefetch!r}")
    if budget >= source.total_bytes:
        warnings.warn(f"the expert memory ({budget:,} bytes) holds all {len(source.layers) * source.num_experts} "
                      f"experts ({source.total_bytes:,} bytes): nothing is offloaded, every expert stays once read",
                      stacklevel=2)
    cache = ExpertCache(source.read, source.expert_bytes, budget, min_experts=top_k, policy=policy,
                        prefetch=per_token > 0, counts=_layer_counts(counts, config) if counts is not None else None)
    for i in source.layers:
        model.blocks[i].ffn.experts = OffloadedExperts(cache, i, source.num_experts, source.d_model, source.d_ff)
    model.expert_offload = ExpertOffload(model, source, cache, per_token)
    return model.expert_offload


def _layer_counts(counts, config: ModelConfig) -> list[list[float]]:
    rows = [[float(n) for n in row] for row in counts]
    if len(rows) != config.n_layers or any(len(r) != config.moe.num_experts for r in rows):
        raise ValueError(f"counts must be [n_layers={config.n_layers}][num_experts={config.moe.num_experts}], "
                         f"got {len(rows)} rows of lengths {sorted({len(r) for r in rows})}")
    return rows
