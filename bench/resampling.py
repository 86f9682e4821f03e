"""Ablation of resampling (curate.kmeans_tree): centroids per true component on Gaussians of Zipf sizes.

Data (per seed): 10 Gaussians in 32-d (unit-norm random centres, sd 0.15 per coordinate) of sizes
20000 * i**-2 (20,000 ... 200), k = 100 (an even split is 10 per component). Variants: plain
k-means, and the reference's resampling with 'c' or 'r' sampling (--steps steps counting the first
fit, sample size 10 per cluster). Reports the centroids per component (each centroid counted at
its nearest true centre) and the largest component's count over its even share, mean and sd
over seeds. Prints one JSON line.

Run: python bench/resampling.py [--seeds 0,1,2] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit

from curate.kmeans import assign_chunk
from curate.kmeans_tree import LevelSpec, hierarchical_kmeans


def zipf_gaussians(seed: int, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float32 points of 10 Gaussians of sizes 20000 * i**-2, and the true centres."""
    rng = np.random.default_rng(seed)
    sizes = np.round(20_000 * np.arange(1, 11) ** -2.0).astype(int)
    centres = rng.standard_normal((10, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[np.repeat(np.arange(10), sizes)] + 0.15 * rng.standard_normal((sizes.sum(), dim))
    return x.astype(np.float32), centres.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sample-size", type=int, default=10)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict = {}
    for v in ("none", "c", "r"):
        counts, ratio, secs = [], [], []
        for seed in seeds:
            x, centres = zipf_gaussians(seed)
            spec = LevelSpec(args.k, args.iters) if v == "none" else LevelSpec(args.k, args.iters, args.steps,
                                                                                args.sample_size, v)
            t0 = time.perf_counter()
            tree = hierarchical_kmeans(x, [spec], seed=seed)
            secs.append(time.perf_counter() - t0)
            c = np.bincount(assign_chunk(tree.centroids[0], centres)[0], minlength=10)
            counts.append(c.tolist())
            ratio.append(float(c[0] / (args.k / 10)))
        out[v] = {"centroids_per_component": counts, "largest_over_even_share": {
            "mean": round(float(np.mean(ratio)), 3), "sd": round(float(np.std(ratio, ddof=1)), 3)},
            "components_without_centroid": [int((np.array(c) == 0).sum()) for c in counts],
            "seconds": round(float(np.mean(secs)), 2)}
    emit("resampling", k=args.k, iters=args.iters, steps=args.steps, sample_size=args.sample_size, seeds=seeds,
         variants=out)


if __name__ == "__main__":
    main()
