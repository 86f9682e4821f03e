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


class Selection:
    """Which records survive, part by part: ok, not a hash or copy duplicate, not contaminated, not failed
    to embed in an embedding a filter used, `select` true."""

    def __init__(self, cfg: Config, select: str | None = None) -> None:
        self.filters = finished_filters(cfg)
        dirs = [stage_dir(cfg, "ingest"), stage_dir(cfg, "hashdedup")]
        dirs += [stage_dir(cfg, s) for s in self.filters]
        if select and list_parts(stage_dir(cfg, "cluster")):
            dirs.append(stage_dir(cfg, "cluster"))  # the cluster path travels into the sample metadata
        self.column = None
        if select:
            sel_dir, self.column = _find_select(cfg, select)
            if sel_dir not in dirs:
                dirs.append(sel_dir)
        self.dirs = dirs
        self.n_parts = len(list_parts(dirs[0]))
        self.failed = _embed_failed_ids(cfg, self.filters)

    def columns(self) -> list[str]:
        """The column names of a part's records, in `read_aligned`'s order."""
        names: list[str] = []
        for d in self.dirs:
            parts = list_parts(d)
            for name in (pq.read_schema(parts[0]).names if parts else []):
                if name not in names:
                    names.append(name)
        return names

    def part(self, k: int, columns: list[str] | None = None) -> pa.Table:
        """The surviving records of part k (all columns, or `columns` and those the selection reads)."""
        import pyarrow.compute as pc

        want = None
        if columns is not None:
            need = ["id", "status", "dup_of", *(DROP_FILTERS[s][0] for s in self.filters),
                    *([self.column] if self.column else []), *columns]
            want = {str(d): need for d in self.dirs}
        t = read_aligned(self.dirs, k, want)
        mask = pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of")))
        if len(self.failed):
            mask = pc.and_(mask, pc.invert(pc.is_in(t.column("id"), value_set=self.failed)))
        for stage in self.filters:
            mask = pc.and_(mask, pc.invert(dropped_by(stage, t.column(DROP_FILTERS[stage][0]))))
        if self.column:
            mask = pc.and_(mask, pc.fill_null(t.column(self.column), False))
        return t.filter(mask)


def selected_records(cfg: Config, select: str | None = None) -> pa.Table:
    """Records that survived (`Selection`), all parts concatenated."""
    sel = Selection(cfg, select)
    return pa.concat_tables([sel.part(k) for k in range(sel.n_parts)], promote_options="permissive")



def _expand_repeats(records: pa.Table, key: bool = False) -> pa.Table:
    """A record selected n > 1 times (balance multiplier) becomes n samples: <id>, <id>_r1, ...
    (`key`: always add the sample key column, the id where a record is one sample)."""
    import numpy as np

    reps = (np.maximum(records.column("repeats").fill_null(1).to_numpy(zero_copy_only=False), 1)
            if "repeats" in records.column_names else None)
    if reps is None or (reps == 1).all():
        return records.append_column("key", records.column("id").cast(pa.string())) if key else records
    take = np.repeat(np.arange(records.num_rows), reps)
    nth = np.arange(len(take)) - np.repeat(np.cumsum(reps) - reps, reps)
    ids = records.column("id").to_pylist()
    keys = [ids[i] if k == 0 else f"{ids[i]}_r{k}" for i, k in zip(take.tolist(), nth.tolist())]
    return records.take(pa.array(take)).append_column("key", pa.array(keys, type=pa.string()))


# columns of the pipeline's bookkeeping, never sample metadata
_BOOKKEEPING = {"dup_of", "dup_reason", "dup_group", "dup_distance", "raw_key", "error", "status", "selected",
                "repeats", "cluster_sq_dist", "copy_of", "copy_group", "copy_max_sim", "contaminated",
                "contam_reason", "contam_set"}


