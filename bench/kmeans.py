"""Benchmark hierarchical k-means (curate.kmeans_tree) on synthetic float16 embedding parts, next to
scikit-learn's MiniBatchKMeans at the level-1 k on the same data, in the same run.

The embeddings (L2-normalised float16, memory-mapped part-XXXXX.npy files in a temp dir) are
written by a child process so that this process's peak RSS measures only the clustering. Ours
runs first (peak RSS read right after it), then scikit-learn (which needs the data in RAM as
float32). Both get the same number of passes over the data (--iters epochs) and k-means++ init;
both objectives are the inertia of their level-1 centroids on the full data, computed the same
way. Prints one JSON line.

The figures: both times and inertias at the same number of passes, and, from our per-pass inertia
curve and the measured time of one pass, the estimated time our run needs to match sklearn's inertia.

Run: python bench/kmeans.py [--n 1000000] [--dim 128] [--levels 10000,1000,100] [--iters 10]
On the 2-core machine 1M x 128 at k = 10000 costs ~2 minutes per pass; see RESULTS for the size used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, emit, peak_rss_mb


def generate(out: Path, n: int, dim: int, modes: int, part_rows: int, seed: int) -> None:
    """n float16 unit vectors around `modes` centres with power-law weights, in parts (chunk by chunk)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = np.arange(1, modes + 1, dtype=np.float64) ** -0.8
    spread = rng.uniform(0.3, 1.0, modes).astype(np.float32)
    for i, start in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - start)
        which = rng.choice(modes, m, p=weights / weights.sum())
        x = centres[which] + spread[which, None] * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(out / f"part-{i:05d}.npy", x.astype(np.float16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--levels", default="10000,1000,100", help="clusters per level, finest first")
    ap.add_argument("--iters", type=int, default=10, help="Lloyd iterations per level (and sklearn epochs)")
    ap.add_argument("--resampling", type=int, default=1, help="resampling steps per level, the first fit included (1: none)")
    ap.add_argument("--sample-size", type=int, default=0, help="points per cluster when resampling (0: n/k/2)")
    ap.add_argument("--part-rows", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=16_384, help="rows per assignment chunk")
    ap.add_argument("--batch", type=int, default=8192, help="MiniBatchKMeans batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate), args.n, args.dim, 2 * int(args.levels.split(",")[0]), args.part_rows, args.seed)
        return

    import faiss

    from curate.kmeans import ArrayVectors, local_step_fn
    from curate.kmeans_tree import LevelSpec, hierarchical_kmeans

    ks = [int(k) for k in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-") as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", tmp, "--n", str(args.n), "--dim", str(args.dim),
                        "--levels", args.levels, "--part-rows", str(args.part_rows), "--seed", str(args.seed)],
                       check=True, cwd=ROOT)
        gen_s = time.perf_counter() - t0
        file_mb = sum(p.stat().st_size for p in Path(tmp).glob("part-*.npy")) / 2**20
        vectors = ArrayVectors.from_dir(tmp)
        rss_before = peak_rss_mb()
        sizes = [args.n] + ks[:-1]
        levels = [LevelSpec(k, args.iters, args.resampling, args.sample_size or max(2, m // k // 2), "c")
                  for k, m in zip(ks, sizes)]
        marks: dict[tuple[int, int], float] = {}
        t0 = time.perf_counter()
        tree = hierarchical_kmeans(vectors, levels, seed=args.seed, chunk_size=args.chunk,
                                   on_checkpoint=lambda lv, s: marks.setdefault((lv, s), time.perf_counter() - t0))
        ours_s = time.perf_counter() - t0
        ours_rss = peak_rss_mb()
        ours_l1_s = marks[(1, 0)]
        ours_inertia = tree.objectives[0][args.iters]  # after k-means, before resampling
        step = local_step_fn(vectors, args.chunk)

        from sklearn.cluster import MiniBatchKMeans

        t1 = time.perf_counter()
        x = np.vstack([b for _, b in vectors.chunks(args.part_rows)])
        load_s = time.perf_counter() - t1
        t0 = time.perf_counter()
        mbk = MiniBatchKMeans(n_clusters=ks[0], batch_size=args.batch, max_iter=args.iters, n_init=1,
                              max_no_improvement=None, tol=0.0, compute_labels=False, random_state=args.seed)
        mbk.fit(x)
        sk_s = time.perf_counter() - t0
        sk_rss = peak_rss_mb()
        del x
        t1 = time.perf_counter()
        sk_inertia = step(mbk.cluster_centers_.astype(np.float32)).inertia
        pass_s = time.perf_counter() - t1
    curve = tree.objectives[0][: args.iters + 1]  # inertia after 0, 1, ... updates (one pass each)
    match = next((j for j, v in enumerate(curve) if v <= sk_inertia), None)
    init_s = max(0.0, ours_l1_s - (args.iters + 1) * pass_s)
    match_s = None if match is None else init_s + (match + 1) * pass_s
    emit(
        "kmeans",
        n=args.n, dim=args.dim, levels=ks, iters=args.iters, resampling_steps=args.resampling,
        sample_sizes=[lv.sample_size for lv in levels], chunk=args.chunk,
        faiss_threads=faiss.omp_get_max_threads(),
        embeddings_mb=round(file_mb, 1), generate_s=round(gen_s, 1),
        ours_total_s=round(ours_s, 1), ours_level1_kmeans_s=round(ours_l1_s, 1),
        ours_level1_inertia=round(ours_inertia, 2),
        ours_level1_inertia_after_resampling=round(tree.objectives[0][-1], 2),
        ours_peak_rss_mb=round(ours_rss, 1), rss_before_mb=round(rss_before, 1),
        ours_peak_rss_over_file=round(ours_rss / file_mb, 2),
        sklearn_s=round(sk_s, 1), sklearn_load_s=round(load_s, 1), sklearn_inertia=round(sk_inertia, 2),
        sklearn_batch=args.batch,
        process_peak_rss_after_sklearn_mb=round(sk_rss, 1),
        ours_level1_curve=[round(v, 1) for v in curve], one_pass_s=round(pass_s, 1),
        ours_updates_to_match_sklearn=match, ours_est_s_to_match_sklearn=None if match_s is None else round(match_s, 1),
        speedup_to_match=None if match_s is None else round(sk_s / match_s, 2),
        speedup_level1=round(sk_s / ours_l1_s, 2), inertia_ratio_ours_over_sklearn=round(ours_inertia / sk_inertia, 4),
        level_done_s={f"l{lv}": round(t, 1) for (lv, s), t in sorted(marks.items())
                      if s == levels[lv - 1].resampling_steps},
    )


if __name__ == "__main__":
    main()
