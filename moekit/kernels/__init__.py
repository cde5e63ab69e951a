"""moekit's CPU kernels (C, built on first use): tensors and scalars in, tensors out.

This package knows nothing of moekit's modules: it takes tensors, checks every one it hands
to C (dtype, device, shape, layout, index ranges: a ``ValueError`` naming the argument) and
checks every return code. Modules decide when to call it (``moekit.layers``,
``moekit.inference``), the autograd Functions over it live in :mod:`moekit.ops`.

- :mod:`~moekit.kernels.library`: build, cache, :func:`load`, :func:`status`, and the public
  switch :class:`enabled` (``MOEKIT_KERNELS=0`` in the environment does the same).
- :mod:`~moekit.kernels.decode`: one-token products and whole steps, which read each
  weight once at the speed of memory (:func:`rows`, :func:`swiglu_add`,
  :class:`MoETokenStep`, :func:`moe_token`, :class:`AttentionStep`).
- :mod:`~moekit.kernels.experts`: every SwiGLU expert over its rows, forward and backward
  (:func:`swiglu_segments`, :func:`swiglu_segments_backward`): over a few rows each weight
  read once per pass, over more (``blocked=True``) each expert's products on one thread as
  blocked matrix products, the experts shared among threads (float32, or bfloat16 on AVX-512
  BF16: :func:`blocks_bf16`); the SwiGLU activation in one pass (:func:`silu_mul`).
- :mod:`~moekit.kernels.lowp`: the same products and steps with weights in bf16, int8 or int4
  (:func:`rows_lowp`, :class:`LowpMoETokenStep`, :class:`LowpAttentionStep`).
- :mod:`~moekit.kernels.dispatch`: the dispatch's plan (:func:`sort_slots`, a counting sort,
  with padding between the experts' segments), its gather and combine and their backward
  passes, one pass each with no scatter, float32 or bfloat16 rows (:func:`gather_rows`,
  :func:`combine_backward`), and the softmax top-k router (:func:`topk_softmax`).

Why each exists, and what it measured, is in ``docs/internals.md`` and
``docs/benchmarks.md``.
"""

from moekit.kernels.decode import (
    AttentionStep,
    MoETokenStep,
    attention_ok,
    moe_token,
    moe_token_ok,
    rows,
    rows_ok,
    swiglu_add,
    swiglu_ok,
)
from moekit.kernels.experts import silu_mul, silu_mul_backward, swiglu_segments, swiglu_segments_backward
from moekit.kernels.library import blocks_bf16, cache_dir, enabled, few_rows_vectorised, for_tensors, is_enabled, load, status
from moekit.kernels.lowp import LOWP_MAX_ROWS, LowpAttentionStep, LowpMoETokenStep, LowpWeights, lowp_weights, rows_lowp
from moekit.kernels.dispatch import (
    ROW_DTYPES,
    SortedSlots,
    combine_backward,
    gather_rows,
    sort_slots,
    topk_softmax,
    topk_softmax_backward,
)

__all__ = [
    "LOWP_MAX_ROWS", "ROW_DTYPES", "SortedSlots", "AttentionStep", "LowpAttentionStep", "LowpMoETokenStep", "LowpWeights", "lowp_weights", "MoETokenStep", "attention_ok", "blocks_bf16", "cache_dir", "combine_backward", "enabled", "few_rows_vectorised", "for_tensors",
    "gather_rows", "is_enabled", "load", "moe_token", "moe_token_ok", "rows", "rows_lowp", "rows_ok", "silu_mul",
    "silu_mul_backward", "sort_slots", "status", "swiglu_add", "swiglu_ok", "swiglu_segments", "swiglu_segments_backward",
    "topk_softmax", "topk_softmax_backward",
]
