"""Make a trained MoE smaller or cheaper: drop the experts that matter least (``prune``), merge
similar ones (``merge``), skip
the chosen experts whose weight is small (``skip``)."""

from moekit.shrink.merge import merge_experts, merge_to
from moekit.shrink.prune import expert_scores, prune_experts, prune_to
from moekit.shrink.skip import set_skip_below

__all__ = ["expert_scores", "merge_experts", "merge_to", "prune_experts", "prune_to", "set_skip_below"]
