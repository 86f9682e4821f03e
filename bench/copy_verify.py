"""Copy dedup's local verification by jobs over buckets (pipelines.copy_verify, what `dedup.verify local`
runs) against the same steps over the whole pool in one process (pipelines.copy_verify.whole_pool: what the
stage ran before), side by side on one generated pool.

Per run, a fresh process (multiprocessing spawn) computes the verified edges; it reports its seconds and
peak RSS, and the edges' digest (both must give the same edges). The pool: pipelines.synth.write_pool
(distinct generated images, exact and edited copies, junk) ingested and embedded with pixels:16.

Run: cd bench && python copy_verify.py [--images 3000] [--buckets 4] [--work /tmp/copy_verify]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
from _common import emit, peak_rss_mb


def _config(work: Path, buckets: int, n: int):
    from pipelines.config import load_config

    cfg = load_config(None, [f"workdir={work / 'w'}", "ingest.workers=2", "embed.num_workers=0",
                             "embed.model=pixels:16", "hashdedup.phash_max_distance=-1", "hashdedup.exact=false",
                             "ingest.part_size=250", f"dedup.bucket_records={max(1, n // buckets)}"])
    cfg.ingest.sources = [str(work / "raw")]
    return cfg


def _digest(i, j, s) -> str:
    order = np.lexsort((j, i))
    h = hashlib.sha256()
    for a in (i[order].astype(np.int64), j[order].astype(np.int64), s[order].astype(np.float32)):
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _whole(work: str, buckets: int, n: int, out) -> None:
    """The whole pool in this process: hashes, candidates, cap, verification (copy_verify.whole_pool)."""
    from pipelines.copy_verify import whole_pool
    from pipelines.framework import stage_dir

    cfg = _config(Path(work), buckets, n)
    t0 = time.perf_counter()
    ref = whole_pool(cfg, stage_dir(cfg, "ingest"), Path(work) / "w" / "embed" / "pixels-16", 0.95)
    out.put({"seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb(), "pairs": ref["stats"]["kept"],
             "edges": len(ref["edges"][0]), "digest": _digest(*ref["edges"])})


def _jobs(work: str, buckets: int, n: int, out) -> None:
    """pipelines.copy_verify's jobs, one after the other in this process (the local executor)."""
    import shutil

    from curate.copy_graph_parts import part_buckets, read_edges
    from curate.dedup import as_parts
    from pipelines.aligned import EmbeddingLayout
    from pipelines.framework import stage_dir
    from pipelines.stages.dedup import _verified_edges, valid_files

    cfg = _config(Path(work), buckets, n)
    t0 = time.perf_counter()
    emb_dir = Path(work) / "w" / "embed" / "pixels-16"
    layout = EmbeddingLayout(stage_dir(cfg, "ingest"), emb_dir)
    parts = as_parts(str(emb_dir))
    graph = Path(work) / "_graph"
    shutil.rmtree(graph, ignore_errors=True)
    valid_at, _ = valid_files(parts.paths, graph, None)
    bounds = part_buckets(layout.offsets, cfg.dedup.bucket_records)
    files, info = _verified_edges(cfg, emb_dir, layout, parts, valid_at, 0.95, graph, bounds, None)
    edges = read_edges(files)
    out.put({"seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb(), "pairs": info["candidates"]["kept"],
             "edges": len(edges[0]), "digest": _digest(*edges), "buckets": len(bounds) - 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="distinct images of the generated pool")
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--work", default="/tmp/copy_verify")
    args = ap.parse_args()
    from pipelines.run import run_pipeline
    from pipelines.synth import write_pool

    work = Path(args.work)
    if not (work / "w" / "embed" / "pixels-16").exists():
        write_pool(str(work / "raw"), args.images, seed=5)
        run_pipeline(_config(work, args.buckets, args.images), until="embed")
    from pipelines.aligned import EmbeddingLayout

    n = EmbeddingLayout(work / "w" / "ingest", work / "w" / "embed" / "pixels-16").n
    ctx = mp.get_context("spawn")
    got = {}
    for name, fn in (("whole", _whole), ("jobs", _jobs), ("whole_again", _whole), ("jobs_again", _jobs)):
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(str(work), args.buckets, n, q))
        p.start()
        got[name] = q.get()
        p.join()
        print(name, got[name], flush=True)
    whole = min(got["whole"]["seconds"], got["whole_again"]["seconds"])
    jobs = min(got["jobs"]["seconds"], got["jobs_again"]["seconds"])
    emit("copy_verify", images=n, buckets=got["jobs"]["buckets"], whole_s=round(whole, 1), jobs_s=round(jobs, 1),
         time_ratio=round(jobs / whole, 3), whole_rss_mb=round(got["whole"]["rss_mb"]),
         jobs_rss_mb=round(got["jobs"]["rss_mb"]), rss_ratio=round(got["jobs"]["rss_mb"] / got["whole"]["rss_mb"], 3),
         same_edges=got["whole"]["digest"] == got["jobs"]["digest"], edges=got["jobs"]["edges"],
         pairs=got["jobs"]["pairs"])


if __name__ == "__main__":
    main()
