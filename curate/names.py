"""Counting the names an ingest plan has seen, to number repeated names (curate.ingest): in one process
(SeenNames: 8 bytes per distinct name) or split by key over several (PartitionedSeen: e.g. one Ray actor per
node, the planner then holding nothing per name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class SeenNames:
    """How many times each record's base id (make_id of its name: a 64-bit hash) has been seen, for
    numbering repeated names. Every distinct id is kept once, as a uint64, in sorted arrays merged like
    a log-structured merge tree (8 bytes per distinct name, where a dict of id strings took ~100);
    counts above one, i.e. the repeated names only, in a dict."""

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []  # sorted, disjoint; sizes shrink at least 2x from one to the next
        self.more: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(lv) for lv in self.levels)

    def _counts(self, keys: np.ndarray) -> np.ndarray:
        """Times seen so far of each of the distinct `keys`."""
        count = np.zeros(len(keys), dtype=np.int64)
        for lv in self.levels:
            at = np.minimum(np.searchsorted(lv, keys), len(lv) - 1)
            count[lv[at] == keys] = 1
        for k in np.flatnonzero(count):
            count[k] = self.more.get(int(keys[k]), 1)
        return count

    def take(self, keys: np.ndarray) -> np.ndarray:
        """For a batch of keys in stream order: how many times each one's key was seen before it (earlier
        batches and earlier in this batch); the batch is then recorded."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        uniq, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        base = self._counts(uniq)
        order = np.argsort(inv, kind="stable")  # positions grouped by key, in stream order within each
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        total = base + cnt
        for k in np.flatnonzero(total > 1):
            self.more[int(uniq[k])] = int(total[k])
        fresh = uniq[base == 0]
        if len(fresh):
            self.levels.append(fresh)
            while len(self.levels) > 1 and len(self.levels[-2]) <= 2 * len(self.levels[-1]):
                top = self.levels.pop()
                self.levels[-1] = np.sort(np.concatenate([self.levels[-1], top]), kind="stable")
        return base[inv] + rank


class NameCounter(Protocol):
    """What the planner asks of its count of names: SeenNames.take."""

    def take(self, keys: np.ndarray) -> np.ndarray: ...


class PartitionedSeen:
    """SeenNames split by key over `holders` (e.g. Ray actors, one per node): holder h keeps the keys with
    key % holders == h, so every occurrence of a name meets the same holder, in stream order, and the
    counts are one SeenNames' exactly; the caller holds O(1) per name. `take_parts(keys per holder)` gives
    each holder's SeenNames.take of its keys (in holder order)."""

    def __init__(self, holders: int, take_parts: Callable[[list[np.ndarray]], list[np.ndarray]]) -> None:
        self.holders, self.take_parts = holders, take_parts

    def take(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        which = keys % np.uint64(self.holders)
        picks = [np.flatnonzero(which == h) for h in range(self.holders)]  # stream order within each
        out = np.zeros(len(keys), dtype=np.int64)
        for pick, got in zip(picks, self.take_parts([keys[pick] for pick in picks])):
            out[pick] = got
        return out
