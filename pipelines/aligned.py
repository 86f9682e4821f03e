"""Joins by part position. Every stage writes parts row-aligned with the ingest parts; an embedding
holds, per ingest part, a subsequence of that part's rows (the embedded ones, in order). So any
join is "part k, these positions", done with Arrow/numpy per part, never a dict over all ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import list_parts, part_name, write_table_atomic


class RowMap:
    """Ingest rows (global, in part order) and, optionally, where an embedding's rows sit among them."""

    def __init__(self, ingest_dir: str | Path, emb_dir: str | Path | None = None) -> None:
        self.ingest_dir = Path(ingest_dir)
        self.parts = list_parts(self.ingest_dir)
        self.sizes = np.array([pq.ParquetFile(p).metadata.num_rows for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.emb_rows: np.ndarray | None = None  # global ingest row of each embedding row
        if emb_dir is not None:
            emb_parts = list_parts(emb_dir)
            if len(emb_parts) != len(self.parts):
                raise ValueError(f"{emb_dir} has {len(emb_parts)} parts, the ingest stage {len(self.parts)}")
            rows = []
            for k, (ing, emb) in enumerate(zip(self.parts, emb_parts)):
                rows.append(emb_positions(ing, emb)[1] + self.offsets[k])
            self.emb_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)

    def ingest_ids(self, k: int) -> pa.ChunkedArray:
        """The id column of ingest part k."""
        return _ids(self.parts[k])

    def write(self, out_dir: str | Path, rows: np.ndarray, columns: Mapping[str, tuple[object, pa.DataType]]) -> None:
        """Write `columns` (one value per global ingest row in `rows`) as parts aligned with the ingest
        parts: `id` plus the columns, null where a record is not in `rows` (a dictionary array, codes
        into labels, is written as its values, of the column's type)."""
        rows = np.asarray(rows, dtype=np.int64)
        arrays = {name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else
                  pa.array(values if isinstance(values, np.ndarray) else list(values), type=t)
                  for name, (values, t) in columns.items()}
        where = np.full(self.n, -1, dtype=np.int64)
        where[rows] = np.arange(len(rows))
        for k in range(len(self.parts)):
            table = _aligned_table(self.ingest_ids(k), where[self.offsets[k]:self.offsets[k + 1]], arrays,
                                   {name: t for name, (_, t) in columns.items()})
            write_table_atomic(table, Path(out_dir) / part_name(k))

    def column(self, stage_dir: str | Path, name: str) -> pa.ChunkedArray:
        """One column of a stage's aligned parts, over all ingest rows (checks the ids align)."""
        chunks = []
        for k, p in enumerate(list_parts(stage_dir)):
            t = pq.read_table(p, columns=["id", name])
            if not t.column("id").equals(self.ingest_ids(k)):
                raise ValueError(f"{p} is not row-aligned with the ingest part {k}")
            chunks.extend(t.column(name).chunks)
        return pa.chunked_array(chunks, type=pq.read_schema(list_parts(stage_dir)[0]).field(name).type)


def _aligned_table(ids: pa.ChunkedArray, where: np.ndarray, arrays: Mapping[str, pa.Array | pa.ChunkedArray],
                   types: Mapping[str, pa.DataType]) -> pa.Table:
    """One aligned part: `id` plus, per ingest row, arrays[name][where[row]] (null where -1)."""
    take = pa.array(where, mask=where < 0, type=pa.int64())
    return pa.table({"id": ids, **{name: _decoded(arr.take(take), types[name]) for name, arr in arrays.items()}})


class EmbeddingLayout:
    """An embedding's rows part by part (it holds, per ingest part, a subsequence of that part's rows),
    from the parts' Parquet metadata only: O(parts) memory, for stages that must not hold an array
    per record (RowMap.emb_rows). Global embedding rows are in part order."""

    def __init__(self, ingest_dir: str | Path, emb_dir: str | Path) -> None:
        self.ingest_parts = list_parts(ingest_dir)
        self.emb_parts = list_parts(emb_dir)
        if len(self.emb_parts) != len(self.ingest_parts):
            raise ValueError(f"{emb_dir} has {len(self.emb_parts)} parts, the ingest stage {len(self.ingest_parts)}")
        self.sizes = np.array([pq.ParquetFile(p).metadata.num_rows for p in self.emb_parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def split(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
        """(part, lo, hi) for each part holding some of the sorted global rows: rows[lo:hi] are in it."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(rows[1:] < rows[:-1]) or rows[0] < 0 or rows[-1] >= self.n):
            raise ValueError(f"rows must be sorted embedding rows in 0..{self.n - 1}")
        cuts = np.searchsorted(rows, self.offsets)
        return [(k, int(cuts[k]), int(cuts[k + 1])) for k in range(len(self.emb_parts)) if cuts[k + 1] > cuts[k]]

    def values(self, rows: np.ndarray, columns: Sequence[str], mapper=None) -> dict[str, np.ndarray]:
        """Columns of the parts this layout reads as its ingest parts (the ingest stage's, or another stage's
        parts aligned with them) at the given sorted embedding rows: one job per part holding some (with a
        mapper, its tasks); numpy arrays (strings without nulls as str arrays, nulls as they convert)."""
        from curate.parts import map_in_order

        got = map_in_order(mapper, part_values, self._row_jobs(rows), (tuple(columns),))
        out = {}
        for c in columns:
            chunks = [g[c] for g in got]
            out[c] = np.concatenate(chunks) if chunks else np.zeros(0, dtype=str if c == "id" else np.int64)
        return out

    def table(self, rows: np.ndarray, columns: Sequence[str], mapper=None) -> pa.Table:
        """`values` as one Arrow table (a chunk per part holding some): strings stay Arrow strings, never
        Python objects or fixed-width numpy text."""
        from curate.parts import map_in_order

        got = map_in_order(mapper, part_table, self._row_jobs(rows), (tuple(columns),))
        if not got:
            schema = pq.read_schema(self.ingest_parts[0]) if self.ingest_parts else None
            return pa.table({c: pa.array([], type=schema.field(c).type if schema else pa.string()) for c in columns})
        return pa.concat_tables(got)

    def rows_where(self, column: str, values: np.ndarray, mapper=None) -> np.ndarray:
        """Sorted global embedding rows whose `column` (in the parts this layout reads as its ingest parts,
        e.g. another stage's aligned parts) is one of `values`; one job per part."""
        from curate.parts import map_in_order

        got = map_in_order(mapper, part_rows_in, self._all_parts(), (column, np.asarray(values)))
        return np.concatenate([g + self.offsets[k] for k, g in enumerate(got)] + [np.zeros(0, dtype=np.int64)])

    def count_set(self, column: str, mapper=None) -> int:
        """How many embedded rows have `column` set (not null)."""
        from curate.parts import map_in_order

        return int(sum(map_in_order(mapper, part_count_set, self._all_parts(), (column,))))

    def _row_jobs(self, rows: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        """(ingest part, embedding part, positions within it) of each part holding some of the sorted rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return [(*self._paths(k), rows[lo:hi] - self.offsets[k]) for k, lo, hi in self.split(rows)]

    def _paths(self, k: int) -> tuple[str, str]:
        return str(self.ingest_parts[k]), str(self.emb_parts[k])

    def _all_parts(self) -> list[tuple[str, str]]:
        return [self._paths(k) for k in range(len(self.emb_parts))]


def emb_positions(ingest_part: str | Path, emb_part: str | Path) -> tuple[pa.ChunkedArray, np.ndarray]:
    """The ingest part's ids and, per row of the embedding part, its position in the ingest part."""
    ingest_ids = _ids(Path(ingest_part))
    pos = pc.index_in(_ids(Path(emb_part)), value_set=ingest_ids)
    if pos.null_count:
        raise ValueError(f"{emb_part} holds ids that are not in the ingest part {Path(ingest_part).name}")
    return ingest_ids, pos.to_numpy().astype(np.int64)


def part_values(columns: Sequence[str], ingest_part: str, emb_part: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Ingest `columns` at the given rows of an embedding part (positions within that part), as numpy."""
    table = part_table(columns, ingest_part, emb_part, positions)
    out = {}
    for c in columns:
        col = table.column(c)
        values = col.to_numpy(zero_copy_only=False)  # nulls become None (objects) or NaN: callers fill them
        out[c] = np.asarray(values, dtype=str) if pa.types.is_string(col.type) and not col.null_count else values
    return out


def part_table(columns: Sequence[str], ingest_part: str, emb_part: str, positions: np.ndarray) -> pa.Table:
    """Ingest `columns` at the given rows of an embedding part (positions within that part), as Arrow."""
    _, at = emb_positions(ingest_part, emb_part)
    return pq.read_table(ingest_part, columns=list(columns)).take(pa.array(at[positions], type=pa.int64()))


def _emb_column(column: str, aligned_part: str, emb_part: str) -> pa.ChunkedArray:
    """`column` of the aligned part at the embedding part's rows, in their order."""
    _, at = emb_positions(aligned_part, emb_part)
    return pq.read_table(aligned_part, columns=[column]).column(column).take(pa.array(at, type=pa.int64()))


def part_rows_in(column: str, values: np.ndarray, aligned_part: str, emb_part: str) -> np.ndarray:
    """Positions within the embedding part of its rows whose `column` (of the aligned part) is in values."""
    col = _emb_column(column, aligned_part, emb_part)
    return np.flatnonzero(pc.fill_null(pc.is_in(col, value_set=pa.array(values)), False).to_numpy(zero_copy_only=False))


def part_count_set(column: str, aligned_part: str, emb_part: str) -> int:
    """How many rows of the embedding part have `column` (of the aligned part) set."""
    col = _emb_column(column, aligned_part, emb_part)
    return len(col) - col.null_count


def write_emb_part(ingest_part: str, emb_part: str, out: str, positions: np.ndarray,
                   columns: Mapping[str, tuple[np.ndarray, object, pa.DataType]]) -> int:
    """Write one aligned part (`id` plus `columns`) for the ingest part: each column is `fill` at every
    embedded row, its values at the embedded rows `positions` (within the embedding part), and null at
    rows that are not embedded; the same bytes as RowMap.write of the whole columns. Returns the rows."""
    ingest_ids, at = emb_positions(ingest_part, emb_part)
    where = np.full(len(ingest_ids), -1, dtype=np.int64)
    where[at] = np.arange(len(at))
    arrays = {}
    for name, (values, fill, t) in columns.items():
        if isinstance(values, (pa.Array, pa.ChunkedArray)):  # Arrow values: taken, never Python objects
            at_pos = np.full(len(at), -1, dtype=np.int64)
            at_pos[positions] = np.arange(len(positions))
            full = values.take(pa.array(at_pos, mask=at_pos < 0)).cast(t)
            arrays[name] = full if fill is None else pc.fill_null(full, pa.scalar(fill, type=t))
            continue
        full = np.full(len(at), fill, dtype=object if t == pa.string() else np.asarray(values).dtype)
        full[positions] = values
        arrays[name] = pa.array(full if full.dtype != object else full.tolist(), type=t)
    write_table_atomic(_aligned_table(ingest_ids, where, arrays, {n: t for n, (_, _, t) in columns.items()}), out)
    return len(ingest_ids)


def _decoded(values: pa.Array | pa.ChunkedArray, t: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return values.cast(t) if pa.types.is_dictionary(values.type) else values


def _ids(path: Path) -> pa.ChunkedArray:
    return pq.read_table(path, columns=["id"]).column("id")


def embedding_ids(emb_dir: str | Path) -> np.ndarray:
    """Ids of an embedding, in row order (concatenated id parts), as one numpy str array (no Python
    string per id: ~4 bytes a character instead of ~70 bytes an id)."""
    parts = [np.asarray(pq.read_table(p, columns=["id"]).column("id").to_numpy(zero_copy_only=False), dtype=str)
             for p in list_parts(emb_dir)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=str)


def embedding_status(emb_dir: str | Path) -> np.ndarray:
    """Per embedding row: True where the row embedded fine (status ok)."""
    parts = [pq.read_table(p, columns=["status"]).column("status") for p in list_parts(emb_dir)]
    if not parts:
        return np.zeros(0, dtype=bool)
    return np.concatenate([pc.equal(s, "ok").to_numpy(zero_copy_only=False) for s in parts]).astype(bool)
