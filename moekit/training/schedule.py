"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``."""

from __future__ import annotations

import math

from moekit.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, train_seconds: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    The decay follows whichever is further along, ``step / max_steps`` or, with a
    ``time_budget``, ``train_seconds / time_budget``, so a time-limited run ends its schedule
    when its time is up (the fair way to compare models at equal wall-clock time).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.time_budget is not None:
        progress = max(progress, train_seconds / cfg.time_budget)
    progress = min(1.0, progress)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
