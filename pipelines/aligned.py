"""Stage outputs keyed by id, written as parts row-aligned with the ingest parts (the design's
rule: later stages add columns in their own directory and never rewrite earlier files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.parts import list_parts, part_name, write_table_atomic


def embedding_ids(emb_dir: str | Path) -> list[str]:
    """Ids of an embedding, in row order (concatenated id parts)."""
    return [x for p in list_parts(emb_dir) for x in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def write_by_id(ingest_dir: str | Path, out_dir: str | Path, ids: Sequence[str],
                columns: Mapping[str, tuple[Sequence | np.ndarray, pa.DataType]]) -> None:
    """Write `columns` (one value per id in `ids`) as parts aligned with the ingest parts; records
    absent from `ids` get nulls."""
    row_of = {x: i for i, x in enumerate(ids)}
    arrays = {name: pa.array(list(values) if not isinstance(values, np.ndarray) else values, type=t)
              for name, (values, t) in columns.items()}
    for k, part in enumerate(list_parts(ingest_dir)):
        out = Path(out_dir) / part_name(k)
        part_ids = pq.read_table(part, columns=["id"]).column("id")
        take = pa.array([row_of.get(x) for x in part_ids.to_pylist()], type=pa.int64())
        table = pa.table({"id": part_ids, **{name: arr.take(take) for name, arr in arrays.items()}})
        write_table_atomic(table, out)
