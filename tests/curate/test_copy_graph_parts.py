"""Copy groups computed by jobs over row buckets (curate.copy_graph_parts) are group_edges's, value for value."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.copy_graph_parts import group_edge_files, write_edges
from curate.dedup import CopyDedupRefused, SafetyLimits, group_edges, merge_edges


def random_graph(seed: int, n: int = 400):
    """Chains, stars and pairs among n rows (some rows in no edge), ids in an order unlike the rows,
    pixel counts with ties."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    i, j = [], []
    pos = 0
    while pos < n * 0.7:
        size = int(rng.choice([2, 2, 3, 5, 9, 17]))
        members = perm[pos:pos + size]
        pos += size
        if rng.random() < 0.5:  # a chain: many label rounds
            i += members[:-1].tolist()
            j += members[1:].tolist()
        else:  # random edges over a spanning tree
            for a in range(1, len(members)):
                i.append(members[a])
                j.append(members[rng.integers(0, a)])
    i, j = np.array(i, dtype=np.int64), np.array(j, dtype=np.int64)
    i, j = np.minimum(i, j), np.maximum(i, j)
    sim = rng.uniform(0.9, 1.0, len(i)).astype(np.float32)
    ids = np.array([f"{rng.integers(0, 10**9):09d}-{r}" for r in range(n)])
    pixels = rng.integers(1, 4, n) * 100
    return (i, j, sim), ids, pixels


def run_parts(tmp_path, edges, ids, pixels, bounds, files=1, mapper=None, **kw):
    n = int(bounds[-1])
    paths = []
    cut = np.linspace(0, len(edges[0]), files + 1).astype(int)
    for f in range(files):  # every pair given by two files where there are several (two query ranges)
        lo, hi = cut[f], cut[f + 1] if files == 1 else min(cut[f + 1] + 5, len(edges[0]))
        paths.append(tmp_path / f"e{f}.arrow")
        write_edges(paths[-1], tuple(e[lo:hi] for e in edges), bounds)
    assert n == len(ids)
    return group_edge_files(tmp_path / "work", bounds, paths, lambda rows: (pa.array(ids[rows]), pixels[rows]),
                            mapper=mapper, **kw)


def assert_same(part, graph):
    groups = pa.concat_tables(list(part.group_tables()))
    assert groups.combine_chunks().equals(graph.groups.combine_chunks())
    got = pa.concat_tables([part.members(int(lo), int(hi)) for lo, hi in zip(part.bounds[:-1], part.bounds[1:])])
    assert np.array_equal(got.column("row").to_numpy(), graph.nodes)
    assert got.column("copy_of").combine_chunks().equals(graph.copy_of().cast(pa.string()))
    assert np.array_equal(got.column("group").to_numpy(), graph.group)
    assert np.array_equal(got.column("max_sim").to_numpy(), graph.max_sim)
    stats = dict(part.stats)
    assert stats.pop("label_rounds") >= 1
    assert stats == graph.stats


@pytest.mark.parametrize("seed,bounds,files", [(0, [0, 400], 1), (1, [0, 120, 121, 300, 400], 2),
                                               (2, [0, 50, 100, 150, 200, 250, 300, 350, 400], 3),
                                               (3, [0, 0, 200, 400, 400], 1)])
def test_buckets_give_group_edges_result(tmp_path, seed, bounds, files):
    edges, ids, pixels = random_graph(seed)
    bounds = np.array(bounds)
    part = run_parts(tmp_path, edges, ids, pixels, bounds, files=files, k=5, threshold=0.9, limits=None)
    graph = group_edges(400, merge_edges(edges), lambda rows: (ids[rows], pixels[rows]), k=5, threshold=0.9,
                        limits=None)
    assert graph.stats["groups"] > 20 and graph.stats["largest_component"] == 17
    assert_same(part, graph)
    assert part.stats["label_rounds"] > 5  # chains of 17 took several rounds


@pytest.mark.parametrize("order", ["up", "down", "random"])
def test_long_chains_take_logarithmic_rounds(tmp_path, order):
    """Labels jump along label chains: a chain of 3,000 records (rows rising along it, falling, or in a
    random order) and one of 300 settle in at most 3 log2 L + 6 rounds (propagation alone took up to L),
    with group_edges's result."""
    rng = np.random.default_rng(7)
    n = 3300
    rows = {"up": np.arange(n), "down": np.arange(n)[::-1], "random": rng.permutation(n)}[order]
    i = np.r_[rows[:2999], rows[3000:3299]]
    j = np.r_[rows[1:3000], rows[3001:3300]]
    edges = (np.minimum(i, j), np.maximum(i, j), rng.uniform(0.9, 1.0, len(i)).astype(np.float32))
    ids, pixels = np.array([f"{rng.integers(0, 10**9):09d}-{r}" for r in range(n)]), rng.integers(1, 3, n)
    part = run_parts(tmp_path, edges, ids, pixels, np.array([0, 1000, 2000, n]), limits=None, max_component=n)
    graph = group_edges(n, merge_edges(edges), lambda rows: (ids[rows], pixels[rows]), limits=None, max_component=n)
    assert graph.stats["groups"] == 2 and graph.stats["largest_component"] == 3000
    assert 2 * np.log2(3000) - 6 < part.stats["label_rounds"] <= 3 * np.log2(3000) + 6
    assert_same(part, graph)


