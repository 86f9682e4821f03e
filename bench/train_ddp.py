"""Data-parallel scaling on CPU: images/s of the tiny trainer with 1 vs 2 gloo processes.

Weak scaling (the per-process batch is fixed, so 2 processes train a global batch twice as large).
Each run is `python -m train tiny ... --nproc N` in a subprocess with 1 intra-op thread per process;
the rate is the median over post-warm-up iterations of rank 0's per-iteration images/s (the step is
synchronous, so that is the global rate). Runs alternate 1, 2, 1, 2, ... and the figures are the
mean and spread over repeats. Efficiency = rate(2) / (2 x rate(1)). Prints one JSON line.
Usage: python bench/train_ddp.py [--repeats 3] [--iters 8] [--warmup 3] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, make_folder


def run(nproc: int, data: str, out: str, iters: int, batch: int) -> list[float]:
    """Per-iteration images/s of one run (rank 0's metrics.jsonl)."""
    args = [sys.executable, "-m", "train", "tiny", f"output_dir={out}", f"data.path={data}", "data.source=folder",
            f"optim.iterations={iters}", f"optim.batch_size={batch}", "log_every=1", "checkpoint_every=100000",
            "progress=false", "data.num_workers=0", "crops.n_local=2", "resume=false", "--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["images_per_s"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train_ddp_"))
    make_folder(tmp / "images", 64, size=(64, 48))
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(a.repeats):
        for nproc in (1, 2):
            per_iter = run(nproc, str(tmp / "images"), str(tmp / f"run{nproc}_{rep}"), a.iters, a.batch)
            rates[nproc].append(statistics.median(per_iter[a.warmup:]))
    m1, m2 = statistics.mean(rates[1]), statistics.mean(rates[2])
    eff = [r2 / (2 * r1) for r1, r2 in zip(rates[1], rates[2])]
    print(json.dumps({
        "bench": "train_ddp", "config": "tiny", "per_process_batch": a.batch, "iters": a.iters, "warmup": a.warmup,
        "repeats": a.repeats, "cpu_count": os.cpu_count(),
        "images_per_s_1proc": round(m1, 2), "images_per_s_1proc_std": round(statistics.pstdev(rates[1]), 2),
        "images_per_s_2proc": round(m2, 2), "images_per_s_2proc_std": round(statistics.pstdev(rates[2]), 2),
        "speedup": round(m2 / m1, 3), "efficiency": round(statistics.mean(eff), 3),
        "efficiency_std": round(statistics.pstdev(eff), 3),
    }))


if __name__ == "__main__":
    main()
