"""Curated webdataset shards: a deterministic plan, atomic shard files, a Parquet index, verify.

The plan (which sample goes to which shard, in which order) is fixed first and saved, then each
shard is written to a temporary name and renamed, so a killed run resumes shard by shard and
ends with byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring_ascii
import os
import shutil
import tarfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import SyncedWrite, atomic_path, clean_temporaries, ensure_dir
from curate.tars import BLOCK, RECORD, TarReader, write_members

INDEX_NAME = "index.parquet"
PLAN_NAME = "_plan.parquet"
INDEX_ROW_GROUP = 65536  # rows per row group of the index
NEEDED = ["id", "uri", "raw_shard", "raw_offset", "nbytes", "ext", "sha256", "width", "height"]


@dataclass(frozen=True)
class ShardSettings:
    """Bounds and order of the output shards."""

    max_size: int = 512 * 2**20  # bytes per shard file (a single larger sample gets a shard of its own)
    max_count: int = 10_000      # samples per shard
    shuffle_seed: int | None = 0  # None keeps id order


def shard_name(i: int) -> str:
    """File name of shard i (shard-000000.tar)."""
    return f"shard-{i:06d}.tar"


def plan_shards(records: pa.Table, settings: ShardSettings, meta_columns: Sequence[str] = ()) -> pa.Table:
    """Order the records (by key, then a seeded shuffle) and cut them into bounded shards.

    The sample key is the record id, or a `key` column when records repeat (`<id>_r1`, ...).
    Where records have a `name` (ingest's location-independent name), it is the `uri` the shards
    and their index carry, so the same data gives byte-identical shards wherever it lives."""
    t = _plan_columns(records, meta_columns)
    keep = t.column_names
    t = t.sort_by("key")
    if settings.shuffle_seed is not None and t.num_rows:
        perm = np.random.default_rng(settings.shuffle_seed).permutation(t.num_rows)
        t = t.take(pa.array(perm))
    return _add_shards(t, keep, settings)[0]


def padded_np(sizes: np.ndarray) -> np.ndarray:
    """`curate.tars.padded` over an array."""
    return (sizes.astype(np.int64) + BLOCK - 1) // BLOCK * BLOCK


def _cut(need: np.ndarray, settings: ShardSettings,
         state: tuple[int, int, int] = (0, 0, 0)) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Shard number of each sample (bytes `need` each, in order) and the state after the last: a shard
    takes samples while it has fewer than max_count and its tar file stays within max_size; a sample is
    never split, so one larger than max_size gets a shard of its own. `state` (shard, samples, bytes)
    carries an open shard over from samples cut before. (tar_file_size(c) <= max_size exactly when the
    member bytes c <= limit below; a search per shard, not a Python step per sample.)"""
    ends = np.concatenate([[0], np.cumsum(need)])
    limit = settings.max_size // RECORD * RECORD - 2 * BLOCK
    shard_ids = np.empty(len(need), dtype=np.int64)
    cur, count, used = state
    start = 0
    while start < len(need):
        stop = int(np.searchsorted(ends, ends[start] + limit - used, side="right")) - 1
        stop = min(stop, start + settings.max_count - count)
        if stop <= start:  # the next sample does not fit the open shard
            if count:
                cur, count, used = cur + 1, 0, 0
                continue
            stop = start + 1
        shard_ids[start:stop] = cur
        count, used = count + stop - start, used + int(ends[stop] - ends[start])
        if stop < len(need):  # it stopped because the next sample does not fit
            cur, count, used = cur + 1, 0, 0
        start = stop
    return shard_ids, (cur, count, used)


def _add_shards(t: pa.Table, keep: Sequence[str], settings: ShardSettings,
                state: tuple[int, int, int] = (0, 0, 0)) -> tuple[pa.Table, tuple[int, int, int]]:
    """Rows in plan order with their shard and json metadata columns; `state` carries the cut over from
    the rows before (plan_shards cuts all rows at once, the external plan a range at a time)."""
    metas = _sample_metas(t, keep)
    need = 2 * BLOCK + padded_np(t.column("nbytes").to_numpy()) + padded_np(pc.binary_length(metas).to_numpy())
    shard_ids, after = _cut(need.astype(np.int64), settings, state)
    names = pa.array([shard_name(i) for i in range(state[0], after[0] + 1)], type=pa.string())
    t = t.append_column("shard", names.take(pa.array(shard_ids - state[0])))
    return t.append_column("meta", metas), after


_META_SKIP = {"raw_shard", "raw_offset", "nbytes", "ext", "key"}
_META_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(meta, sort_keys=True, default=str)


def _sample_metas(t: pa.Table, columns: Sequence[str]) -> pa.ChunkedArray:
    """The json metadata of every row: its non-null columns except the shard bookkeeping, sorted keys,
    exactly as `json.dumps(row, sort_keys=True, default=str)` writes it, built a column at a time
    (`"key": value` pieces joined by Arrow; only strings that need escaping and types other than
    strings, integers and booleans go through the json encoder, one value at a time)."""
    names = sorted(c for c in columns if c not in _META_SKIP)
    if not t.num_rows or not names:
        return pa.chunked_array([pa.array(["{}"] * t.num_rows, type=pa.string())], type=pa.string())
    pieces = []
    for name in names:
        values = _json_values(t.column(name).combine_chunks())
        head = ", " + encode_basestring_ascii(name) + ": "
        pieces.append(pc.fill_null(pc.binary_join_element_wise(head, values, ""), ""))
    body = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*pieces, ""), 2)  # less the first ", "
    return pa.chunked_array([pc.binary_join_element_wise("{", body, "}", "")], type=pa.string())


