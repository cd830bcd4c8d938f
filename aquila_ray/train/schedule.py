"""Learning-rate schedules: linear warmup, then cosine decay to ``lr * min_lr_ratio`` or constant.

A pure function of the step, so a resumed run needs no scheduler state: the step in trainer_state.json is
enough (the seed's per-stage LRs and batches are set per TrainConfig).
"""

from __future__ import annotations

import math

from aquila_ray.config.train import ScheduleConfig


def lr_at(step: int, peak_lr: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """The learning rate of optimizer update ``step`` (0-based)."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return peak_lr
    end = schedule.decay_steps or total_steps
    progress = min(1.0, max(0.0, (step - warmup) / max(1, end - warmup)))
    min_lr = peak_lr * schedule.min_lr_ratio
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
