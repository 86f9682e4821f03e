"""hashdedup: exact (sha256) and perceptual (pHash) duplicates among ok records; in this process, or
with `executor: ray` as banded tasks (curate/hash_bands.py) with the same outcome. The linked records'
components and keepers come from curate/copy_graph_parts.py's jobs over buckets of whole parts, as
copy dedup's."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curate.parts import list_parts
from pipelines.config import Config, fingerprint
from pipelines.framework import stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish

RAY_BAND_ROWS = 2_000_000  # records per band and per map task (bounds a task's memory)
LOCAL_BAND_ROWS = 250_000  # records per band on the local executor (bounds the process's memory)


def run(cfg: Config, force: bool = False) -> StageResult:
    """Mark exact and perceptual duplicates among ok records (`dup_of`, `dup_reason`)."""
    hc = cfg.hashdedup
    inputs = upstream(cfg, "ingest")
    config = {k: v for k, v in asdict(hc).items() if k != "bucket_records"}  # how the work is split: same output
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "hashdedup")
    prev = begin("hashdedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    parts = list_parts(stage_dir(cfg, "ingest"))
    if cfg.executor == "ray":
        n_ok, dropped, groups = _run_ray(cfg, parts, d)
    else:
        n_ok, dropped, groups = _run_local(cfg, parts, d)
    result = StageResult("hashdedup", str(d), key, counts={
        "in": n_ok, "out": n_ok - sum(dropped.values()), "dropped": dict(sorted(dropped.items())),
        "groups": groups}, seconds=time.time() - t0, outputs={"records": str(d)})
    finish(result, config, inputs)
    return result


def _run_local(cfg: Config, parts: list[Path], d: Path) -> tuple[int, dict, int]:
    """Banded in this process, the bands spilled to disk (memory bounded by a band, not the pool);
    returns (ok count, dropped counts, groups)."""
    from curate.hash_bands import dedup_spilled

    hc = cfg.hashdedup
    return dedup_spilled(parts, d, hc.phash_max_distance, hc.exact, LOCAL_BAND_ROWS, bucket_rows=hc.bucket_records)


def _run_ray(cfg: Config, parts: list[Path], d: Path) -> tuple[int, dict, int]:
    """Banded map/reduce over Ray tasks, each band's reducer writing its links as copy-graph edges; then
    the components and keepers of the linked records by jobs over buckets of whole parts (Ray tasks
    exchanging messages through files in the stage's `_graph` folder: the driver holds O(parts)), and
    one writing task per part; returns (ok count, dropped counts, groups)."""
    import shutil

    import ray

    from curate.copy_graph_parts import part_buckets
    from curate.hash_bands import band_edges, band_kinds, map_bands, write_groups
    from pipelines.executors import init_ray, ray_mapper, ray_shuffle

    hc = cfg.hashdedup
    init_ray(cfg.ray_address)
    sizes = np.array([pq.ParquetFile(p).metadata.num_rows for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_bands = max(cpus, -(-n // RAY_BAND_ROWS))
    n_maps = min(len(parts), max(cpus, -(-n // RAY_BAND_ROWS)))
    groups = [[(str(parts[k]), int(offsets[k])) for k in ks] for ks in np.array_split(np.arange(len(parts)), n_maps)]
    kinds = band_kinds(hc.phash_max_distance, hc.exact, n_bands)
    work = d / "_graph"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted run's messages
    bounds = part_buckets(offsets, hc.bucket_records)
    files = [str(work / "edges" / f"{r:06d}.arrow") for r in range(len(kinds))]
    for _ in ray_shuffle(map_bands, [(g, hc.phash_max_distance, hc.exact, n_bands) for g in groups if g], band_edges,
                         [(files[r], bounds, kind, hc.phash_max_distance) for r, kind in enumerate(kinds)],
                         cfg.ray_address):
        pass
    return write_groups([str(p) for p in parts], offsets, d, work, files, bounds, hc.exact, ray_mapper(cfg.ray_address))
