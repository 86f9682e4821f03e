"""Balanced sampling streamed over parts (curate/balance_parts.py) against a whole-table reference
written here: per leaf, every record's (key, row) sorted; quotas by water_fill top-down."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate.balance_parts as bp
from curate.balance import balanced_sample, order_keys, water_fill
from curate.parts import part_name, read_table


def pool(seed: int, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(paths [n, 3] with -1 = not clustered, sq_dists, a mask of the clustered); skewed leaves."""
    rng = np.random.default_rng(seed)
    l1 = rng.integers(0, 40, n) ** 2 // 40
    paths = np.stack([l1, l1 // 6 + rng.integers(0, 2, n), l1 // 15], axis=1)
    sq = rng.random(n).astype(np.float32)
    if ties:
        sq = np.round(sq * 3).astype(np.float32) / 3  # four distinct distances: whole leaves tie
    return paths, sq, rng.random(n) > 0.1


def write_parts(tmp, paths, sq, clustered, cuts):
    """Ingest parts (id) and cluster parts (null where not clustered) split at `cuts`; returns the
    balance_parts arguments (ingest, cluster, out, offsets)."""
    ing, clu, out = tmp / "ingest", tmp / "cluster", tmp / "balance"
    for d in (ing, clu, out):
        d.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, len(paths)]
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = pa.array([f"{r:016x}" for r in range(lo, hi)])
        pq.write_table(pa.table({"id": ids}), ing / part_name(k))
        mask = ~clustered[lo:hi]
        cols = {f"cluster_l{lv + 1}": pa.array(paths[lo:hi, lv].astype(np.int32), mask=mask) for lv in range(3)}
        pq.write_table(pa.table({"id": ids, **cols, "cluster_sq_dist": pa.array(sq[lo:hi], mask=mask)}),
                       clu / part_name(k))
    n_parts = len(bounds) - 1
    return ([ing / part_name(k) for k in range(n_parts)], [clu / part_name(k) for k in range(n_parts)],
            [out / part_name(k) for k in range(n_parts)], bounds[:-1])


def reference_quotas(paths: np.ndarray, target: int, multiplier: int, seed: int) -> dict[tuple, int]:
    """Leaf (path tuple, top level first) -> quota: water_fill node by node, a level at a time from
    the top, parents and children in path order, one rng for the whole tree."""
    rng = np.random.default_rng(seed)
    levels = paths.shape[1]
    tops = [tuple(p[::-1]) for p in paths]
    quota = {(): min(target, len(paths) * multiplier)}
    for depth in range(1, levels + 1):
        sizes: dict[tuple, int] = {}
        for t in tops:
            sizes[t[:depth]] = sizes.get(t[:depth], 0) + multiplier
        nxt = {}
        for parent in sorted(quota):
            kids = sorted(c for c in sizes if c[:-1] == parent)
            if quota[parent]:
                alloc, _ = water_fill(np.array([sizes[c] for c in kids]), quota[parent], rng)
            else:
                alloc = [0] * len(kids)
            nxt.update({c: int(a) for c, a in zip(kids, alloc)})
        quota = nxt
    return quota


def reference(paths, sq, rows, target, strategy, multiplier, seed) -> np.ndarray:
    """Repeats per record: every record of a leaf q // s times, and its q % s first in (key, row) order once more."""
    quota = reference_quotas(paths, target, multiplier, seed)
    key = order_keys(strategy, rows, sq, seed)
    counts = np.zeros(len(paths), np.int64)
    leaf_of = [tuple(p[::-1]) for p in paths]
    members: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaf_of):
        members.setdefault(leaf, []).append(i)
    for leaf, idx in members.items():
        ranked = sorted(idx, key=lambda i: (int(key[i]), int(rows[i])))
        q, s = quota[leaf], len(idx)
        for rank, i in enumerate(ranked):
            counts[i] = q // s + (rank < q % s)
    return counts


def run_parts(tmp, paths, sq, clustered, cuts, target, **kw):
    ing, clu, out, offsets = write_parts(tmp, paths, sq, clustered, cuts)
    res = bp.balance_parts(ing, clu, out, offsets, target, depth=paths.shape[1], **kw)
    t = read_table(tmp / "balance")
    return res, t


@pytest.fixture
def small_windows(monkeypatch):
    """Windows, budgets and histograms so small that thresholds take several histogram passes."""
    monkeypatch.setattr(bp, "WINDOW", 3)
    monkeypatch.setattr(bp, "COLLECT_BUDGET", 40)
    monkeypatch.setattr(bp, "HIST_CELLS", 64)


@pytest.mark.parametrize("strategy,ties,target,multiplier", [("r", False, 900, 1), ("c", False, 700, 1),
                                                             ("c", True, 1300, 1), ("r", False, 4000, 3),
                                                             ("c", True, 3500, 2)])
