"""Stage runners: settings from the config, manifests for skip/resume, progress bars, counts."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from curate.download import DownloadSettings
from curate.images import CheckSettings
from curate.parts import list_parts, part_name, read_aligned, write_table_atomic
from pipelines.config import Config, fingerprint
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _progress(total: int | None, desc: str, unit: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("CURATE_PROGRESS") != "1")


def stage_dir(cfg: Config, stage: str) -> Path:
    """`<workdir>/<stage>`."""
    return Path(cfg.workdir) / stage


def _upstream(cfg: Config, *stages: str) -> dict:
    """Fingerprints of finished upstream stages; a missing one is a clear error."""
    out = {}
    for s in stages:
        m = read_manifest(stage_dir(cfg, s))
        if m is None:
            raise RuntimeError(f"stage '{s}' has not finished in {cfg.workdir}; run `curate {s}` first")
        out[s] = m["key"]
    return out


def _source_fingerprint(source: str) -> dict:
    """Path plus size and mtime; for a folder, a stat walk (files, bytes, newest mtime), so adding or
    changing images makes the stage redo instead of reporting 'already done'."""
    p = Path(source).resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = size = newest = 0
    for dirpath, _, names in os.walk(p):
        for name in names:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"path": str(p), "files": files, "bytes": size, "newest_mtime_ns": newest}


def run_ingest(cfg: Config, force: bool = False) -> StageResult:
    """Ingest every source of cfg.ingest.sources into records parts and raw shards."""
    from curate.ingest import IngestSettings, ingest

    ic = cfg.ingest
    if not ic.sources:
        raise ValueError("no sources given (folders, URL lists or tars)")
    inputs = {"sources": [_source_fingerprint(s) for s in ic.sources]}
    settings = IngestSettings(
        part_size=ic.part_size, workers=ic.workers,
        check=CheckSettings(min_side=ic.min_side, max_pixels=ic.max_pixels, max_bytes=ic.max_file_bytes),
        download=DownloadSettings(**asdict(cfg.download)))
    config = {"ingest": asdict(ic), "download": asdict(cfg.download)}
    config["ingest"].pop("workers")  # parallelism settings do not change the records
    config["download"].pop("concurrency")
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "ingest")
    prev = begin("ingest", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    print(f"ingest: planning {len(ic.sources)} source(s) ...", file=sys.stderr)
    from curate.ingest import plan

    n_parts = plan(ic.sources, d, ic.part_size)
    done = len(list_parts(d))
    with _progress(n_parts, "ingest", "part") as bar:
        bar.update(done)
        counts = ingest(ic.sources, d, settings, on_part=lambda i, c: bar.update(1))
    n_in = sum(counts.values())
    result = StageResult("ingest", str(d), key, counts={
        "in": n_in, "out": counts.get("ok", 0), "dropped": {k: v for k, v in counts.items() if k != "ok"},
        "parts": n_parts}, seconds=time.time() - t0,
        outputs={"records": str(d), "raw_shards": str(d / "shards")})
    finish(result, config, inputs)
    return result


def run_hashdedup(cfg: Config, force: bool = False) -> StageResult:
    """Mark exact and perceptual duplicates among ok records (`dup_of`, `dup_reason`)."""
    import numpy as np

    from curate.hashing import dedup

    hc = cfg.hashdedup
    inputs = _upstream(cfg, "ingest")
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


def _find_select(cfg: Config, select: str) -> tuple[Path, str]:
    stage, _, column = select.rpartition(":")
    candidates = [stage_dir(cfg, stage)] if stage else sorted(p for p in Path(cfg.workdir).iterdir() if p.is_dir())
    for d in candidates:
        parts = list_parts(d)
        if parts and column in pq.read_schema(parts[0]).names:
            return d, column
    raise ValueError(f"no stage in {cfg.workdir} has a column '{column}' to select on")


# Optional stages whose drops the shards honour when they have run: column, and what drops a record.
DROP_FILTERS = {"dedup": ("copy_of", "not_null"), "decontaminate": ("contaminated", "true")}


def finished_filters(cfg: Config) -> list[str]:
    """The optional dropping stages that are enabled by the config and have finished."""
    from pipelines.run import enabled

    return [s for s in DROP_FILTERS if enabled(cfg, s) and read_manifest(stage_dir(cfg, s)) is not None]


def selected_records(cfg: Config, select: str | None = None) -> pa.Table:
    """Records that survived: ok, not a hash or copy duplicate, not contaminated, `select` true."""
    import pyarrow.compute as pc

    dirs = [stage_dir(cfg, "ingest"), stage_dir(cfg, "hashdedup")]
    dirs += [stage_dir(cfg, s) for s in finished_filters(cfg)]
    if select and list_parts(stage_dir(cfg, "cluster")):
        dirs.append(stage_dir(cfg, "cluster"))  # the cluster path travels into the sample metadata
    column = None
    if select:
        sel_dir, column = _find_select(cfg, select)
        if sel_dir not in dirs:
            dirs.append(sel_dir)
    out = []
    for k in range(len(list_parts(dirs[0]))):
        t = read_aligned(dirs, k)
        mask = pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of")))
        for stage in finished_filters(cfg):
            col, rule = DROP_FILTERS[stage]
            drop = pc.is_valid(t.column(col)) if rule == "not_null" else pc.fill_null(t.column(col), False)
            mask = pc.and_(mask, pc.invert(drop))
        if column:
            mask = pc.and_(mask, pc.fill_null(t.column(column), False))
        out.append(t.filter(mask))
    return pa.concat_tables(out, promote_options="permissive")


def _expand_repeats(records: pa.Table) -> pa.Table:
    """A record selected n > 1 times (balance multiplier) becomes n samples: <id>, <id>_r1, ..."""
    import numpy as np

    if "repeats" not in records.column_names:
        return records
    reps = np.maximum(records.column("repeats").fill_null(1).to_numpy(zero_copy_only=False), 1)
    if (reps == 1).all():
        return records
    take = np.repeat(np.arange(records.num_rows), reps)
    nth = np.arange(len(take)) - np.repeat(np.cumsum(reps) - reps, reps)
    ids = records.column("id").to_pylist()
    keys = [ids[i] if k == 0 else f"{ids[i]}_r{k}" for i, k in zip(take.tolist(), nth.tolist())]
    return records.take(pa.array(take)).append_column("key", pa.array(keys, type=pa.string()))


def run_shards(cfg: Config, force: bool = False) -> StageResult:
    """Write the surviving records as curated webdataset shards with a Parquet index."""
    from curate.ingest import CORE_COLUMNS
    from curate.shards import ShardSettings, write_shards

    sc = cfg.shards
    upstream = ["ingest", "hashdedup", *finished_filters(cfg)]
    if sc.select:
        upstream.append(_find_select(cfg, sc.select)[0].name)
    inputs = _upstream(cfg, *upstream)
    out = Path(sc.out) if sc.out else stage_dir(cfg, "shards")
    key = fingerprint({"config": asdict(sc), "inputs": inputs})
    prev = begin("shards", out, key, force)
    if prev:
        return prev
    t0 = time.time()
    records = _expand_repeats(selected_records(cfg, sc.select))
    dup_cols = {"dup_of", "dup_reason", "dup_group", "dup_distance", "raw_key", "error", "status", "selected",
                "repeats", "cluster_sq_dist", "copy_of", "copy_group", "copy_max_sim", "contaminated",
                "contam_reason", "contam_set"}
    meta = [c for c in records.column_names if c not in CORE_COLUMNS and c not in dup_cols]
    settings = ShardSettings(max_size=sc.max_size, max_count=sc.max_count, shuffle_seed=sc.shuffle_seed)
    with _progress(None, "shards", "shard") as bar:
        info = write_shards(records, stage_dir(cfg, "ingest"), out, settings, meta_columns=meta,
                            on_shard=lambda name, n: bar.update(1))
    result = StageResult("shards", str(out), key, counts={
        "in": records.num_rows, "out": info["samples"], "dropped": {}, "shards": info["shards"],
        "bytes": info["bytes"]}, seconds=time.time() - t0,
        outputs={"shards": str(out), "index": str(out / "index.parquet")})
    finish(result, asdict(sc), inputs)
    return result
