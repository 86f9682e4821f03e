"""Per-iteration schedules: lr (warm-up + cosine), weight decay, teacher momentum and temperature."""
from __future__ import annotations

import math

import numpy as np


def cosine_schedule(start: float, end: float, total_iters: int, warmup_iters: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up warmup_start -> start over `warmup_iters`, then cosine start -> end.

    Value at iteration `warmup_iters` is exactly `start` and at `total_iters - 1` exactly `end`.
    """
    if total_iters <= 0:
        raise ValueError("total_iters must be positive")
    warmup_iters = min(warmup_iters, total_iters)
    warm = warmup_start + (start - warmup_start) * np.arange(warmup_iters) / max(warmup_iters, 1)
    n = total_iters - warmup_iters
    t = np.arange(n) / max(n - 1, 1)
    cos = end + 0.5 * (start - end) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, cos]).astype(np.float64)


def linear_warmup_constant(start: float, end: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """Linear start -> end over `warmup_iters` (reaching `end` at iteration warmup_iters), then constant."""
    i = np.arange(total_iters, dtype=np.float64)
    if warmup_iters <= 0:
        return np.full(total_iters, float(end))
    frac = np.clip(i / warmup_iters, 0.0, 1.0)
    return start + (end - start) * frac


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """DINOv2's sqrt scaling rule: base_lr * sqrt(global_batch / 1024)."""
    return base_lr * math.sqrt(global_batch / 1024.0)


class Schedules:
    """All per-iteration hyper-parameter schedules of a run, indexed by iteration."""

    def __init__(self, total_iters: int, global_batch: int, base_lr: float, min_lr: float,
                 warmup_iters: int, wd: float, wd_end: float, momentum: float, momentum_end: float,
                 teacher_temp_start: float, teacher_temp: float, teacher_temp_warmup_iters: int,
                 freeze_last_layer_iters: int) -> None:
        peak = scaled_lr(base_lr, global_batch)
        self.peak_lr = peak
        self.lr = cosine_schedule(peak, min_lr, total_iters, warmup_iters)
        self.wd = cosine_schedule(wd, wd_end, total_iters)
        self.momentum = cosine_schedule(momentum, momentum_end, total_iters)
        self.teacher_temp = linear_warmup_constant(teacher_temp_start, teacher_temp, total_iters,
                                                   teacher_temp_warmup_iters)
        self.freeze_last_layer_iters = freeze_last_layer_iters

    def at(self, it: int) -> dict[str, float]:
        """Values at iteration `it` (clamped to the last iteration)."""
        i = min(it, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "wd": float(self.wd[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
            "last_layer_frozen": float(it < self.freeze_last_layer_iters),
        }
