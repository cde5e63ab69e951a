"""Autograd Functions over :mod:`moekit.kernels`, each with its reference in torch ops
beside it (tests hold every one to its reference: outputs and gradients).

- :mod:`~moekit.ops.dispatch`: the gather of tokens into expert order and the weighted
  combine back (:func:`gather_rows` / :func:`gather_rows_reference`, :func:`combine` /
  :func:`combine_reference`).
- :mod:`~moekit.ops.swiglu`: all SwiGLU experts over expert-sorted rows, three ways with
  hand-written backward passes (:func:`swiglu_kernel`, :func:`swiglu_grouped`,
  :func:`swiglu_segments`), the reference :func:`swiglu_reference`, and the activation
  :func:`silu_mul`.
- :mod:`~moekit.ops.router`: softmax, top-k and renormalisation in one pass each way
  (:func:`topk_softmax` / :func:`topk_softmax_reference`).

Ops do not choose: the modules call them where their path-selection function says so.
"""

from moekit.ops.dispatch import combine, combine_reference, gather_rows, gather_rows_reference
from moekit.ops.router import topk_softmax, topk_softmax_reference
from moekit.ops.swiglu import (
    grouped_matmul,
    idle_runs,
    segments,
    silu_mul,
    swiglu_grouped,
    swiglu_kernel,
    swiglu_reference,
    swiglu_segments,
)

__all__ = [
    "combine", "combine_reference", "gather_rows", "gather_rows_reference", "grouped_matmul", "idle_runs",
    "segments", "silu_mul", "swiglu_grouped", "swiglu_kernel", "swiglu_reference", "swiglu_segments",
    "topk_softmax", "topk_softmax_reference",
]
