"""Curated webdataset shards: a deterministic plan, atomic shard files, a Parquet index, verify.

The plan (which sample goes to which shard, in which order) is fixed first and saved, then each
shard is written to a temporary name and renamed, so a killed run resumes shard by shard and
ends with byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import atomic_path, clean_temporaries, ensure_dir, write_table_atomic
from curate.tars import TarReader, sample_nbytes, tar_file_size, write_samples

INDEX_NAME = "index.parquet"
PLAN_NAME = "_plan.parquet"
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
    missing = [c for c in NEEDED if c not in records.column_names]
    if missing:
        raise ValueError(f"records lack columns needed for shards: {missing}")
    if "name" in records.column_names:
        records = records.set_column(records.column_names.index("uri"), "uri", records.column("name"))
    if "key" not in records.column_names:
        records = records.append_column("key", records.column("id"))
    keep = ["key", *NEEDED] + [c for c in meta_columns if c in records.column_names and c not in (*NEEDED, "key")]
    t = records.select(keep).sort_by("key")
    if settings.shuffle_seed is not None and t.num_rows:
        perm = np.random.default_rng(settings.shuffle_seed).permutation(t.num_rows)
        t = t.take(pa.array(perm))
    metas = _sample_metas(t, keep)
    sizes = t.column("nbytes").to_numpy().tolist()
    meta_sizes = pc.binary_length(metas).to_numpy().tolist()
    shard_ids = np.empty(t.num_rows, dtype=np.int64)
    cur, count, used = 0, 0, 0
    for i, (n, m) in enumerate(zip(sizes, meta_sizes)):
        need = sample_nbytes((n, m))
        if count and (count >= settings.max_count or tar_file_size(used + need) > settings.max_size):
            cur, count, used = cur + 1, 0, 0
        shard_ids[i] = cur
        count, used = count + 1, used + need
    names = pa.array([shard_name(i) for i in range(cur + 1)], type=pa.string())
    t = t.append_column("shard", names.take(pa.array(shard_ids)))
    return t.append_column("meta", metas)


_META_SKIP = {"raw_shard", "raw_offset", "nbytes", "ext", "key"}
_META_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(meta, sort_keys=True, default=str)


def _sample_metas(t: pa.Table, columns: Sequence[str], chunk: int = 65536) -> pa.ChunkedArray:
    """The json metadata of every row: its non-null columns except the shard bookkeeping, sorted keys
    (built a chunk of rows at a time, so Python objects exist for one chunk only)."""
    names = [c for c in columns if c not in _META_SKIP]
    out = []
    for start in range(0, t.num_rows, chunk):
        part = t.slice(start, chunk)
        values = [part.column(c).to_pylist() for c in names]
        out.append(pa.array([_META_JSON.encode({c: v for c, v in zip(names, row) if v is not None})
                             for row in zip(*values)], type=pa.string()))
    return pa.chunked_array(out, type=pa.string())


def prepare_shards(records: pa.Table, out_dir: str | os.PathLike, settings: ShardSettings = ShardSettings(),
                   meta_columns: Sequence[str] = ()) -> list[tuple[str, int, int]]:
    """Fix the plan once (`_plan.parquet`, kept across reruns); returns each shard's name and plan rows.

    The plan is sorted by shard, so shard i is the row range [lo, hi); it is written in row groups of
    at most `max_count` rows, so a writer reads only the groups of its shard."""
    out = ensure_dir(out_dir)
    clean_temporaries(out)
    plan_path = out / PLAN_NAME
    if not plan_path.exists():
        planned = plan_shards(records, settings, meta_columns)
        with atomic_path(plan_path) as tmp:
            pq.write_table(planned, tmp, compression="zstd", write_statistics=True,
                           row_group_size=max(1, min(settings.max_count, 65536)))
    names = pq.read_table(plan_path, columns=["shard"]).column("shard").combine_chunks()
    if not len(names):
        return []
    changes = pc.not_equal(names.slice(0, len(names) - 1), names.slice(1)).to_numpy(zero_copy_only=False)
    bounds = np.concatenate([[0], np.flatnonzero(changes) + 1, [len(names)]]).astype(np.int64)
    return [(names[int(lo)].as_py(), int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def write_shard(raw_root: str | os.PathLike, out_dir: str | os.PathLike, name: str, lo: int, hi: int) -> int:
    """Write shard `name` (plan rows [lo, hi)) unless it exists; returns its sample count.

    Idempotent and atomic, so a writer lost with its node can simply run again (or twice at once)."""
    out = Path(out_dir)
    if (out / name).exists():
        return hi - lo
    rows = _plan_rows(out / PLAN_NAME, lo, hi)
    if rows.num_rows and rows.column("shard")[0].as_py() != name:
        raise ValueError(f"{out / PLAN_NAME} rows {lo}..{hi} are not shard {name}; the plan changed")
    cols = [rows.column(c).to_pylist() for c in ("key", "raw_shard", "raw_offset", "nbytes", "ext", "meta")]
    with TarReader(raw_root) as reader:
        samples = ({"__key__": key, ext: reader.read(raw_shard, offset, nbytes), "json": meta}
                   for key, raw_shard, offset, nbytes, ext, meta in zip(*cols))
        with atomic_path(out / name) as tmp:
            write_samples(tmp, samples)
    return hi - lo


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


def finish_shards(out_dir: str | os.PathLike, jobs: Sequence[tuple[str, int, int]]) -> dict:
    """Write the index (once) after every shard of the plan is written; returns the counts."""
    out = Path(out_dir)
    missing = [name for name, _, _ in jobs if not (out / name).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} planned shard(s) missing in {out}, e.g. {missing[0]}; rerun to finish")
    if not (out / INDEX_NAME).exists():
        index = pq.read_table(out / PLAN_NAME).drop_columns(["raw_shard", "raw_offset", "meta"])
        write_table_atomic(index, out / INDEX_NAME)
    clean_temporaries(out)  # a writer lost with its node may have left a temporary file
    return {"samples": int(sum(hi - lo for _, lo, hi in jobs)), "shards": len(jobs),
            "bytes": int(sum((out / n).stat().st_size for n, _, _ in jobs))}


def write_shards(records: pa.Table, raw_root: str | os.PathLike, out_dir: str | os.PathLike,
                 settings: ShardSettings = ShardSettings(), meta_columns: Sequence[str] = (),
                 on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Write the records' original bytes into shards under `out_dir` in this process; resumes shard by shard."""
    jobs = prepare_shards(records, out_dir, settings, meta_columns)
    written = 0
    for name, lo, hi in jobs:
        if not (Path(out_dir) / name).exists():
            write_shard(raw_root, out_dir, name, lo, hi)
            written += 1
        if on_shard:
            on_shard(name, hi - lo)
    return {**finish_shards(out_dir, jobs), "shards_written": written}


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
