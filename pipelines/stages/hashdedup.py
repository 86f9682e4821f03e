"""hashdedup: exact (sha256) and perceptual (pHash) duplicates among ok records; in this process, or
with `executor: ray` as banded tasks (curate/hash_bands.py) with the same outcome."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curate.hash_bands import write_dup_part
from curate.parts import list_parts, part_name
from pipelines.config import Config, fingerprint
from pipelines.framework import stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish

RAY_BAND_ROWS = 2_000_000  # records per band and per map task (bounds a task's memory)
LOCAL_BAND_ROWS = 250_000  # records per band on the local executor (bounds the process's memory)


def run(cfg: Config, force: bool = False) -> StageResult:
    """Mark exact and perceptual duplicates among ok records (`dup_of`, `dup_reason`)."""
    hc = cfg.hashdedup
    inputs = upstream(cfg, "ingest")
    key = fingerprint({"config": asdict(hc), "inputs": inputs})
    d = stage_dir(cfg, "hashdedup")
    prev = begin("hashdedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    parts = list_parts(stage_dir(cfg, "ingest"))
    if cfg.executor == "ray":
        n_ok, reason, groups = _run_ray(cfg, parts, d)
        dropped: dict = {}
        for r in reason:
            if r:
                dropped[f"duplicate_{r}"] = dropped.get(f"duplicate_{r}", 0) + 1
    else:
        n_ok, dropped, groups = _run_local(cfg, parts, d)
    result = StageResult("hashdedup", str(d), key, counts={
        "in": n_ok, "out": n_ok - sum(dropped.values()), "dropped": dict(sorted(dropped.items())),
        "groups": groups}, seconds=time.time() - t0, outputs={"records": str(d)})
    finish(result, asdict(hc), inputs)
    return result


def _run_local(cfg: Config, parts: list[Path], d: Path) -> tuple[int, dict, int]:
    """Banded in this process, the bands spilled to disk (memory bounded by a band, not the pool);
    returns (ok count, dropped counts, groups)."""
    from curate.hash_bands import dedup_spilled

    hc = cfg.hashdedup
    return dedup_spilled(parts, d, hc.phash_max_distance, hc.exact, LOCAL_BAND_ROWS)


def _run_ray(cfg: Config, parts: list[Path], d: Path) -> tuple[int, list, int]:
    """Banded map/reduce over Ray tasks; the driver holds only the records that have a link."""
    import ray

    from curate.hash_bands import band_kinds, band_links, gather_rows, map_bands
    from curate.hashing import group_linked
    from pipelines.executors import init_ray, ray_map, ray_shuffle

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
    links = list(ray_shuffle(map_bands, [(g, hc.phash_max_distance, hc.exact, n_bands) for g in groups if g],
                             band_links, [(kind, hc.phash_max_distance) for kind in kinds], cfg.ray_address))
    ei = np.concatenate([a for _, (a, _) in links] or [np.zeros(0, np.int64)])
    ej = np.concatenate([b for _, (_, b) in links] or [np.zeros(0, np.int64)])
    linked = np.unique(np.concatenate([ei, ej]))  # global rows with a link, sorted
    part_of = np.searchsorted(offsets, linked, side="right") - 1
    cuts = np.searchsorted(part_of, np.arange(len(parts) + 1))
    positions = [linked[cuts[k]:cuts[k + 1]] - offsets[k] for k in range(len(parts))]
    got = dict(ray_map(gather_rows, [(str(parts[k]), positions[k]) for k in range(len(parts)) if len(positions[k])],
                       cfg.ray_address))
    have = [got[i] for i in range(len(got))]
    ids = [x for g in have for x in g["id"]]
    sha = [x for g in have for x in g["sha256"]] if hc.exact else [None] * len(ids)
    phash = np.concatenate([g["phash"] for g in have] or [np.zeros(0, np.uint64)])
    pixels = np.concatenate([g["pixels"] for g in have] or [np.zeros(0, np.int64)])
    res = group_linked(ids, sha, phash, pixels, np.searchsorted(linked, ei), np.searchsorted(linked, ej))
    jobs = [(str(p), str(d / part_name(k)), positions[k], res.dup_of[cuts[k]:cuts[k + 1]],
             res.reason[cuts[k]:cuts[k + 1]], res.group[cuts[k]:cuts[k + 1]], res.distance[cuts[k]:cuts[k + 1]])
            for k, p in enumerate(parts)]
    n_ok = sum(c for _, c in ray_map(write_dup_part, jobs, cfg.ray_address))
    return n_ok, res.reason, int(len(np.unique(res.group[res.group >= 0])))
