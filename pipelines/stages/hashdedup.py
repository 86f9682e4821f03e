"""hashdedup: exact (sha256) and perceptual (pHash) duplicates among ok records; in this process, or
with `executor: ray` as banded tasks (curate/hash_bands.py) with the same outcome."""

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
    key = fingerprint({"config": asdict(hc), "inputs": inputs})
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
    finish(result, asdict(hc), inputs)
    return result


def _run_local(cfg: Config, parts: list[Path], d: Path) -> tuple[int, dict, int]:
    """Banded in this process, the bands spilled to disk (memory bounded by a band, not the pool);
    returns (ok count, dropped counts, groups)."""
    from curate.hash_bands import dedup_spilled

    hc = cfg.hashdedup
    return dedup_spilled(parts, d, hc.phash_max_distance, hc.exact, LOCAL_BAND_ROWS)


def _run_ray(cfg: Config, parts: list[Path], d: Path) -> tuple[int, dict, int]:
    """Banded map/reduce over Ray tasks, then the keepers of the records with a link (gathered as Arrow
    and numpy columns, no Python object per record) and one writing task per part; returns (ok count,
    dropped counts, groups)."""
    import ray

    from curate.hash_bands import band_kinds, band_links, link_keepers, map_bands, write_outcome
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
    found = dict(ray_shuffle(map_bands, [(g, hc.phash_max_distance, hc.exact, n_bands) for g in groups if g],
                             band_links, [(kind, hc.phash_max_distance) for kind in kinds], cfg.ray_address))
    links: dict[str, tuple[list, list]] = {"sha": ([], []), "phash": ([], [])}
    for r in sorted(found):
        links[kinds[r]][0].append(found[r][0])
        links[kinds[r]][1].append(found[r][1])
    del found
    paths = [str(p) for p in parts]
    mapper = ray_mapper(cfg.ray_address)
    return write_outcome(paths, offsets, d, *link_keepers(paths, offsets, links["sha"], links["phash"], hc.exact,
                                                          mapper), mapper=mapper)
