"""Training throughput on CPU: images/s of a full student+teacher step for the tiny config and ViT-S/14.

Also reports the achieved FLOP/s (counted with torch's FlopCounterMode) as a fraction of the
matrix-multiply peak measured in the same run, and the peak RSS. Prints one JSON line.
Usage: python bench/train.py [--iters 3] [--batch-tiny 32] [--batch-vits 4] [--threads 1]
(1 thread by default: on a shared 2-core machine 2 intra-op threads oversubscribe badly)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def synthetic_batch(cfg, rng: np.random.Generator) -> dict:
    """Random crops and real iBOT masks with the config's shapes (measures the model, not decoding)."""
    from train.masking import sample_masks

    b, c = cfg.optim.batch_size, cfg.crops
    grid = (c.global_size // cfg.model.patch_size,) * 2
    masks, _ = sample_masks(2 * b, grid, rng, cfg.mask.sample_probability, cfg.mask.ratio_min, cfg.mask.ratio_max)
    return {"global": torch.randn(2 * b, 3, c.global_size, c.global_size),
            "local": torch.randn(c.n_local * b, 3, c.local_size, c.local_size),
            "masks": torch.from_numpy(masks), "iteration": 0}


def bench_config(name: str, overrides: list[str], iters: int, peak: float) -> dict:
    """Time `iters` optimisation steps (after one warm-up step) and count FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import _step, build_model, build_schedules
    from train.optim import build_optimizer

    cfg = load_config(resolve_config_path(name), overrides + ["optim.iterations=1000", "optim.warmup_iters=10"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(model.student, model.arch["depth"], cfg.optim.layerwise_decay,
                          cfg.optim.patch_embed_lr_mult)
    sched = build_schedules(cfg)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(cfg, rng) for _ in range(iters + 1)]
    dev = torch.device("cpu")
    with FlopCounterMode(display=False) as fc:
        _step(model, opt, batches[0], sched.at(20), cfg, dev)
    flops = fc.get_total_flops()
    t = time.perf_counter()
    for i in range(iters):
        _step(model, opt, batches[i + 1], sched.at(21 + i), cfg, dev)
    dt = (time.perf_counter() - t) / iters
    b = cfg.optim.batch_size
    return {"config": name, "batch": b, "crops": f"2x{cfg.crops.global_size}+{cfg.crops.n_local}x{cfg.crops.local_size}",
            "prototypes": cfg.head.prototypes, "s_per_iter": round(dt, 4), "images_per_s": round(b / dt, 2),
            "gflop_per_iter": round(flops / 1e9, 2), "achieved_gflops": round(flops / dt / 1e9, 2),
            "fraction_of_matmul_peak": round(flops / dt / peak, 3)}


def main() -> None:
    """Run both configs and print one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch-tiny", type=int, default=32)
    p.add_argument("--batch-vits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    results = [
        bench_config("tiny", [f"optim.batch_size={args.batch_tiny}"], args.iters, peak),
        bench_config("vits14", [f"optim.batch_size={args.batch_vits}", "model.drop_path_rate=0.0"], args.iters, peak),
    ]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bench": "train", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
                      "matmul_peak_gflops": round(peak / 1e9, 2), "results": results, "peak_rss_mb": round(rss_mb, 1)}))


if __name__ == "__main__":
    main()
