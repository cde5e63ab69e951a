"""Training: the loop, the schedule, checkpoints and routing-health checks."""

from moekit.training.loop import Trainer, TrainingDiverged, evaluate, train
from moekit.training.schedule import lr_at

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "lr_at", "train"]
