"""Benchmark balanced sampling (curate.balance) on a long-tailed Fashion-MNIST pool.

The pool: Fashion-MNIST train images (apt package dataset-fashion-mnist, idx files under
/usr/share/datasets/fashion-mnist), padded to 32x32, 2x2-averaged to 16x16, centred (each image's
own mean pixel subtracted) and L2-normalised -> 256-d float16 "embeddings"; classes subsampled to
power-law sizes (size_i ~ (i+1)^-alpha, classes in a seeded order). Labels are never shown to the
algorithm: hierarchical k-means (with resampling) then balanced_sample, against a uniform random
subset of the same size and against balancing over a flat (1-level) k-means. Reports normalised
class entropy and the max/min class count ratio. Prints one JSON line.

Run: python bench/balance.py [--alpha 1.5] [--target 2000] [--levels 300,60,15]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
from _common import emit, peak_rss_mb

from curate.balance import balanced_sample
from curate.kmeans_tree import LevelSpec, hierarchical_kmeans

DATA = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file (magic 0x0000080X + big-endian dims) as a uint8 array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def embed(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> 16x16 average-pooled, per-image centred, L2-normalised float16 (256-d).

    (Subtracting the pool's mean image instead spreads the dominant class over the whole sphere.)
    """
    x = np.pad(images.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    x = x.reshape(len(x), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(x), 256)
    x -= x.mean(axis=1, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def class_stats(labels: np.ndarray, n_classes: int) -> dict:
    """Normalised entropy of the class histogram and max/min class count (inf if a class is missing)."""
    counts = np.bincount(labels, minlength=n_classes)
    p = counts / counts.sum()
    h = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(n_classes))
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
    return {"entropy": round(h, 4), "max_min_ratio": round(ratio, 2), "counts": counts.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=1.5, help="power-law exponent of the class sizes")
    ap.add_argument("--largest", type=int, default=6000, help="size of the largest class")
    ap.add_argument("--target", type=int, default=2000)
    ap.add_argument("--levels", default="300,60,15", help="clusters per level, finest first")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--resampling", type=int, default=3)
    ap.add_argument("--strategy", default="r", choices=["r", "c"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    images, labels = read_idx(DATA / "train-images-idx3-ubyte.gz"), read_idx(DATA / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(10)
    sizes = np.maximum(1, np.round(args.largest * np.arange(1, 11) ** -args.alpha)).astype(int)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), s, replace=False)
                                   for c, s in zip(order, sizes)]))
    x, y = embed(images[rows]), labels[rows].astype(np.int64)
    ks = [int(k) for k in args.levels.split(",")]
    sample = [max(2, m // k // 2) for k, m in zip(ks, [len(x)] + ks[:-1])]
    levels = [LevelSpec(k, args.iters, args.resampling, s, "c") for k, s in zip(ks, sample)]

    t0 = time.perf_counter()
    tree = hierarchical_kmeans(x, levels, seed=args.seed)
    cluster_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = balanced_sample(tree.paths(), args.target, strategy=args.strategy, sq_dists=tree.sq_dists, seed=args.seed)
    balance_s = time.perf_counter() - t0
    flat = hierarchical_kmeans(x, [LevelSpec(ks[0], args.iters)], seed=args.seed)
    flat_res = balanced_sample(flat.paths(), args.target, strategy=args.strategy, sq_dists=flat.sq_dists,
                               seed=args.seed)
    random_pick = rng.choice(len(x), args.target, replace=False)
    emit(
        "balance",
        pool=len(x), class_sizes=dict(zip(map(int, order), map(int, sizes))), alpha=args.alpha,
        target=args.target, selected=res.report["selected"], levels=ks, iters=args.iters,
        resampling_steps=args.resampling, sample_sizes=sample, strategy=args.strategy,
        pool_stats=class_stats(y, 10), curated=class_stats(y[res.selected], 10),
        random=class_stats(y[random_pick], 10), flat_kmeans_balanced=class_stats(y[flat_res.selected], 10),
        root_cap=res.report["root_cap"], cluster_s=round(cluster_s, 2), balance_s=round(balance_s, 3),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


if __name__ == "__main__":
    main()