_PLAIN_ASCII = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"  # printable ASCII but '"' and backslash: JSON as it is


def _json_values(col: pa.Array) -> pa.Array:
    """Each value as JSON text (json.dumps(v, default=str)), null where null."""
    if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        return pc.cast(col, pa.string())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if pc.all(pc.match_substring_regex(col, _PLAIN_ASCII)).as_py() is not False:
            return pc.binary_join_element_wise('"', col.cast(pa.string()), '"', "")
        return pa.array([None if v is None else encode_basestring_ascii(v) for v in col.to_pylist()], type=pa.string())
    return pa.array([None if v is None else _META_JSON.encode(v) for v in col.to_pylist()], type=pa.string())


def prepare_shards(records: pa.Table, out_dir: str | os.PathLike, settings: ShardSettings = ShardSettings(),
                   meta_columns: Sequence[str] = ()) -> list[tuple[str, int, int]]:
    """Fix the plan once (`_plan.parquet`, kept across reruns); returns each shard's name and plan rows.

    The plan is sorted by shard, so shard i is the row range [lo, hi); it is written in row groups of
    at most `max_count` rows, so a writer reads only the groups of its shard."""
    run = ShardRun(records, out_dir, settings, meta_columns, index=False)
    run.commit_plan()
    return run.jobs


