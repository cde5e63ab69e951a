"""Make a trained MoE smaller or cheaper: drop the experts that matter least (``prune``), merge
similar ones (``merge``), skip the chosen experts whose weight is small (``skip``), store the
weights in bf16, int8 or int4 (``quantize``). Offloading experts under a memory budget is an
inference concern: :mod:`moekit.inference.offload`."""

from moekit.shrink.merge import merge_experts, merge_to
from moekit.shrink.prune import expert_scores, prune_experts, prune_to
from moekit.shrink.quantize import quantize_model, quantize_to
from moekit.shrink.skip import set_skip_below

__all__ = ["expert_scores", "merge_experts", "merge_to", "prune_experts", "prune_to", "quantize_model", "quantize_to",
           "set_skip_below"]
