"""shards: the surviving records as curated webdataset shards with a Parquet index."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.parts import list_parts, read_aligned
from pipelines.config import Config, fingerprint
from pipelines.framework import DROP_FILTERS, dropped_by, finished_filters, progress, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _find_select(cfg: Config, select: str) -> tuple[Path, str]:
    stage, _, column = select.rpartition(":")
    candidates = [stage_dir(cfg, stage)] if stage else sorted(p for p in Path(cfg.workdir).iterdir() if p.is_dir())
    for d in candidates:
        parts = list_parts(d)
        if parts and column in pq.read_schema(parts[0]).names:
            return d, column
    raise ValueError(f"no stage in {cfg.workdir} has a column '{column}' to select on")



def _embed_failed_ids(cfg: Config, filters: list[str]) -> pa.Array:
    """Ids whose image failed to embed (embed_error) in an embedding that copy dedup, decontamination
    or clustering used: no copy or evaluation check saw them, so they are not curated (rare: the raw
    bytes passed ingest's decode)."""
    import pyarrow.compute as pc

    used = set()
    for stage in (*filters, "cluster"):
        manifest = read_manifest(stage_dir(cfg, stage))
        if manifest and "embedding" in manifest.get("inputs", {}):
            used.add(manifest["inputs"]["embedding"])
    failed = []
    for d in sorted(stage_dir(cfg, "embed").glob("*")):
        manifest = read_manifest(d)
        if manifest and manifest["key"] in used:
            for part in list_parts(d):
                t = pq.read_table(part, columns=["id", "status"])
                failed.append(t.filter(pc.not_equal(t.column("status"), "ok")).column("id").combine_chunks())
    return pa.concat_arrays(failed) if failed else pa.array([], pa.string())


def selected_records(cfg: Config, select: str | None = None) -> pa.Table:
    """Records that survived: ok, not a hash or copy duplicate, not contaminated, `select` true."""
    import pyarrow.compute as pc

    filters = finished_filters(cfg)
    dirs = [stage_dir(cfg, "ingest"), stage_dir(cfg, "hashdedup")]
    dirs += [stage_dir(cfg, s) for s in filters]
    if select and list_parts(stage_dir(cfg, "cluster")):
        dirs.append(stage_dir(cfg, "cluster"))  # the cluster path travels into the sample metadata
    column = None
    if select:
        sel_dir, column = _find_select(cfg, select)
        if sel_dir not in dirs:
            dirs.append(sel_dir)
    failed = _embed_failed_ids(cfg, filters)
    out = []
    for k in range(len(list_parts(dirs[0]))):
        t = read_aligned(dirs, k)
        mask = pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of")))
        if len(failed):
            mask = pc.and_(mask, pc.invert(pc.is_in(t.column("id"), value_set=failed)))
        for stage in filters:
            mask = pc.and_(mask, pc.invert(dropped_by(stage, t.column(DROP_FILTERS[stage][0]))))
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



def run(cfg: Config, force: bool = False) -> StageResult:
    """Write the surviving records as curated webdataset shards with a Parquet index."""
    from curate.ingest import CORE_COLUMNS
    from curate.shards import ShardRun, ShardSettings, write_shard

    sc = cfg.shards
    stages = ["ingest", "hashdedup", *finished_filters(cfg)]
    if sc.select:
        stages.append(_find_select(cfg, sc.select)[0].name)
    inputs = upstream(cfg, *stages)
    out = Path(sc.out) if sc.out else stage_dir(cfg, "shards")
    key = fingerprint({"config": asdict(sc), "inputs": inputs})
    prev = begin("shards", out, key, force)
    if prev:
        return prev
    t0 = time.time()
    selected = selected_records(cfg, sc.select)
    records = _expand_repeats(selected)  # a record chosen n times (balance.multiplier) is n samples
    dup_cols = {"dup_of", "dup_reason", "dup_group", "dup_distance", "raw_key", "error", "status", "selected",
                "repeats", "cluster_sq_dist", "copy_of", "copy_group", "copy_max_sim", "contaminated",
                "contam_reason", "contam_set"}
    meta = [c for c in records.column_names if c not in CORE_COLUMNS and c not in dup_cols]
    settings = ShardSettings(max_size=sc.max_size, max_count=sc.max_count, shuffle_seed=sc.shuffle_seed)
    raw_root = str(stage_dir(cfg, "ingest"))
    with ShardRun(records, out, settings, meta_columns=meta) as shard_run:
        jobs, todo = shard_run.jobs, shard_run.todo()
        with progress(len(jobs), "shards", "shard") as bar:
            bar.update(len(jobs) - len(todo))
            if cfg.executor == "ray":  # one task per shard, on any node; the driver writes the index
                from pipelines.executors import ray_map

                shard_run.commit_plan()  # the tasks read their rows from the saved plan
                for _ in ray_map(write_shard, [(raw_root, str(out), *job) for job in todo], cfg.ray_address):
                    bar.update(1)
            else:  # in this process, from the plan in memory
                for job in todo:
                    shard_run.write(raw_root, *job)
                    bar.update(1)
        info = shard_run.finish()
    result = StageResult("shards", str(out), key, counts={
        "in": selected.num_rows, "out": info["samples"] - (records.num_rows - selected.num_rows), "dropped": {},
        "samples": info["samples"], "shards": info["shards"],
        "bytes": info["bytes"]}, seconds=time.time() - t0,
        outputs={"shards": str(out), "index": str(out / "index.parquet")})
    finish(result, asdict(sc), inputs)
    return result