def test_streamed_selection_equals_the_whole_table_reference(tmp_path, small_windows, strategy, ties, target,
                                                             multiplier):
    paths, sq, clustered = pool(7, 2000, ties)
    res, t = run_parts(tmp_path, paths, sq, clustered, [300, 301, 1250], target, strategy=strategy,
                       multiplier=multiplier, seed=5)
    rows = np.flatnonzero(clustered)
    want = reference(paths[rows], sq[rows], rows, target, strategy, multiplier, 5)
    repeats = np.array(t.column("repeats").to_pylist(), dtype=object)
    assert all(r is None for r in repeats[~clustered])  # null where a record was not clustered
    got = repeats[rows].astype(np.int64)
    assert np.array_equal(got, want)
    assert got.sum() == min(target, len(rows) * multiplier) == res.repeats
    assert res.passes > 4  # the thresholds took histogram passes, not one window
    # per leaf, the selection is the water-fill quota
    quota = reference_quotas(paths[rows], target, multiplier, 5)
    per_leaf: dict[tuple, int] = {}
    for p, c in zip(paths[rows], got):
        per_leaf[tuple(p[::-1])] = per_leaf.get(tuple(p[::-1]), 0) + int(c)
    assert per_leaf == {k: v for k, v in quota.items()}
    # labels and report as the in-memory balanced_sample gives them
    mem = balanced_sample(paths[rows], target, strategy=strategy, sq_dists=sq[rows], multiplier=multiplier, seed=5,
                          rows=rows)
    assert np.array_equal(mem.counts, got)
    by = np.array([x or "" for x in t.column("selected_by").to_pylist()], dtype=object)[rows]
    assert (by == mem.selected_by).all() and res.report == mem.report
    assert res.selected == int((got > 0).sum()) == mem.report["unique"]


def test_the_part_split_does_not_change_the_selection(tmp_path, small_windows):
    paths, sq, clustered = pool(3, 1500, ties=True)
    outs = []
    for i, cuts in enumerate(([], [10, 11, 12, 700], list(range(100, 1500, 100)))):
        _, t = run_parts(tmp_path / str(i), paths, sq, clustered, cuts, 600, strategy="c", seed=2)
        outs.append(t.drop(["id"]))
    assert outs[0].equals(outs[1]) and outs[0].equals(outs[2])


def test_r_keys_are_a_function_of_seed_and_row():
    rows = np.arange(10_000, 20_000)
    a = order_keys("r", rows, seed=3)
    assert np.array_equal(a[500:700], order_keys("r", rows[500:700], seed=3))  # any slice computes its own
    assert not np.array_equal(a, order_keys("r", rows, seed=4)) and len(np.unique(a)) == len(a)
    # uniform enough that a quantile threshold sits where it should
    assert abs(float(np.mean(a < np.uint64(1 << 63))) - 0.5) < 0.02


def test_c_keys_sort_as_the_distances():
    d = np.array([0.5, 0.0, -0.0, 3e-39, 1e30, 2.0, 0.5, -1.0, np.inf], dtype=np.float64)
    k = order_keys("c", np.arange(len(d)), d)
    assert np.array_equal(np.lexsort((np.arange(len(d)), k)), np.lexsort((np.arange(len(d)), d)))
    assert k[1] == k[2]  # -0.0 == 0.0, as float comparison has it


def test_seed_retrievals_count_once_where_balance_did_not_pick(tmp_path):
    paths, sq, clustered = pool(1, 400, ties=False)
    ing, clu, out, offsets = write_parts(tmp_path, paths, sq, clustered, [150])
    rows = np.flatnonzero(clustered)
    base = balanced_sample(paths[rows], 50, strategy="c", sq_dists=sq[rows], seed=0, rows=rows)
    picked, unpicked = rows[base.counts > 0][:2], rows[base.counts == 0][:3]
    got = np.sort(np.concatenate([picked, unpicked]))
    sets = np.array(["b" if r in unpicked[:1] else "a" for r in got], dtype=object)
    seeds = {}
    for k in (0, 1):
        w = (got >= offsets[k]) & (got < (offsets[k + 1] if k + 1 < len(offsets) else 400))
        seeds[k] = (got[w] - offsets[k], sets[w], [f"s{r}" for r in got[w]], np.full(int(w.sum()), 0.5, np.float32))
    res = bp.balance_parts(ing, clu, out, offsets, 50, depth=3, strategy="c", seeds=seeds, seed_sets=["a", "b"])
    t = read_table(tmp_path / "balance").to_pylist()
    assert res.selected == 53 and res.repeats == 53
    for r in got:
        row = t[r]
        assert row["seed_id"] == f"s{r}" and row["seed_sim"] == 0.5 and row["repeats"] == 1
        fresh = r in unpicked
        assert row["selected_by"] == (f"seed:{sets[got == r][0]}" if fresh else base.selected_by[rows == r][0])
    assert sum(1 for x in t if x["seed_set"] is not None) == 5


@pytest.mark.parametrize("scale", [1, 2**30])  # one int64 code per path, or (too wide for it) rows
def test_unique_leaves_are_the_sorted_paths_top_level_first(scale):
    from curate.balance import unique_leaves

    paths, _, _ = pool(4, 500, ties=False)
    paths = paths * scale + np.array([0, 7, -3])
    leaves, sizes, leaf = unique_leaves(paths)
    want = sorted({tuple(p[::-1]) for p in paths.tolist()})
    assert [tuple(x[::-1]) for x in leaves.tolist()] == want
    assert np.array_equal(leaves[leaf], paths) and sizes.sum() == 500
    assert sizes.tolist() == [sum(1 for p in paths.tolist() if tuple(p[::-1]) == w) for w in want]
