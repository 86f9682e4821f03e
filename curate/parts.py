"""Parquet parts on disk: atomic writes, ordered listing, row-aligned reads across stages.

A part is written to a temporary name and renamed when complete, so a crash never leaves a half
part that looks whole. Stages add columns in their own directory, row-aligned with ingest parts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_RE = re.compile(r"^part-(\d{5,})(\.[a-z]+)$")  # part-00000.parquet, part-00000.npy


def part_name(index: int) -> str:
    """File name of part `index` (part-00000.parquet)."""
    return f"part-{index:05d}.parquet"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir():
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file atomically (deterministic bytes for the same table)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)


def clean_temporaries(directory: str | os.PathLike) -> int:
    """Remove leftovers of interrupted atomic writes; returns how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    removed = 0
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed += 1
    return removed


def list_parts(directory: str | os.PathLike, suffix: str = ".parquet") -> list[Path]:
    """Complete parts in `directory` (`part-XXXXX<suffix>`), ordered by part number."""
    directory = Path(directory)
    if not directory.exists():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PART_RE.match(p.name)) and m.group(2) == suffix]
    return [p for _, p in sorted(found)]


def read_table(directory: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """All parts of a stage as one table (schemas unified; missing columns become nulls)."""
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"no parts in {directory}")
    tables = [_read_part(p, columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def _read_part(path: Path, columns: Sequence[str] | None) -> pa.Table:
    if columns is None:
        return pq.read_table(path)
    present = set(pq.read_schema(path).names)
    return pq.read_table(path, columns=[c for c in columns if c in present])


def read_aligned(stage_dirs: Sequence[str | os.PathLike], index: int,
                 columns: dict[str, Sequence[str]] | None = None) -> pa.Table:
    """Part `index` of several stages joined column-wise; checks the `id` columns align."""
    base: pa.Table | None = None
    for d in stage_dirs:
        want = None if columns is None else columns.get(str(d))
        path = Path(d) / part_name(index)
        t = _read_part(path, None if want is None else ["id", *[c for c in want if c != "id"]])
        if base is None:
            base = t
            continue
        if t.num_rows != base.num_rows or not t.column("id").equals(base.column("id")):
            raise ValueError(f"{path} is not row-aligned with the ingest part {index}")
        for name in t.column_names:
            if name == "id":
                continue
            col = t.column(name)
            if name in base.column_names:
                base = base.set_column(base.column_names.index(name), name, col)
            else:
                base = base.append_column(name, col)
    assert base is not None
    return base
