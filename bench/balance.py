"""Ablation of resampling for balanced sampling (curate.kmeans_tree + curate.balance), on labelled data.

Data (--data):
- flat: n vectors (dim 128) of `concepts` Zipf-sized concepts (size ~ 1/rank) whose centres are
  random unit vectors (no structure above the concepts), each point = centre + 0.05 * N(0, I),
  L2-normalised, float16;
- tree: the same with concept centres grouped as the levels (concept_data's groups);
- fashion: a long-tailed Fashion-MNIST pool (power-law class sizes, 16x16 pooled, centred,
  L2-normalised pixels; /usr/share/datasets/fashion-mnist).
For every seed and variant (none: plain k-means per level; c / r: the reference's resampling with
`--steps` steps counting the first fit and sample size half the mean cluster size per level), the
tree is fitted, then `target` records are drawn top-down over all levels ("tree") and over the
level-1 clusters alone ("leaves") and over the levels that `structured_levels` keeps ("auto");
a uniform random subset of the same size is the baseline.
Reports the concept (class) entropy normalised by ln(#concepts), absent concepts counting, as
mean and sd over the seeds. Prints one JSON line.

Run: python bench/balance.py --data flat [--full] [--seeds 0,1,2] [--variants none,c,r]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
from _common import emit, peak_rss_mb

from curate.balance import balanced_sample, explained_variance, structured_levels
from curate.kmeans_tree import LevelSpec, hierarchical_kmeans

DATA = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file (magic 0x0000080X + big-endian dims) as a uint8 array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def concept_data(seed: int, n: int, concepts: int, groups: tuple[int, ...] = (), dim: int = 128,
                 noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """float16 unit vectors around `concepts` unit centres with Zipf sizes (~1/rank), and the labels.

    No groups: random centres (flat). groups (g2, g3): concept c lies near group c % g2, which lies
    near top group (c % g2) % g3 (centre = unit(top + 0.7 group + 0.5 own), each a random unit vector).
    """
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, concepts + 1)
    sizes = np.maximum(1, np.floor(n * w / w.sum())).astype(np.int64)
    sizes[0] += n - sizes.sum()
    centres = unit(rng.standard_normal((concepts, dim)))
    if groups:
        g2 = np.arange(concepts) % groups[0]
        mid, top = unit(rng.standard_normal((groups[0], dim))), unit(rng.standard_normal((groups[1], dim)))
        centres = unit(top[g2 % groups[1]] + 0.7 * mid[g2] + 0.5 * centres)
    y = rng.permutation(np.repeat(np.arange(concepts), sizes))
    x = centres[y] + noise * rng.standard_normal((n, dim))
    return unit(x).astype(np.float16), y


def embed_pixels(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> 16x16 average-pooled, per-image centred, L2-normalised float16 (256-d)."""
    x = np.pad(images.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    x = x.reshape(len(x), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(x), 256)
    x -= x.mean(axis=1, keepdims=True)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float16)  # blank: 0


def fashion_pool(seed: int, alpha: float = 1.5, largest: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST train items with power-law class sizes (classes in a seeded order), embedded."""
    images, labels = read_idx(DATA / "train-images-idx3-ubyte.gz"), read_idx(DATA / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, np.round(largest * np.arange(1, 11) ** -alpha)).astype(int)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), s, replace=False)
                                   for c, s in zip(rng.permutation(10), sizes)]))
    return embed_pixels(images[rows]), labels[rows].astype(np.int64)


def entropy(labels: np.ndarray, n_classes: int) -> float:
    """Entropy of the label histogram / ln(n_classes); absent classes count (they lower the score)."""
    p = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(n_classes))


def levels_for(variant: str, ks: list[int], n: int, iters: int, steps: int) -> list[LevelSpec]:
    """LevelSpecs of a variant: 'none', or 'c' / 'r' resampling at every level (sample = half the mean cluster size)."""
    sizes = [n, *ks[:-1]]
    if variant == "none":
        return [LevelSpec(k, iters) for k in ks]
    return [LevelSpec(k, iters, steps, max(1, m // k // 2), variant) for k, m in zip(ks, sizes)]


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation, rounded."""
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1
            else 0.0, "runs": [round(v, 4) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["flat", "tree", "fashion"], default="flat")
    ap.add_argument("--full", action="store_true", help="flat at full size: 200k x 128, 2000 concepts, 2000/200/20, 20k")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--concepts", type=int, default=500)
    ap.add_argument("--levels", default="500,50,5", help="clusters per level, finest first")
    ap.add_argument("--target", type=int, default=5000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="resampling steps per level, the first fit included")
    ap.add_argument("--variants", default="none,c,r")
    ap.add_argument("--strategy", default="r", choices=["r", "c"], help="balanced_sample inside the leaves")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--min-explained", type=float, default=0.7, help="structured_levels threshold ('auto' rows)")
    args = ap.parse_args()
    if args.full:
        args.n, args.concepts, args.levels, args.target = 200_000, 2000, "2000,200,20", 20_000
    ks = [int(k) for k in args.levels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    out: dict = {v: {"tree": [], "leaves": [], "auto": [], "depth": [], "explained": [], "fit_s": []} for v in variants}
    rand = []
    for seed in seeds:
        if args.data == "fashion":
            x, y = fashion_pool(seed)
        else:
            x, y = concept_data(seed, args.n, args.concepts, tuple(ks[1:3]) if args.data == "tree" else ())
        n_classes = args.concepts if args.data != "fashion" else 10
        target = args.target if args.data != "fashion" else len(x) // 2
        rand.append(entropy(y[np.random.default_rng(seed).choice(len(x), target, replace=False)], n_classes))
        for v in variants:
            t0 = time.perf_counter()
            tree = hierarchical_kmeans(x, levels_for(v, ks, len(x), args.iters, args.steps), seed=seed)
            out[v]["fit_s"].append(time.perf_counter() - t0)
            paths = tree.paths()
            depth = structured_levels(tree.centroids, tree.assignments, args.min_explained)
            out[v]["depth"].append(depth)
            out[v]["explained"].append([round(explained_variance(c, a), 3)
                                        for c, a in zip(tree.centroids[:-1], tree.assignments[1:])])
            for name, p in (("tree", paths), ("leaves", paths[:, :1]), ("auto", paths[:, :depth])):
                res = balanced_sample(p, target, strategy=args.strategy, sq_dists=tree.sq_dists, seed=seed)
                out[v][name].append(entropy(y[res.counts > 0], n_classes))
            print(f"seed {seed} {v}: tree {out[v]['tree'][-1]:.4f} leaves {out[v]['leaves'][-1]:.4f} auto "
                  f"{out[v]['auto'][-1]:.4f} (depth {depth}, explained {out[v]['explained'][-1]}) "
                  f"random {rand[-1]:.4f} ({out[v]['fit_s'][-1]:.0f} s)", flush=True)
    emit(
        "balance", data=args.data, n=len(x), concepts=n_classes,
        levels=ks, target=target, iters=args.iters, steps=args.steps,
        sample_sizes={v: [s.sample_size for s in levels_for(v, ks, len(x), args.iters, args.steps)] for v in variants},
        seeds=seeds, random=mean_sd(rand),
        min_explained=args.min_explained,
        variants={v: {"tree": mean_sd(r["tree"]), "leaves": mean_sd(r["leaves"]), "auto": mean_sd(r["auto"]),
                      "auto_depth": r["depth"], "explained_l2_up": r["explained"],
                      "fit_s": round(float(np.mean(r["fit_s"])), 1)} for v, r in out.items()},
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


if __name__ == "__main__":
    main()
