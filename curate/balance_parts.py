"""Balanced sampling streamed over the cluster stage's parts: the same selection as `balanced_sample`
on the whole table, with O(clusters) state in the driver and one part at a time in each task.

Passes over the parts (each a map, `mapper`: local calls or Ray tasks):
1. leaves: per part, the records of each tree path (leaf) and the range of their pick keys;
   the driver adds them up and computes the leaf quotas (`tree_quotas`, O(leaves)).
2. thresholds: a leaf with quota q over s records gives q // s to all and one more to its q % s
   first records in (key, row) order. Its last such record is found exactly with bounded memory:
   per-leaf histograms of the keys inside a shrinking interval (bins over the key, then over the
   row where keys tie), until the interval holds at most WINDOW records; those are collected
   and sorted.
3. write: each part's `selected`, `repeats`, `selected_by` and seed columns, written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.balance import leaf_labels, order_keys, tree_quotas, unique_leaves, with_strategy
from curate.parts import Mapper, local_map, write_table_atomic

WINDOW = 1024  # a leaf's records are collected once its interval holds at most this many
COLLECT_BUDGET = 1 << 20  # records collected in one pass, all leaves together
HIST_CELLS = 1 << 21  # histogram cells (active leaves x bins) in the driver per pass
ROW_MAX = (1 << 63) - 1
KEY_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Settings:
    """What every task needs to compute its records' leaves and keys."""

    depth: int  # tree levels balanced over (cluster_l1 .. cluster_l{depth})
    strategy: str  # 'r' | 'c'
    seed: int


PartJob = tuple[str, int]  # a cluster part's path, the global ingest row of its first record


def read_part(part: str, offset: int, s: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions in the part of the clustered records, their paths [m, depth], their uint64 keys)."""
    cols = [f"cluster_l{lv + 1}" for lv in range(s.depth)] + (["cluster_sq_dist"] if s.strategy == "c" else [])
    t = pq.read_table(part, columns=cols)
    pos = np.flatnonzero(pc.is_valid(t.column("cluster_l1")).to_numpy(zero_copy_only=False))
    paths = np.empty((len(pos), s.depth), dtype=np.int64)
    for lv in range(s.depth):
        paths[:, lv] = pc.fill_null(t.column(f"cluster_l{lv + 1}"), 0).to_numpy()[pos]
    sq = t.column("cluster_sq_dist").to_numpy(zero_copy_only=False)[pos] if s.strategy == "c" else None
    return pos, paths, order_keys(s.strategy, pos + offset, sq, s.seed)


def part_leaves(s: Settings, part: str, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Pass 1 on one part: its leaf paths, records per leaf, smallest and largest key per leaf, and the
    last global row of a clustered record (-1 if none)."""
    pos, paths, key = read_part(part, offset, s)
    leaves, sizes, leaf = unique_leaves(paths)
    return leaves, sizes, *_key_range(leaf, key, len(leaves)), int(pos[-1]) + offset if len(pos) else -1