def plan_parts(cfg: Config, out: Path) -> tuple[list[tuple[str, int, int]], int, int]:
    """The shard plan in `out` (made part by part, `curate.shards.prepare_shards_parts`, unless it is
    there): returns (jobs, selected records, samples)."""
    from curate.ingest import CORE_COLUMNS
    from curate.shards import PLAN_NAME, ShardSettings, prepare_shards_parts

    sc = cfg.shards
    sel = Selection(cfg, sc.select)
    meta = [c for c in sel.columns() if c not in CORE_COLUMNS and c not in _BOOKKEEPING]
    settings = ShardSettings(max_size=sc.max_size, max_count=sc.max_count, shuffle_seed=sc.shuffle_seed)
    n = {"selected": 0, "samples": 0}

    def read_part(k: int, columns: list[str] | None = None) -> pa.Table:
        t = sel.part(k, columns)
        n["selected"] += t.num_rows
        t = _expand_repeats(t, key=True)  # a record chosen n times (balance.multiplier) is n samples
        n["samples"] += t.num_rows
        return t

    if (out / PLAN_NAME).exists():  # planned before: count what it holds
        for k in range(sel.n_parts):
            read_part(k, ["repeats"])
    jobs = prepare_shards_parts(read_part, sel.n_parts, out, settings, meta)
    return jobs, n["selected"], n["samples"]


def _pool_records(cfg: Config) -> int:
    """Records ingest wrote (from the Parquet footers, nothing read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in list_parts(stage_dir(cfg, "ingest")))


def run(cfg: Config, force: bool = False) -> StageResult:
    """Write the surviving records as curated webdataset shards with a Parquet index.

    Up to PLAN_BUCKET_ROWS ingested records the plan is made in memory and the shards are written from
    it while the plan and the index are saved (`curate.shards.ShardRun`); above, it is made part by part
    by an external sort (`plan_parts`) and each shard reads its rows from the saved plan. Both give the
    plan of `plan_shards` over the selected records; which one runs depends only on the workdir."""
    from curate.shards import PLAN_BUCKET_ROWS, finish_shards

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
    raw_root = str(stage_dir(cfg, "ingest"))
    if _pool_records(cfg) <= PLAN_BUCKET_ROWS:
        info, n_selected, n_samples = _write_in_memory(cfg, out, raw_root)
    else:
        jobs, n_selected, n_samples = plan_parts(cfg, out)
        todo = [(raw_root, str(out), name, lo, hi) for name, lo, hi in jobs if not (out / name).exists()]
        with progress(len(jobs), "shards", "shard") as bar:
            bar.update(len(jobs) - len(todo))
            for _ in _write(cfg, todo):
                bar.update(1)
        info = finish_shards(out, jobs)
    result = StageResult("shards", str(out), key, counts={
        "in": n_selected, "out": info["samples"] - (n_samples - n_selected), "dropped": {},
        "samples": info["samples"], "shards": info["shards"],
        "bytes": info["bytes"]}, seconds=time.time() - t0,
        outputs={"shards": str(out), "index": str(out / "index.parquet")})
    finish(result, asdict(sc), inputs)
    return result


def _write(cfg: Config, todo: list[tuple]):
    """write_shard of every job: Ray tasks (one per shard, on any node) or in this process."""
    from curate.shards import write_shard

    if cfg.executor == "ray":
        from pipelines.executors import ray_map

        for _ in ray_map(write_shard, todo, cfg.ray_address):
            yield
    else:
        for job in todo:
            write_shard(*job)
            yield


def _write_in_memory(cfg: Config, out: Path, raw_root: str) -> tuple[dict, int, int]:
    """The plan made in memory (a small pool), shards written from it; (counts, selected, samples)."""
    from curate.ingest import CORE_COLUMNS
    from curate.shards import ShardRun, ShardSettings

    sc = cfg.shards
    selected = selected_records(cfg, sc.select)
    records = _expand_repeats(selected)  # a record chosen n times (balance.multiplier) is n samples
    meta = [c for c in records.column_names if c not in CORE_COLUMNS and c not in _BOOKKEEPING]
    settings = ShardSettings(max_size=sc.max_size, max_count=sc.max_count, shuffle_seed=sc.shuffle_seed)
    with ShardRun(records, out, settings, meta_columns=meta) as shard_run:
        jobs, todo = shard_run.jobs, shard_run.todo()
        with progress(len(jobs), "shards", "shard") as bar:
            bar.update(len(jobs) - len(todo))
            if cfg.executor == "ray":  # the tasks read their rows from the saved plan
                shard_run.commit_plan()
                for _ in _write(cfg, [(raw_root, str(out), *job) for job in todo]):
                    bar.update(1)
            else:  # in this process, from the plan in memory
                for job in todo:
                    shard_run.write(raw_root, *job)
                    bar.update(1)
        return shard_run.finish(), selected.num_rows, records.num_rows
