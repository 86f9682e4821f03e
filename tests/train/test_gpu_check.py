"""bench/gpu_train_check.sh skips cleanly without CUDA, and its measurement code runs (tiny model, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_check_skips_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train_check.sh")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines() == ["gpu_train_check: skipped, no CUDA device"]


@pytest.mark.slow
def test_gpu_train_check_measures_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train_check.py"), "--config", "tiny", "--device",
                          "cpu", "--steps", "1", "--warmup", "1", "--batch", "2", "--strategies", "fsdp+ac,ddp",
                          "crops.n_local=1", "head.prototypes=256", "head.ibot_prototypes=256"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [(r["strategy"], r["activation_checkpointing"]) for r in rows] == [("fsdp", True), ("ddp", False)]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)  # same model, same batch, any strategy
    assert all(r["images_per_s"] > 0 and r["tflops_per_step"] >= 0 for r in rows)
