"""Benchmark decontamination's candidate search: the pool streamed through an index of the evaluation
set (curate.decontam.eval_matches, what the stage runs) against the approach it replaced, a pool index
searched with the evaluation images (pool_index + range search), side by side on the same vectors.

Writes n L2-normalised float16 pool vectors as memory-mapped parts (Gaussian clusters whose members
have cosine ~0.2) and an evaluation set of m vectors, `planted` of them near copies of pool rows
(cosine ~0.8). Each variant runs in its own process, alternating, `--rounds` times: wall seconds, CPU
seconds and peak RSS (the process's VmHWM), the pairs above the threshold found, and the recall of the planted copies at the DINOv2 threshold
0.45 over all (pool, eval) pairs above it. One JSON line.

Run: python bench/decontam.py [--n 1000000] [--m 20000] [--dim 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, emit

PART_ROWS = 100_000
THRESHOLD = 0.45


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_data(root: Path, n: int, m: int, dim: int, planted: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // 1000), dim)))
    pool_dir = root / "pool"
    pool_dir.mkdir(parents=True)
    for i, start in enumerate(range(0, n, PART_ROWS)):
        rows = min(PART_ROWS, n - start)
        x = centres[rng.integers(0, len(centres), rows)] * 0.45 + rng.standard_normal((rows, dim)) / np.sqrt(dim)
        np.save(pool_dir / f"part-{i:05d}.npy", unit(x).astype(np.float16))
    pool = np.concatenate([np.load(p) for p in sorted(pool_dir.glob("part-*.npy"))]).astype(np.float32)
    src = rng.choice(n, planted, replace=False)
    copies = unit(pool[src] + 0.55 * unit(rng.standard_normal((planted, dim))))
    other = unit(rng.standard_normal((m - planted, dim)))
    np.save(root / "eval.npy", np.concatenate([copies, other]).astype(np.float16))
    np.save(root / "planted.npy", np.stack([src, np.arange(planted)], axis=1))


def child(variant: str, root: Path) -> None:
    from curate.decontam import eval_matches
    from curate.dedup import pair_sims, pool_index, valid_rows
    from curate.index import EmbeddingParts

    pool, ev = EmbeddingParts(str(root / "pool")), EmbeddingParts(np.load(root / "eval.npy"))
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "streamed":
        p, e = eval_matches(pool, ev, THRESHOLD, None)
    else:  # the replaced approach: index the pool, range-search it with the evaluation images
        index, ok = pool_index(pool), valid_rows(pool)
        lims, _, found = index.range(ev.rows(0, ev.n), THRESHOLD - 1e-3)
        owner = np.repeat(np.arange(ev.n), np.diff(lims))
        keep = ok[found]
        keys = np.unique(found[keep] * ev.n + owner[keep])
        p, e = keys // ev.n, keys % ev.n
    hit = pair_sims(pool, p, ev, e) > THRESHOLD
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    planted = {tuple(r) for r in np.load(root / "planted.npy").tolist()}
    found = set(zip(p[hit].tolist(), e[hit].tolist()))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (which held the data)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_mb": hwm / 1024,
                      "pairs": len(found), "recall": len(found & planted) / len(planted)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["streamed", "pool_index"])
    ap.add_argument("--root")
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.root))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.n, args.m, args.dim, args.planted)
        runs: dict[str, list[dict]] = {"streamed": [], "pool_index": []}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(args.rounds):
            for variant in runs:
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--root", str(root)],
                                     check=True, capture_output=True, text=True, env=env).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
                print(variant, runs[variant][-1], flush=True)
    med = {v: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for v, rs in runs.items()}
    emit("decontam", n=args.n, m=args.m, dim=args.dim, planted=args.planted, rounds=args.rounds,
         load=os.getloadavg()[0], median=med,
         speed_ratio_wall=med["pool_index"]["wall_s"] / med["streamed"]["wall_s"],
         speed_ratio_cpu=med["pool_index"]["cpu_s"] / med["streamed"]["cpu_s"],
         rss_ratio=med["streamed"]["rss_mb"] / med["pool_index"]["rss_mb"])


if __name__ == "__main__":
    main()