def test_a_pair_takes_two_rounds(tmp_path):
    edges = (np.array([3]), np.array([8]), np.ones(1, np.float32))
    ids, pixels = np.array([f"r{r}" for r in range(10)]), np.ones(10, dtype=np.int64)
    part = run_parts(tmp_path, edges, ids, pixels, np.array([0, 5, 10]), limits=None)
    assert part.stats["label_rounds"] == 2 and part.stats["groups"] == 1


def test_no_edges_and_retried_jobs(tmp_path):
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    ids, pixels = np.array([f"r{r}" for r in range(10)]), np.ones(10, dtype=np.int64)
    part = run_parts(tmp_path, none, ids, pixels, np.array([0, 4, 10]))
    assert part.stats["groups"] == 0 and part.stats["kept"] == 10
    assert len(pa.concat_tables(list(part.group_tables()))) == 0

    def twice(fn, jobs, shared=()):  # every job run again after it finished (a task retried)
        for k, job in enumerate(jobs):
            fn(*shared, *job)
            yield k, fn(*shared, *job)

    edges, ids, pixels = random_graph(4)
    graph = group_edges(400, edges, lambda rows: (ids[rows], pixels[rows]), limits=None)
    assert_same(run_parts(tmp_path / "b", edges, ids, pixels, np.array([0, 100, 400]), mapper=twice, limits=None),
                graph)


def test_refuses_as_group_edges(tmp_path):
    n = 100
    i = np.arange(n - 1)
    edges = (i, i + 1, np.ones(n - 1, dtype=np.float32))  # one chain through the whole pool
    ids, pixels = np.array([f"{r:03d}" for r in range(n)]), np.ones(n, dtype=np.int64)
    with pytest.raises(CopyDedupRefused) as direct:
        group_edges(n, edges, lambda rows: (ids[rows], pixels[rows]), limits=SafetyLimits())
    with pytest.raises(CopyDedupRefused) as parts:
        run_parts(tmp_path, edges, ids, pixels, np.array([0, 30, 100]), limits=SafetyLimits())
    assert str(parts.value) == str(direct.value)
    assert not (tmp_path / "work" / "out").exists()  # nothing numbered


def test_edges_outside_rows_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_edges(tmp_path / "e.arrow", (np.array([0]), np.array([10]), np.ones(1, np.float32)), np.array([0, 10]))


def test_extra_columns_reach_each_member_with_its_keepers(tmp_path):
    """node_info's extra columns (here a pHash-like integer and a nullable string) come back per member,
    with its keeper's: what hash dedup needs for distances and exact copies."""
    edges, ids, pixels = random_graph(5)
    code = np.arange(400, dtype=np.uint64) * 7919
    tag = pa.array([None if r % 3 == 0 else f"t{r % 5}" for r in range(400)], type=pa.string())
    bounds = np.array([0, 130, 260, 400])
    paths = [tmp_path / "e.arrow"]
    write_edges(paths[0], edges, bounds)
    part = group_edge_files(tmp_path / "w", bounds, paths, lambda rows: (
        pa.array(ids[rows]), pixels[rows], {"code": code[rows], "tag": tag.take(pa.array(rows))}), limits=None)
    graph = group_edges(400, edges, lambda rows: (ids[rows], pixels[rows]), limits=None)
    got = pa.concat_tables([part.members(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])])
    keeper_row = graph.nodes[graph.keeper]
    assert np.array_equal(got.column("code").to_numpy(), code[graph.nodes])
    assert np.array_equal(got.column("keeper_code").to_numpy(), code[keeper_row])
    assert got.column("keeper_tag").combine_chunks().equals(tag.take(pa.array(keeper_row)))
    assert got.column("tag").combine_chunks().equals(tag.take(pa.array(graph.nodes)))
    assert len(part.members(400, 400)) == 0 and part.members(400, 400).column_names == got.column_names


@pytest.mark.parametrize("a,b", [(0, 1), (0, 399)])
def test_repeated_ids_are_an_error(tmp_path, a, b):
    """An id given to two grouped records, in one group or in two (whose smallest ids fall in different
    ranges), is an error, as group_edges' ranks make it."""
    n = 400
    i = np.arange(0, n, 2)
    edges = (i, i + 1, np.ones(len(i), np.float32))
    ids = np.array([f"{r:04d}" for r in range(n)])
    ids[b] = ids[a]
    with pytest.raises(ValueError, match="unique"):
        group_edges(n, edges, lambda rows: (ids[rows], np.ones(len(rows))), limits=None)
    with pytest.raises(ValueError, match="unique: '0000' is repeated"):
        run_parts(tmp_path, edges, ids, np.ones(n, np.int64), np.array([0, 100, 250, 400]), limits=None)
