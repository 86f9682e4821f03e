"""The statistics of a k-means assignment pass and how blocks of them combine: float64 sums per
cluster (exact for float16 inputs), counts, inertia and each cluster's farthest point; combined in
order, in place, without a k x d temporary per block (curate/kmeans.py runs the passes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def partial_sums(x: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clusters present in this block, their float64 sums [present, d]): no k x d array."""
    present = np.flatnonzero(counts)
    if not len(labels):
        return present, np.zeros((0, x.shape[1]), dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
    return present, np.add.reduceat(x[order], starts, axis=0, dtype=np.float64)


def accumulate(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums [k, d] and int64 counts [k] of the rows of x."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    present, partial = partial_sums(x, labels, counts)
    sums[present] = partial
    return sums, counts


@dataclass
class StepStats:
    """What one assignment pass over (part of) the data contributes to a Lloyd update."""

    sums: np.ndarray  # float64 [k, d]
    counts: np.ndarray  # int64 [k]
    inertia: float  # sum of squared distances to the assigned centroid
    far_dist: np.ndarray  # float32 [k]: largest squared distance in the cluster (-1: empty)
    far_row: np.ndarray  # int64 [k]: global row of that farthest point (-1: empty)


def farthest(labels: np.ndarray, dists: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster the largest distance and its row (ties: smallest row); -1 where empty."""
    far_dist = np.full(k, -1.0, dtype=np.float32)
    far_row = np.full(k, -1, dtype=np.int64)
    if len(labels):
        order = np.lexsort((rows, -dists, labels))
        first = order[np.concatenate([[True], labels[order][1:] != labels[order][:-1]])]
        far_dist[labels[first]] = dists[first]
        far_row[labels[first]] = rows[first]
    return far_dist, far_row


def merge_far(total: StepStats, far_dist: np.ndarray, far_row: np.ndarray) -> None:
    """Keep, per cluster, the farther point of total's and the block's (ties: the smaller row)."""
    better = (far_dist > total.far_dist) | (
        (far_dist == total.far_dist) & (far_row >= 0) & ((total.far_row < 0) | (far_row < total.far_row))
    )
    total.far_dist[better] = far_dist[better]
    total.far_row[better] = far_row[better]


def reduce_stats(parts: Iterable[StepStats]) -> StepStats:
    """Combine the stats of disjoint blocks (any order gives the same sums for float16 data)."""
    total: StepStats | None = None
    for p in parts:
        if total is None:
            total = StepStats(p.sums.copy(), p.counts.copy(), p.inertia, p.far_dist.copy(), p.far_row.copy())
            continue
        total.sums += p.sums
        total.counts += p.counts
        total.inertia += p.inertia
        merge_far(total, p.far_dist, p.far_row)
    if total is None:
        raise ValueError("reduce_stats needs at least one block")
    return total


class StepAccumulator:
    """reduce_stats over blocks in order, added into one float64 k x d array: each block costs
    O(clusters present x d), never a k x d temporary, and the result equals reduce_stats bit for bit
    (a stored -0.0 that reduce_stats would turn into +0.0 by adding a block's zero is turned too)."""

    def __init__(self, k: int, dim: int) -> None:
        self.stats: StepStats | None = None
        self.k, self.dim = k, dim
        self._negative_zero = np.zeros(k, dtype=bool)  # rows holding a -0.0

    def add(self, counts: np.ndarray, partial: np.ndarray, inertia: float, far_dist: np.ndarray,
            far_row: np.ndarray) -> None:
        """Add one block: its counts per cluster, the sums of the clusters present, inertia and farthest points."""
        counts = np.asarray(counts, dtype=np.int64)
        present = np.flatnonzero(counts)
        if self.stats is None:
            self.stats = StepStats(np.zeros((self.k, self.dim), dtype=np.float64), counts.copy(), inertia,
                                   far_dist.copy(), far_row.copy())
            self.stats.sums[present] = partial
        else:
            t = self.stats
            stale = np.flatnonzero(self._negative_zero & (counts == 0))
            t.sums[stale] += 0.0
            self._negative_zero[stale] = False
            t.sums[present] += partial
            t.counts += counts
            t.inertia += inertia
            merge_far(t, far_dist, far_row)
        block = self.stats.sums[present]
        self._negative_zero[present] = ((block == 0) & np.signbit(block)).any(axis=1)

    def add_stats(self, s: StepStats) -> None:
        """Add a block's StepStats (e.g. a worker's part), as reduce_stats would."""
        self.add(s.counts, s.sums[np.flatnonzero(s.counts)], s.inertia, s.far_dist, s.far_row)

    def result(self) -> StepStats:
        """The combined stats; ValueError when no block was added."""
        if self.stats is None:
            raise ValueError("reduce_stats needs at least one block")
        return self.stats