class ShardRun:
    """One run of the shards stage in this process: the plan (made and saved once), the shards this
    process writes from the plan in memory, then the index.

    A new plan and its index are written at once and fsynced on background threads while the shards
    are written (`curate.parts.SyncedWrite`); the plan is renamed into place before the first shard,
    the index after the last, as before. A resumed run reads the saved plan once.
    """

    def __init__(self, records: pa.Table, out_dir: str | os.PathLike, settings: ShardSettings = ShardSettings(),
                 meta_columns: Sequence[str] = (), index: bool = True) -> None:
        self.out = ensure_dir(out_dir)
        clean_temporaries(self.out)
        self._plan: pa.Table | None = None
        self._pending: dict[str, SyncedWrite] = {}
        plan_path = self.out / PLAN_NAME
        if plan_path.exists():
            names = pq.read_table(plan_path, columns=["shard"]).column("shard")
        else:
            self._plan = plan_shards(records, settings, meta_columns)
            group = max(1, min(settings.max_count, 65536))
            if _parquet_round_trip(self._plan.schema):  # written on a thread of its own, while shards are written
                plan = self._plan
                self._pending[PLAN_NAME] = SyncedWrite(plan_path, lambda tmp: pq.write_table(
                    plan, tmp, compression="zstd", write_statistics=True, row_group_size=group), in_background=True)
            else:  # a type Parquet gives back otherwise (a list's child is named "element" on reading):
                # use the plan as read, so the index has the bytes a resumed run writes
                self._pending[PLAN_NAME] = SyncedWrite(plan_path, lambda tmp: pq.write_table(
                    self._plan, tmp, compression="zstd", write_statistics=True, row_group_size=group))
                self._plan = pq.read_table(self._pending[PLAN_NAME].tmp)
            names = self._plan.column("shard")  # what was just written: not read back
        self.jobs = _jobs(names.combine_chunks())
        if index and not (self.out / INDEX_NAME).exists():
            plan = self.plan()
            self._pending[INDEX_NAME] = SyncedWrite(self.out / INDEX_NAME, lambda tmp: write_index(plan, tmp),
                                                    in_background=True)

    def plan(self) -> pa.Table:
        """The plan table (read from disk once when this run did not make it)."""
        if self._plan is None:
            self._plan = pq.read_table(self.out / PLAN_NAME)
        return self._plan

    def commit_plan(self) -> None:
        """Make the new plan durable and visible (before any shard, and before tasks elsewhere read it)."""
        pending = self._pending.pop(PLAN_NAME, None)
        if pending is not None:
            with pending:
                pending.commit()

    def todo(self) -> list[tuple[str, int, int]]:
        """The shards of the plan not on disk yet."""
        return [job for job in self.jobs if not (self.out / job[0]).exists()]

    def write(self, raw_root: str | os.PathLike, name: str, lo: int, hi: int) -> None:
        """Write shard `name` (plan rows [lo, hi)) from the plan in memory; the plan is renamed into
        place before the shard is."""
        write_shard_rows(raw_root, self.out, name, self.plan().slice(lo, hi - lo), before_rename=self.commit_plan)

    def finish(self) -> dict:
        """Check every planned shard is on disk, then write the index; returns the counts."""
        pending = self._pending.pop(INDEX_NAME, None)
        self.commit_plan()
        if pending is None:
            return finish_shards(self.out, self.jobs, self._plan)
        with pending:
            _check_complete(self.out, self.jobs)
            pending.commit()
        return finish_shards(self.out, self.jobs)

    def close(self) -> None:
        """Drop what was not committed (after an error)."""
        for pending in self._pending.values():
            pending.__exit__(RuntimeError, None, None)
        self._pending.clear()

    def __enter__(self) -> ShardRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parquet_round_trip(schema: pa.Schema) -> bool:
    """Whether a table of this schema reads back from Parquet with the same schema."""
    import io

    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    back = pq.read_schema(pa.BufferReader(buf.getvalue()))
    return back.to_string(show_schema_metadata=False) == schema.to_string(show_schema_metadata=False)


_INDEX_DROP = ("raw_shard", "raw_offset", "meta")  # plan columns the index leaves out


def write_index(plan: pa.Table, path: str | os.PathLike) -> None:
    """The index (the plan less the raw-shard bookkeeping and the json) as Parquet at `path`, not synced."""
    pq.write_table(plan.drop_columns(list(_INDEX_DROP)), path, compression="zstd", write_statistics=True,
                   row_group_size=INDEX_ROW_GROUP)


