"""Make a trained MoE smaller or cheaper: drop the experts that matter least (``prune``), skip
the chosen experts whose weight is small (``skip``)."""

from moekit.shrink.prune import expert_scores, prune_experts, prune_to
from moekit.shrink.skip import set_skip_below

__all__ = ["expert_scores", "prune_experts", "prune_to", "set_skip_below"]