def _key_range(leaf: np.ndarray, key: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(m, KEY_MAX, dtype=np.uint64)
    hi = np.zeros(m, dtype=np.uint64)
    np.minimum.at(lo, leaf, key)
    np.maximum.at(hi, leaf, key)
    return lo, hi


class LeafIndex:
    """Maps tree paths to leaf numbers (rows of the unique leaf paths), level by level: O(leaves)."""

    def __init__(self, leaf_paths: np.ndarray) -> None:
        self.n_leaves, levels = leaf_paths.shape
        self.keys: list[np.ndarray] = [np.zeros(0, np.int64)] * levels
        self.lo = np.zeros(levels, np.int64)
        self.span = np.ones(levels, np.int64)
        up = np.zeros(self.n_leaves, np.int64)
        for lv in range(levels - 1, -1, -1):
            col = leaf_paths[:, lv].astype(np.int64)
            self.lo[lv] = col.min(initial=0)
            self.span[lv] = int(col.max(initial=0)) - self.lo[lv] + 1
            key = up * self.span[lv] + (col - self.lo[lv])
            self.keys[lv], up = np.unique(key, return_inverse=True)
            up = up.reshape(-1)

    def lookup(self, paths: np.ndarray) -> np.ndarray:
        """Leaf number of each path [n, levels]; a path that is not a leaf raises ValueError."""
        up = np.zeros(len(paths), np.int64)
        for lv in range(len(self.keys) - 1, -1, -1):
            col = paths[:, lv].astype(np.int64) - self.lo[lv]
            key = up * self.span[lv] + col
            up = np.searchsorted(self.keys[lv], key)
            bad = (col < 0) | (col >= self.span[lv]) | (up >= len(self.keys[lv]))
            if bad.any() or not np.array_equal(self.keys[lv][up], key):
                raise ValueError("a cluster part holds a tree path the first pass did not see (changed underneath?)")
        return up


@dataclass
class Intervals:
    """Per active leaf (slot): the (key, row) interval [lo, hi] known to hold its threshold record."""

    slot_of: np.ndarray  # int64 [leaves]: slot of each leaf, -1 when not active
    lo_k: np.ndarray  # uint64 [slots]
    lo_r: np.ndarray  # int64
    hi_k: np.ndarray  # uint64
    hi_r: np.ndarray  # int64
    width: np.ndarray  # uint64: bin width (over the key, or over the row where lo_k == hi_k)
    bins: int = 0
    collect: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # bool [slots]: collect, not bin

    def members(self, leaf: np.ndarray, key: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indexes of the records inside their leaf's interval, their slots)."""
        slot = self.slot_of[leaf]
        idx = np.flatnonzero(slot >= 0)
        sl = slot[idx]
        k, r = key[idx], row[idx]
        lo_k, hi_k = self.lo_k[sl], self.hi_k[sl]
        inside = (((k > lo_k) | ((k == lo_k) & (r >= self.lo_r[sl])))
                  & ((k < hi_k) | ((k == hi_k) & (r <= self.hi_r[sl]))))
        return idx[inside], sl[inside]


def part_probe(s: Settings, index: LeafIndex, iv: Intervals, part: str, offset: int):
    """A threshold pass on one part: (cells, counts) of the histogram of the binned leaves' records
    (cell = slot * bins + bin), and (slot, key, row) of the collected leaves' records."""
    pos, paths, key = read_part(part, offset, s)
    row = pos.astype(np.int64) + offset
    idx, sl = iv.members(index.lookup(paths), key, row)
    k, r = key[idx], row[idx]
    take = iv.collect[sl]
    b = ~take
    sb, kb, rb = sl[b], k[b], r[b]
    by_key = iv.lo_k[sb] < iv.hi_k[sb]
    bins = np.where(by_key, (kb - iv.lo_k[sb]) // iv.width[sb],
                    ((rb - iv.lo_r[sb]) // iv.width[sb].astype(np.int64)).astype(np.uint64)).astype(np.int64)
    cells, counts = np.unique(sb * iv.bins + bins, return_counts=True)
    return (cells, counts), (sl[take], k[take], r[take])


def _bin_width(lo: int, hi: int, bins: int) -> int:
    return (hi - lo) // bins + 1


def find_thresholds(mapper: Mapper, jobs: Sequence[PartJob], s: Settings, index: LeafIndex, sizes: np.ndarray,
                    need: np.ndarray, lo_key: np.ndarray, hi_key: np.ndarray,
                    row_max: int = ROW_MAX) -> tuple[np.ndarray, np.ndarray, int]:
    """Per leaf, the (key, row) of its need-th record in (key, row) order (need 0: none, key 0 row -1);
    exact, whatever the part split; rows are 0..row_max. Returns (key, row, passes)."""
    thr_k = np.zeros(len(need), np.uint64)
    thr_r = np.full(len(need), -1, np.int64)
    todo = [int(x) for x in np.flatnonzero(need > 0)]
    # per active leaf, as Python ints: [leaf, lo_k, lo_r, hi_k, hi_r, below, inside]
    state = {leaf: [leaf, int(lo_key[leaf]), 0, int(hi_key[leaf]), row_max, 0, int(sizes[leaf])] for leaf in todo}
    passes = 0
    while state:
        passes += 1
        active = list(state.values())
        ready = sorted((a for a in active if a[6] <= WINDOW), key=lambda a: a[6])
        take, total = set(), 0
        for a in ready:
            if total and total + a[6] > COLLECT_BUDGET:
                break
            take.add(a[0])
            total += a[6]
        bins = int(max(16, min(1024, HIST_CELLS // max(1, len(active)))))
        iv = _intervals(len(need), active, take, bins)
        hist = np.zeros(len(active) * bins, np.int64)
        got: list[tuple] = []
        for _, ((cells, counts), window) in mapper(part_probe, list(jobs), (s, index, iv)):
            np.add.at(hist, cells, counts)
            if len(window[0]):
                got.append(window)
        hist = hist.reshape(len(active), bins)
        if got:
            sl, k, r = (np.concatenate([g[i] for g in got]) for i in range(3))
            order = np.lexsort((r, k, sl))
            sl, k, r = sl[order], k[order], r[order]
            starts = np.searchsorted(sl, np.arange(len(active)))
        for slot, a in enumerate(active):
            leaf, lo_k, lo_r, hi_k, hi_r, below, inside = a
            want = int(need[leaf]) - below  # the want-th record inside the interval
            if leaf in take:
                i = int(starts[slot]) + want - 1
                if not got or i >= len(sl) or sl[i] != slot:
                    raise RuntimeError(f"leaf {leaf}: the collected window misses its threshold (parts changed?)")
                thr_k[leaf], thr_r[leaf] = k[i], r[i]
                del state[leaf]
                continue
            cum = np.cumsum(hist[slot])
            b = int(np.searchsorted(cum, want))  # first bin reaching want
            if b >= bins:
                raise RuntimeError(f"leaf {leaf}: {int(cum[-1])} records in its interval, {want} wanted (parts changed?)")
            a[5] = below + (int(cum[b - 1]) if b else 0)
            a[6] = int(hist[slot, b])
            if lo_k < hi_k:
                w = _bin_width(lo_k, hi_k, bins)
                new_lo, new_hi = lo_k + b * w, min(hi_k, lo_k + (b + 1) * w - 1)
                a[1], a[3] = new_lo, new_hi
                a[2] = lo_r if new_lo == lo_k else 0
                a[4] = hi_r if new_hi == hi_k else row_max
            else:
                w = _bin_width(lo_r, hi_r, bins)
                a[2], a[4] = lo_r + b * w, min(hi_r, lo_r + (b + 1) * w - 1)
    return thr_k, thr_r, passes


def _intervals(n_leaves: int, active: list[list[int]], take: set[int], bins: int) -> Intervals:
    slot_of = np.full(n_leaves, -1, np.int64)
    slot_of[[a[0] for a in active]] = np.arange(len(active))
    width = [_bin_width(a[1], a[3], bins) if a[1] < a[3] else _bin_width(a[2], a[4], bins) for a in active]
    return Intervals(slot_of, np.array([a[1] for a in active], np.uint64), np.array([a[2] for a in active], np.int64),
                     np.array([a[3] for a in active], np.uint64), np.array([a[4] for a in active], np.int64),
                     np.array(width, np.uint64), bins, np.array([a[0] in take for a in active], bool))


@dataclass
class Selection:
    """What a write task needs besides its part: per leaf, the repeats all its records get, the threshold
    of one more, and the label code of its selection; the labels (leaves, then seed sets)."""

    index: LeafIndex | None
    base: np.ndarray  # int64 [leaves]
    thr_k: np.ndarray  # uint64 [leaves]
    thr_r: np.ndarray  # int64 [leaves]: -1 = no one more
    code_of: np.ndarray  # int32 [leaves]
    labels: list[str]
    seed_code: dict[str, int]


SeedPart = tuple[np.ndarray, Sequence, Sequence, np.ndarray]  # positions in the part, set, seed id, similarity


def part_counts(s: Settings, sel: Selection, pos: np.ndarray, paths: np.ndarray, key: np.ndarray,
                offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(repeats, label code or -1) of a part's clustered records, before seed retrievals."""
    if sel.index is None:
        return np.zeros(len(pos), np.int32), np.full(len(pos), -1, np.int32)
    leaf = sel.index.lookup(paths)
    row = pos.astype(np.int64) + offset
    tk, tr = sel.thr_k[leaf], sel.thr_r[leaf]
    extra = (key < tk) | ((key == tk) & (row <= tr))
    counts = (sel.base[leaf] + extra).astype(np.int32)
    return counts, np.where(counts > 0, sel.code_of[leaf], -1).astype(np.int32)


def write_part(s: Settings, sel: Selection, ingest_part: str, part: str, out: str, offset: int,
               seeds: SeedPart | None) -> tuple[int, int, int]:
    """Pass 3 on one part: write its balance part (row-aligned with the ingest part: null where a record
    was not clustered); returns (clustered, selected, repeats in all)."""
    ids = pq.read_table(ingest_part, columns=["id"]).column("id")
    if not pq.read_table(part, columns=["id"]).column("id").equals(ids):
        raise ValueError(f"{part} is not row-aligned with the ingest part {ingest_part}")
    pos, paths, key = read_part(part, offset, s)
    counts, code = part_counts(s, sel, pos, paths, key, offset)
    n = len(ids)
    seed_types = {"seed_set": pa.string(), "seed_id": pa.string(), "seed_sim": pa.float32()}
    seeded = {c: pa.nulls(n, t) for c, t in seed_types.items()}
    if seeds is not None:
        at, sets, sids, sims = seeds
        where = np.full(n, -1, np.int64)
        where[pos] = np.arange(len(pos))
        j = where[np.asarray(at, np.int64)]
        fresh = counts[j] == 0
        counts[j[fresh]] = 1
        code[j[fresh]] = [sel.seed_code[str(x)] for x in np.asarray(sets, dtype=object)[fresh]]
        for c, vals in zip(seed_types, (sets, sids, sims)):
            full = np.full(n, None, dtype=object)
            full[at] = [float(x) for x in vals] if c == "seed_sim" else list(vals)
            seeded[c] = pa.array(full.tolist(), type=seed_types[c])
    valid = np.zeros(n, bool)
    valid[pos] = True
    full_counts = np.zeros(n, np.int32)
    full_counts[pos] = counts
    full_code = np.full(n, -1, np.int32)
    full_code[pos] = code
    by = pa.DictionaryArray.from_arrays(pa.array(full_code, mask=full_code < 0, type=pa.int32()),
                                        pa.array(sel.labels, type=pa.string()))
    table = pa.table({"id": ids, "selected": pa.array(full_counts > 0, mask=~valid, type=pa.bool_()),
                      "repeats": pa.array(full_counts, mask=~valid, type=pa.int32()),
                      "selected_by": by.cast(pa.string()), **seeded})
    write_table_atomic(table, out)
    return len(pos), int((counts > 0).sum()), int(counts.sum())


@dataclass
class PartsResult:
    """Counts of a streamed selection (summed over parts) and the tree report."""

    clustered: int
    selected: int
    repeats: int
    report: dict
    passes: int


def balance_parts(ingest_parts: Sequence[str | Path], cluster_parts: Sequence[str | Path],
                  out_parts: Sequence[str | Path], offsets: Sequence[int], target: int, *, depth: int,
                  strategy: str = "r", multiplier: int = 1, seed: int = 0,
                  seeds: Mapping[int, SeedPart] | None = None, seed_sets: Sequence[str] = (),
                  mapper: Mapper | None = None) -> PartsResult:
    """Select `target` records balanced over the tree in the cluster parts (levels 1..depth) and write
    one balance part per ingest part; `seeds`: per part index, seed retrievals (fresh ones count once,
    labelled "seed:<set>"). The same parts, byte for byte, as `balanced_sample` on the whole table."""
    mapper = mapper or local_map
    s = Settings(depth, strategy, seed)
    jobs = [(str(p), int(o)) for p, o in zip(cluster_parts, offsets)]
    report: dict = {}
    passes = 0
    sel = Selection(None, np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64),
                    np.zeros(0, np.int32), [], {})
    if target:
        leaves, sizes, lo_key, hi_key, row_max = _all_leaves(mapper, jobs, s)
        quota, report = tree_quotas(leaves, sizes, target, multiplier, seed)
        report = with_strategy(report, strategy)
        index = LeafIndex(leaves)
        thr_k, thr_r, passes = find_thresholds(mapper, jobs, s, index, sizes, quota % np.maximum(sizes, 1),
                                               lo_key, hi_key, max(row_max, 0))
        picked = np.flatnonzero(quota > 0)
        code_of = np.full(len(quota), -1, np.int32)
        code_of[picked] = np.arange(len(picked), dtype=np.int32)
        sel = Selection(index, quota // np.maximum(sizes, 1), thr_k, thr_r, code_of,
                        list(leaf_labels(leaves[picked])), {})
        total = int(quota.sum())
        report.update(selected=total, unique=int(np.minimum(quota, sizes).sum()), shortfall=int(target) - total)
    sel.seed_code = {name: len(sel.labels) + i for i, name in enumerate(seed_sets)}
    sel.labels = sel.labels + [f"seed:{name}" for name in seed_sets]
    seeds = seeds or {}
    write_jobs = [(str(i), c, str(o), int(off), seeds.get(k))
                  for k, (i, c, o, off) in enumerate(zip(ingest_parts, cluster_parts, out_parts, offsets))]
    clustered = selected = repeats = 0
    for _, (n, chosen, reps) in mapper(write_part, write_jobs, (s, sel)):
        clustered, selected, repeats = clustered + n, selected + chosen, repeats + reps
    return PartsResult(clustered, selected, repeats, report, passes + 2 if target else 1)


def _all_leaves(mapper: Mapper, jobs: list[PartJob], s: Settings):
    """Pass 1: the leaves of all parts (sorted paths), their sizes and key ranges, merged as parts finish,
    and the last row of a clustered record."""
    acc: list[tuple] = []
    merged = (np.zeros((0, s.depth), np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    row_max = -1
    for _, (*got, last) in mapper(part_leaves, jobs, (s,)):
        acc.append(got)
        row_max = max(row_max, last)
        if len(acc) >= 32:
            merged = _merge([merged, *acc])
            acc = []
    return (*_merge([merged, *acc]), row_max)


def _merge(parts: list[tuple]) -> tuple:
    paths = np.concatenate([p[0] for p in parts])
    leaves, _, inverse = unique_leaves(paths)
    sizes = np.bincount(inverse, weights=np.concatenate([p[1] for p in parts]), minlength=len(leaves)).astype(np.int64)
    lo = np.full(len(leaves), KEY_MAX, np.uint64)
    hi = np.zeros(len(leaves), np.uint64)
    np.minimum.at(lo, inverse, np.concatenate([p[2] for p in parts]))
    np.maximum.at(hi, inverse, np.concatenate([p[3] for p in parts]))
    return leaves, sizes, lo, hi