def copy_index(plan_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """write_index of the plan file at plan_path, read a row group's worth of rows at a time."""
    plan = pq.ParquetFile(plan_path)
    schema = pa.schema([f for f in plan.schema_arrow if f.name not in _INDEX_DROP])
    with pq.ParquetWriter(path, schema, compression="zstd", write_statistics=True) as writer:
        for batch in plan.iter_batches(batch_size=INDEX_ROW_GROUP, columns=schema.names):
            writer.write_batch(batch, row_group_size=INDEX_ROW_GROUP)


def _jobs(names: pa.Array) -> list[tuple[str, int, int]]:
    """(shard, lo, hi) of each run of equal names in the plan's shard column."""
    if not len(names):
        return []
    changes = pc.not_equal(names.slice(0, len(names) - 1), names.slice(1)).to_numpy(zero_copy_only=False)
    bounds = np.concatenate([[0], np.flatnonzero(changes) + 1, [len(names)]]).astype(np.int64)
    return [(names[int(lo)].as_py(), int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


PLAN_BUCKET_ROWS = 262_144  # samples held in memory at a time while planning (a key range, then a plan range)
_SAMPLE_KEYS = 100_000     # keys sampled over all parts to cut the key ranges


def prepare_shards_parts(read_part: Callable[[int], pa.Table], n_parts: int, out_dir: str | os.PathLike,
                         settings: ShardSettings = ShardSettings(), meta_columns: Sequence[str] = (),
                         bucket_rows: int = PLAN_BUCKET_ROWS) -> list[tuple[str, int, int]]:
    """`prepare_shards` for records given part by part: `read_part(k)` (k < n_parts) returns the records
    of part k, in order; the plan is `plan_shards` of all parts' records concatenated, row for row, and
    the file the same as `prepare_shards` writes for them.

    Memory is bounded by `bucket_rows` samples and the shuffle (4 bytes a sample; 8 while it is
    inverted), not by the records: an external sort. Pass 1 spills each part's columns of the plan (to a
    `.plan.tmp-*` folder in out_dir) and samples its keys; pass 2 routes the rows to key ranges cut at
    quantiles of the sample; pass 3 sorts one key range at a time, which gives every sample its rank in
    key order, hence its plan row through the inverse of the seeded permutation, and routes it to a range
    of plan rows; pass 4 orders one plan range at a time, adds the JSON metadata and the shard (the
    cutting carries over from range to range) and appends it to the plan."""
    out = ensure_dir(out_dir)
    clean_temporaries(out)
    plan_path = out / PLAN_NAME
    if not plan_path.exists():
        spill = out / f".plan.tmp-{uuid.uuid4().hex[:8]}"
        spill.mkdir()
        try:
            with atomic_path(plan_path) as tmp:
                _plan_external(read_part, n_parts, spill, tmp, settings, meta_columns, max(1, bucket_rows))
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    return plan_jobs(plan_path)


def plan_jobs(plan_path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Each shard's name and plan rows [lo, hi), read a row group at a time."""
    jobs: list[tuple[str, int, int]] = []
    start = 0
    for batch in pq.ParquetFile(plan_path).iter_batches(columns=["shard"]):
        names = batch.column(0)
        if not len(names):
            continue
        changes = pc.not_equal(names.slice(0, len(names) - 1), names.slice(1)).to_numpy(zero_copy_only=False)
        heads = np.concatenate([[0], np.flatnonzero(changes) + 1]).astype(np.int64)
        for h in heads.tolist():
            name = names[h].as_py()
            if jobs and jobs[-1][0] == name:
                continue
            if jobs:
                jobs[-1] = (jobs[-1][0], jobs[-1][1], start + h)
            jobs.append((name, start + h, -1))
        start += len(names)
    if jobs:
        jobs[-1] = (jobs[-1][0], jobs[-1][1], start)
    return jobs


def _plan_columns(t: pa.Table, meta_columns: Sequence[str]) -> pa.Table:
    """A part's records as plan_shards takes them: uri from name, key (default: id), the needed columns
    and the metadata columns present, in plan order."""
    missing = [c for c in NEEDED if c not in t.column_names]
    if missing:
        raise ValueError(f"records lack columns needed for shards: {missing}")
    if "name" in t.column_names:
        t = t.set_column(t.column_names.index("uri"), "uri", t.column("name"))
    if "key" not in t.column_names:
        t = t.append_column("key", t.column("id"))
    keep = ["key", *NEEDED] + [c for c in meta_columns if c in t.column_names and c not in (*NEEDED, "key")]
    return t.select(keep)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """t with exactly the schema's columns, in its order and types (absent ones null), as
    pa.concat_tables(promote_options="permissive") gives them."""
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


class _Spool:
    """Tables appended to numbered Arrow IPC files, buffered up to a byte budget."""

    def __init__(self, directory: Path, prefix: str, schema: pa.Schema, budget: int = 64 << 20) -> None:
        self.directory, self.prefix, self.schema, self.budget = directory, prefix, schema, budget
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.buffer: dict[int, list[pa.Table]] = {}
        self.size = 0

    def path(self, b: int) -> Path:
        return self.directory / f"{self.prefix}-{b}.arrow"

    def add(self, b: int, t: pa.Table) -> None:
        if t.num_rows:
            self.buffer.setdefault(b, []).append(t)
            self.size += t.nbytes
            if self.size > self.budget:
                self.flush()

    def flush(self) -> None:
        for b, tables in self.buffer.items():
            if b not in self.writers:
                self.writers[b] = pa.ipc.new_stream(str(self.path(b)), self.schema)
            self.writers[b].write_table(pa.concat_tables(tables))
        self.buffer.clear()
        self.size = 0

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()

    def read(self, b: int) -> pa.Table:
        """Everything appended to b (empty when nothing was); the file is removed."""
        path = self.path(b)
        if not path.exists():
            return self.schema.empty_table()
        with pa.OSFile(str(path)) as fh:
            t = pa.ipc.open_stream(fh).read_all()
        path.unlink()
        return t


def _plan_external(read_part: Callable[[int], pa.Table], n_parts: int, spill: Path, plan_tmp: Path,
                   settings: ShardSettings, meta_columns: Sequence[str], bucket_rows: int) -> None:
    # pass 1: each part's plan columns spilled, its row count, a sample of its keys
    schemas, counts, samples = [], [], []
    per_part = max(1, -(-_SAMPLE_KEYS // max(1, n_parts)))
    for k in range(n_parts):
        t = _plan_columns(read_part(k), meta_columns)
        schemas.append(t.schema)
        counts.append(t.num_rows)
        with pa.OSFile(str(spill / f"part-{k}.arrow"), "wb") as fh, pa.ipc.new_stream(fh, t.schema) as w:
            w.write_table(t)
        if t.num_rows:
            at = np.unique(np.linspace(0, t.num_rows - 1, min(per_part, t.num_rows)).astype(np.int64))
            samples.append(t.column("key").take(pa.array(at)).combine_chunks().cast(pa.string()))
        del t
    if n_parts == 0:
        raise ValueError("no records to plan shards for (no parts)")
    schema = pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1 else schemas[0]
    keep = ["key", *NEEDED] + [c for c in meta_columns if c in schema.names and c not in (*NEEDED, "key")]
    schema = pa.schema([schema.field(c) for c in keep])
    n = int(sum(counts))
    n_keys = max(1, -(-n // bucket_rows))
    sample = pa.concat_arrays(samples) if samples else pa.array([], pa.string())
    sample = sample.take(pc.sort_indices(sample)).to_numpy(zero_copy_only=False)
    cut_at = (np.arange(1, n_keys) * len(sample)) // n_keys
    splitters = np.unique(sample[cut_at]) if len(sample) else np.empty(0, dtype=object)
    del samples, sample

    # pass 2: rows to key ranges, with their row number in the concatenation (ties keep that order)
    work = schema.append(pa.field("_g", pa.int64()))
    by_key = _Spool(spill, "key", work)
    start = 0
    for k in range(n_parts):
        with pa.OSFile(str(spill / f"part-{k}.arrow")) as fh:
            t = _conform(pa.ipc.open_stream(fh).read_all(), schema)
        (spill / f"part-{k}.arrow").unlink()
        t = t.append_column("_g", pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))
        start += t.num_rows
        keys = t.column("key").combine_chunks().cast(pa.string()).to_numpy(zero_copy_only=False)
        bucket = np.searchsorted(splitters, keys, side="right") if len(splitters) else np.zeros(len(keys), np.int64)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(len(splitters) + 2))
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                by_key.add(b, t.take(pa.array(order[lo:hi])))
        del t, keys
    by_key.close()

    # pass 3: key order -> plan row (the inverse of the seeded permutation) -> plan ranges
    if settings.shuffle_seed is not None and n:
        inv = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        np.random.default_rng(settings.shuffle_seed).shuffle(inv)  # == Generator.permutation(n), as plan_shards
        perm, inv = inv, np.empty_like(inv)
        step = 1 << 20
        for lo in range(0, n, step):
            inv[perm[lo:lo + step]] = np.arange(lo, min(n, lo + step), dtype=inv.dtype)
        del perm
    else:
        inv = None
    rows_per_group = max(1, min(settings.max_count, 65536))
    span = rows_per_group * max(1, bucket_rows // rows_per_group)  # a plan range is whole row groups
    by_row = _Spool(spill, "row", schema.append(pa.field("_o", pa.int64())))
    rank = 0
    for b in range(len(splitters) + 1):
        t = by_key.read(b)
        t = t.take(pc.sort_indices(t, sort_keys=[("key", "ascending"), ("_g", "ascending")]))
        ranks = np.arange(rank, rank + t.num_rows, dtype=np.int64)
        rank += t.num_rows
        row = ranks if inv is None else inv[ranks].astype(np.int64)
        t = t.drop_columns(["_g"]).append_column("_o", pa.array(row))
        dest = row // span
        order = np.argsort(dest, kind="stable")
        bounds = np.searchsorted(dest[order], np.arange(-(-n // span) + 1))
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                by_row.add(j, t.take(pa.array(order[lo:hi])))
        del t
    by_row.close()
    del inv

    # pass 4: each plan range in order, its metadata and shards, appended to the plan
    out_schema = schema.append(pa.field("shard", pa.string())).append(pa.field("meta", pa.string()))
    state = (0, 0, 0)
    with pq.ParquetWriter(plan_tmp, out_schema, compression="zstd", write_statistics=True) as writer:
        for j in range(max(1, -(-n // span))):
            t = by_row.read(j)
            o = t.column("_o").to_numpy() - j * span
            if not np.array_equal(np.sort(o), np.arange(min(span, n - j * span))):
                raise AssertionError(f"plan range {j} is incomplete")
            t = t.take(pa.array(np.argsort(o))).drop_columns(["_o"])
            t, state = _add_shards(t, keep, settings, state)
            writer.write_table(t, row_group_size=rows_per_group)


def write_shard(raw_root: str | os.PathLike, out_dir: str | os.PathLike, name: str, lo: int, hi: int) -> int:
    """Write shard `name` (plan rows [lo, hi)) unless it exists; returns its sample count.

    Idempotent and atomic, so a writer lost with its node can simply run again (or twice at once)."""
    out = Path(out_dir)
    if (out / name).exists():
        return hi - lo
    write_shard_rows(raw_root, out, name, _plan_rows(out / PLAN_NAME, lo, hi))
    return hi - lo


def write_shard_rows(raw_root: str | os.PathLike, out: Path, name: str, rows: pa.Table,
                     before_rename: Callable[[], None] | None = None) -> None:
    """Write shard `name` from its plan rows (read from the plan file, or sliced from the plan in memory);
    `before_rename` runs once the shard is written, while it is fsynced, before it is renamed into place."""
    if rows.num_rows and rows.column("shard")[0].as_py() != name:
        raise ValueError(f"{out / PLAN_NAME} rows are not shard {name}; the plan changed")
    keys, exts = rows.column("key").to_pylist(), rows.column("ext").to_pylist()
    metas = rows.column("meta").cast(pa.binary()).to_pylist()
    sizes = rows.column("nbytes").to_pylist()
    # members of a sample in sorted-extension order (as write_samples): the image first when its
    # extension sorts before "json" (jpg, jpeg), after it otherwise (png, webp, ...)
    first = [ext < "json" for ext in exts]
    names, member_sizes = [], []
    for key, ext, meta, size, image_first in zip(keys, exts, metas, sizes, first):
        if image_first:
            names += (f"{key}.{ext}", f"{key}.json")
            member_sizes += (size, len(meta))
        else:
            names += (f"{key}.json", f"{key}.{ext}")
            member_sizes += (len(meta), size)
    if "json" in exts:
        raise ValueError(f"{out / PLAN_NAME}: an image with extension json cannot sit beside its json metadata")
    spans = zip(rows.column("raw_shard").to_pylist(), rows.column("raw_offset").to_pylist(), sizes)

    with TarReader(raw_root) as reader:
        def data() -> Iterator[bytes]:
            for (raw_shard, offset, size), meta, image_first in zip(spans, metas, first):
                image = reader.read(raw_shard, offset, size)
                yield from ((image, meta) if image_first else (meta, image))

        with SyncedWrite(out / name, lambda tmp: write_members(tmp, names, member_sizes, data())) as shard:
            if before_rename is not None:
                before_rename()
            shard.commit()


def _plan_rows(plan_path: Path, lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of the plan, reading only the row groups that hold them."""
    f = pq.ParquetFile(plan_path)
    groups, start = [], 0
    first = None
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if start < hi and start + n > lo:
            groups.append(g)
            first = start if first is None else first
        start += n
    if not groups:
        return f.schema_arrow.empty_table()
    return f.read_row_groups(groups).slice(lo - first, hi - lo)


def finish_shards(out_dir: str | os.PathLike, jobs: Sequence[tuple[str, int, int]],
                  plan: pa.Table | None = None) -> dict:
    """Write the index (once) after every shard of the plan is written; returns the counts.

    `plan`: the plan table when the caller holds it (else it is read from `_plan.parquet`)."""
    out = Path(out_dir)
    _check_complete(out, jobs)
    if not (out / INDEX_NAME).exists():
        with atomic_path(out / INDEX_NAME) as tmp:
            if plan is not None:
                write_index(plan, tmp)
            else:  # the plan on disk, copied a row group at a time (same bytes as write_index)
                copy_index(out / PLAN_NAME, tmp)
    clean_temporaries(out)  # a writer lost with its node may have left a temporary file
    return {"samples": int(sum(hi - lo for _, lo, hi in jobs)), "shards": len(jobs),
            "bytes": int(sum((out / n).stat().st_size for n, _, _ in jobs))}


def _check_complete(out: Path, jobs: Sequence[tuple[str, int, int]]) -> None:
    missing = [name for name, _, _ in jobs if not (out / name).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} planned shard(s) missing in {out}, e.g. {missing[0]}; rerun to finish")


def write_shards(records: pa.Table, raw_root: str | os.PathLike, out_dir: str | os.PathLike,
                 settings: ShardSettings = ShardSettings(), meta_columns: Sequence[str] = (),
                 on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Write the records' original bytes into shards under `out_dir` in this process; resumes shard by shard."""
    with ShardRun(records, out_dir, settings, meta_columns) as run:
        todo = {name for name, _, _ in run.todo()}
        for name, lo, hi in run.jobs:
            if name in todo:
                run.write(raw_root, name, lo, hi)
            if on_shard:
                on_shard(name, hi - lo)
        return {**run.finish(), "shards_written": len(todo)}


@dataclass
class VerifyReport:
    """What `verify_shards` found; ok when no errors."""

    shards: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_shards(out_dir: str | os.PathLike, max_errors: int = 50) -> VerifyReport:
    """Read every shard back; check sample counts, keys and sha256 against the index."""
    out = Path(out_dir)
    report = VerifyReport()
    index_path = out / INDEX_NAME
    if not index_path.exists():
        report.errors.append(f"no {INDEX_NAME} in {out}")
        return report
    index = pq.read_table(index_path, columns=["key", "shard", "ext", "sha256"]).to_pylist()
    expected: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for row in index:
        expected[row["shard"]][row["key"]] = (row["ext"], row["sha256"])
    on_disk = sorted(p.name for p in out.glob("shard-*.tar"))
    for extra in sorted(set(on_disk) - set(expected)):
        report.errors.append(f"{extra}: shard not in the index")
    for name in sorted(expected):
        report.shards += 1
        path = out / name
        if not path.exists():
            report.errors.append(f"{name}: missing")
            continue
        seen: dict[str, str] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    key, _, ext = info.name.partition(".")
                    want = expected[name].get(key)
                    if want is None:
                        report.errors.append(f"{name}: unexpected member {info.name}")
                    elif ext == want[0]:
                        digest = hashlib.sha256(tf.extractfile(info).read()).hexdigest()
                        seen[key] = digest
                        if digest != want[1]:
                            report.errors.append(f"{name}: {info.name} sha256 mismatch")
        except (tarfile.TarError, OSError) as exc:
            report.errors.append(f"{name}: unreadable ({exc})")
            continue
        missing = set(expected[name]) - set(seen)
        if missing:
            report.errors.append(f"{name}: {len(missing)} samples missing, e.g. {sorted(missing)[0]}")
        report.samples += len(seen)
        if len(report.errors) >= max_errors:
            break
    return report
