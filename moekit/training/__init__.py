"""Training: the loop, the schedule, checkpoints and routing-health checks."""

from moekit.training.loop import TrainingDiverged, evaluate, train
from moekit.training.schedule import lr_at

__all__ = ["TrainingDiverged", "evaluate", "lr_at", "train"]
