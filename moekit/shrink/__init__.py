"""Make a trained MoE smaller: drop the experts that matter least (``prune``)."""

from moekit.shrink.prune import expert_scores, prune_experts, prune_to

__all__ = ["expert_scores", "prune_experts", "prune_to"]
