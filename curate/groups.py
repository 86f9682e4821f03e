"""Keepers of duplicate components, shared by hash dedup and embedding copy dedup: one record per
component (most pixels, then smallest id in string order), groups numbered by their smallest id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def id_ranks(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """ids as a numpy str array and each id's rank in string order; ids must be unique."""
    n = len(ids)
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "U":  # already a str array: no copy through Python
        id_arr = ids
    else:
        id_arr = np.array([str(x) for x in ids], dtype=str) if n else np.empty(0, dtype=str)
    by_id = np.argsort(id_arr, kind="stable")
    if n > 1 and np.any(id_arr[by_id][1:] == id_arr[by_id][:-1]):
        raise ValueError("ids must be unique")
    rank = np.empty(n, dtype=np.int64)
    rank[by_id] = np.arange(n, dtype=np.int64)
    return id_arr, rank


def large_strings(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """ids as one Arrow large_string array (64-bit offsets: past 2 GB of text, as a pool's ids are)."""
    if isinstance(ids, pa.ChunkedArray):
        chunks = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in ids.chunks]
        return pa.concat_arrays([c.cast(pa.large_string()) for c in chunks]) if chunks else pa.array(
            [], type=pa.large_string())
    if isinstance(ids, pa.Array):
        return ids.cast(ids.type.value_type).cast(pa.large_string()) if pa.types.is_dictionary(ids.type) else \
            ids.cast(pa.large_string())
    return pa.array(ids if isinstance(ids, np.ndarray) else list(ids), type=pa.large_string())


def take_strings(ids: pa.Array, index: np.ndarray, rows: int = 1 << 20) -> pa.ChunkedArray:
    """ids[index] as the `string` type Parquet parts use, in chunks of `rows` rows, each taken and cast on
    its own (a string array holds at most 2 GB of text; no whole large_string copy is made)."""
    index = np.asarray(index, dtype=np.int64)
    return pa.chunked_array([ids.take(pa.array(index[s : s + rows])).cast(pa.string())
                             for s in range(0, len(index), rows)], type=pa.string())


def take_string_lists(ids: pa.Array, offsets: np.ndarray, members: np.ndarray,
                      rows: int = 1 << 20) -> pa.ChunkedArray:
    """Lists of ids (list i: ids[members[offsets[i]:offsets[i + 1]]]) as list<string>, in chunks of `rows`
    lists, each taken and cast on its own."""
    offsets, members = np.asarray(offsets, dtype=np.int64), np.asarray(members, dtype=np.int64)
    chunks = []
    for s in range(0, len(offsets) - 1, rows):
        e = min(s + rows, len(offsets) - 1)
        values = ids.take(pa.array(members[offsets[s] : offsets[e]])).cast(pa.string())
        chunks.append(pa.ListArray.from_arrays(pa.array((offsets[s : e + 1] - offsets[s]).astype(np.int32)), values))
    return pa.chunked_array(chunks, type=pa.list_(pa.string()))


def arrow_id_ranks(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """id_ranks with the ids as one Arrow large_string array: no Python string and no fixed-width copy
    (4 bytes a character) per id. Arrow orders strings by their UTF-8 bytes, which is numpy's code-point
    order, so the ranks are id_ranks'. ids must be unique."""
    arr = large_strings(ids)
    if arr.null_count:
        raise ValueError("ids must not be null")
    n = len(arr)
    by_id = pc.sort_indices(arr).to_numpy()
    if n > 1:
        ordered = arr.take(pa.array(by_id))
        if pc.any(pc.equal(ordered.slice(1), ordered.slice(0, n - 1))).as_py():
            raise ValueError("ids must be unique")
        del ordered
    rank = np.empty(n, dtype=np.int64)
    rank[by_id] = np.arange(n, dtype=np.int64)
    return arr, rank


@dataclass
class Keepers:
    """Per record: its component's keeper row, whether it is the keeper, its group (-1: alone)."""

    keeper: np.ndarray     # int64 [n]
    keep: np.ndarray       # bool [n]
    group: np.ndarray      # int64 [n]
    sizes: np.ndarray      # int64 [components]
    multi: np.ndarray      # components of 2+ records, in group order
    keeper_of: np.ndarray  # int64 [components]


def pick_keepers(labels: np.ndarray, pixels: np.ndarray, rank: np.ndarray) -> Keepers:
    """Choose each component's keeper and number the groups; independent of the input order."""
    n = len(labels)
    ncomp = int(labels.max()) + 1 if n else 0
    order = np.lexsort((rank, -pixels, labels))
    head = np.ones(n, dtype=bool)
    head[1:] = labels[order][1:] != labels[order][:-1]
    keeper_of = np.empty(ncomp, dtype=np.int64)
    keeper_of[labels[order][head]] = order[head]
    keeper = keeper_of[labels]
    sizes = np.bincount(labels, minlength=ncomp)
    min_rank = np.full(ncomp, n, dtype=np.int64)
    np.minimum.at(min_rank, labels, rank)
    multi = np.flatnonzero(sizes > 1)
    multi = multi[np.argsort(min_rank[multi], kind="stable")]
    group_of = np.full(ncomp, -1, dtype=np.int64)
    group_of[multi] = np.arange(len(multi))
    return Keepers(keeper, keeper == np.arange(n), group_of[labels], sizes, multi, keeper_of)
