"""hashdedup: exact (sha256) and perceptual (pHash) duplicates among ok records."""

from __future__ import annotations

import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from curate.parts import list_parts, part_name, write_table_atomic
from pipelines.config import Config, fingerprint
from pipelines.framework import stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish


def run(cfg: Config, force: bool = False) -> StageResult:
    """Mark exact and perceptual duplicates among ok records (`dup_of`, `dup_reason`)."""
    import numpy as np

    from curate.hashing import dedup

    hc = cfg.hashdedup
    inputs = upstream(cfg, "ingest")
    key = fingerprint({"config": asdict(hc), "inputs": inputs})
    d = stage_dir(cfg, "hashdedup")
    prev = begin("hashdedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    src = stage_dir(cfg, "ingest")
    parts = list_parts(src)
    cols = ["id", "status", "sha256", "phash", "width", "height"]
    tables = [pq.read_table(p, columns=cols) for p in parts]
    sizes = [t.num_rows for t in tables]
    table = pa.concat_tables(tables)
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    idx = np.flatnonzero(ok)
    sub = table.take(pa.array(idx))
    ids = sub.column("id").to_pylist()
    sha = sub.column("sha256").to_pylist() if hc.exact else [f"#{i}" for i in ids]
    phash = sub.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    pixels = (sub.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
              * sub.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
    res = dedup(ids, sha, phash, pixels, hc.phash_max_distance)
    n = table.num_rows
    dup_of: list = [None] * n
    reason: list = [None] * n
    group = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, -1, dtype=np.int16)
    for j, i in enumerate(idx):
        dup_of[i], reason[i] = res.dup_of[j], res.reason[j]
    group[idx], dist[idx] = res.group, res.distance
    start = 0
    for k, size in enumerate(sizes):
        sl = slice(start, start + size)
        out = pa.table({"id": table.column("id").slice(start, size),
                        "dup_of": pa.array(dup_of[sl], type=pa.string()),
                        "dup_reason": pa.array(reason[sl], type=pa.string()),
                        "dup_group": pa.array(group[sl]), "dup_distance": pa.array(dist[sl])})
        write_table_atomic(out, d / part_name(k))
        start += size
    dropped: dict = {}
    for r in reason:
        if r:
            dropped[f"duplicate_{r}"] = dropped.get(f"duplicate_{r}", 0) + 1
    result = StageResult("hashdedup", str(d), key, counts={
        "in": int(len(idx)), "out": int(res.keep.sum()), "dropped": dict(sorted(dropped.items())),
        "groups": int(len(set(res.group[res.group >= 0].tolist())))},
        seconds=time.time() - t0, outputs={"records": str(d)})
    finish(result, asdict(hc), inputs)
    return result
