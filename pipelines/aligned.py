"""Joins by part position. Every stage writes parts row-aligned with the ingest parts; an embedding
holds, per ingest part, a subsequence of that part's rows (the embedded ones, in order). So any
join is "part k, these positions", done with Arrow/numpy per part, never a dict over all ids.
"""

from __future__ import annotations

from collections.abc import Mapping
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
                pos = pc.index_in(_ids(emb), value_set=_ids(ing))
                if pos.null_count:
                    raise ValueError(f"{emb} holds ids that are not in the ingest part {ing.name}")
                rows.append(pos.to_numpy().astype(np.int64) + self.offsets[k])
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
            sl = where[self.offsets[k]:self.offsets[k + 1]]
            take = pa.array(sl, mask=sl < 0, type=pa.int64())
            table = pa.table({"id": self.ingest_ids(k), **{name: _decoded(arr.take(take), columns[name][1])
                                                           for name, arr in arrays.items()}})
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
