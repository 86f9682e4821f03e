"""Schedule end points and lengths."""
from __future__ import annotations

import math

import numpy as np
import pytest

from train.schedules import Schedules, cosine_schedule, linear_warmup_constant, scaled_lr


def _sched(**kw) -> Schedules:
    args = dict(total_iters=100, global_batch=256, base_lr=0.004, min_lr=1e-6, warmup_iters=10, wd=0.04,
                wd_end=0.4, momentum=0.992, momentum_end=1.0, teacher_temp_start=0.04, teacher_temp=0.07,
                teacher_temp_warmup_iters=30, freeze_last_layer_iters=5)
    args.update(kw)
    return Schedules(**args)


def test_lr_warmup_peak_and_final():
    s = _sched()
    peak = 0.004 * math.sqrt(256 / 1024)
    assert s.peak_lr == pytest.approx(peak)
    assert len(s.lr) == 100
    assert s.lr[0] == 0.0
    assert s.lr[5] == pytest.approx(peak * 0.5)
    assert s.lr[10] == pytest.approx(peak)
    assert s.lr.max() == pytest.approx(peak)
    assert s.lr[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(s.lr[10:]) <= 0) and np.all(np.diff(s.lr[:11]) > 0)


def test_wd_momentum_temperature_end_points():
    s = _sched()
    assert (s.wd[0], s.wd[-1]) == (pytest.approx(0.04), pytest.approx(0.4))
    assert (s.momentum[0], s.momentum[-1]) == (pytest.approx(0.992), pytest.approx(1.0))
    assert np.all(np.diff(s.wd) >= 0) and np.all(np.diff(s.momentum) >= 0)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[15] == pytest.approx(0.055)
    assert s.teacher_temp[30] == pytest.approx(0.07) and s.teacher_temp[-1] == pytest.approx(0.07)
    assert s.at(4)["last_layer_frozen"] == 1.0 and s.at(5)["last_layer_frozen"] == 0.0
    assert s.at(10_000)["lr"] == pytest.approx(1e-6)


def test_cosine_midpoint_and_helpers():
    c = cosine_schedule(1.0, 0.0, 11)
    assert c[5] == pytest.approx(0.5) and c[0] == 1.0 and c[-1] == pytest.approx(0.0)
    assert len(cosine_schedule(1.0, 0.0, 7, warmup_iters=3)) == 7
    assert linear_warmup_constant(0.0, 1.0, 5, 0)[0] == 1.0
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
