"""Keepers of duplicate components, shared by hash dedup and embedding copy dedup: one record per
component (most pixels, then smallest id in string order), groups numbered by their smallest id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
