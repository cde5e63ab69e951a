"""What the experts do: routing statistics, specialisation, consistency, similarity,
training dynamics, and the ``moekit inspect`` report."""

from moekit.analysis.collect import (
    checkpoint_consistency,
    expert_similarity,
    jitter_consistency,
    moe_layers,
    routing_stats,
    token_routes,
    training_dynamics,
    windows,
)
from moekit.analysis.inspect import inspect_model
from moekit.analysis.labels import (
    CHAR_CLASSES,
    char_class,
    domain_corpus,
    token_class_labels,
)
from moekit.analysis.stats import (
    LayerAccumulator,
    LayerStats,
    mutual_information,
    verdict,
)

__all__ = [
    "CHAR_CLASSES", "LayerAccumulator", "LayerStats", "char_class", "checkpoint_consistency", "domain_corpus",
    "expert_similarity", "inspect_model", "jitter_consistency", "moe_layers", "mutual_information",
    "routing_stats", "token_class_labels", "token_routes", "training_dynamics", "verdict", "windows",
]
