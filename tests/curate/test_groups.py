"""Copy groups with Arrow ids: the same ranks, groups and keeper ids as with numpy text, and the string
columns a pool past 2 GB of ids needs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.groups import arrow_id_ranks, id_ranks, large_strings, take_string_lists, take_strings


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique ids mixing ASCII, accents and characters outside the BMP (UTF-8 lengths 1 to 4)."""
    alphabet = np.array(list("aZ09_/-é中🙂"))
    ids = {"".join(rng.choice(alphabet, int(rng.integers(1, 9)))) for _ in range(n * 2)}
    return np.array(sorted(ids)[:n])[rng.permutation(n)]


def test_arrow_ranks_equal_numpy_ranks_for_every_input_form():
    rng = np.random.default_rng(0)
    ids = _ids(rng, 3000)
    want_ids, want_rank = id_ranks(ids)
    chunked = pa.chunked_array([pa.array(ids[:1000]), pa.array(ids[1000:])])
    for given in (ids, list(ids), pa.array(ids), chunked, pa.array(ids).dictionary_encode()):
        arr, rank = arrow_id_ranks(given)
        assert arr.type == pa.large_string() and arr.to_pylist() == want_ids.tolist()
        assert np.array_equal(rank, want_rank)
    with pytest.raises(ValueError, match="unique"):
        arrow_id_ranks(np.concatenate([ids, ids[5:6]]))
    with pytest.raises(ValueError, match="null"):
        arrow_id_ranks(pa.array(["a", None]))
    arr, rank = arrow_id_ranks(pa.chunked_array([], type=pa.string()))
    assert len(arr) == 0 and len(rank) == 0


def test_taken_string_chunks_give_the_same_parquet_bytes(tmp_path):
    """Keeper ids and member lists taken in `string` chunks of any size write the bytes of one whole column."""
    rng = np.random.default_rng(1)
    ids = large_strings(_ids(rng, 500))
    keepers = rng.permutation(500)[:120]
    sizes = rng.integers(1, 5, 120)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    members = rng.permutation(500)[: offsets[-1]]
    names = np.array(ids.to_pylist(), dtype=object)
    whole = pa.table({"keeper": pa.array(names[keepers].tolist(), type=pa.string()),
                      "members": pa.array([names[members[a:b]].tolist() for a, b in zip(offsets[:-1], offsets[1:])],
                                          type=pa.list_(pa.string()))})
    pq.write_table(whole, tmp_path / "whole.parquet")
    for rows in (1, 7, 119, 1 << 20):
        t = pa.table({"keeper": take_strings(ids, keepers, rows),
                      "members": take_string_lists(ids, offsets, members, rows)})
        assert t.schema.equals(whole.schema) and t.equals(whole)
        pq.write_table(t, tmp_path / f"{rows}.parquet")
        assert (tmp_path / f"{rows}.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    empty = pa.table({"keeper": take_strings(ids, np.zeros(0)), "members": take_string_lists(ids, [0], np.zeros(0))})
    assert empty.num_rows == 0 and empty.schema.equals(whole.schema)


def test_copy_graph_keeper_ids_by_range_match_the_dropped_records():
    from curate.dedup import group_edges

    rng = np.random.default_rng(2)
    ids = _ids(rng, 1000)
    nodes = np.sort(rng.choice(1000, 300, replace=False))
    i, j = nodes[rng.integers(0, 300, 400)], nodes[rng.integers(0, 300, 400)]
    keep = i != j
    pixels = rng.integers(1, 4, 1000) * 100
    graph = group_edges(1000, (i[keep], j[keep], rng.random(int(keep.sum())).astype(np.float32)),
                        lambda rows: (pa.array(ids[rows]), pixels[rows]), limits=None, max_component=1000)
    rows, keepers = graph.dropped()
    whole = graph.copy_of()
    assert whole.null_count == int(graph.keep.sum()) and len(whole) == len(graph.nodes)
    assert whole.drop_null().to_pylist() == keepers.to_pylist()
    assert np.array_equal(graph.nodes[~np.asarray(whole.is_null())], rows)
    pieces = [graph.copy_of(lo, min(lo + 37, len(graph.nodes))) for lo in range(0, len(graph.nodes), 37)]
    assert sum((p.to_pylist() for p in pieces), []) == whole.to_pylist()
    # the keeper has the most pixels, then the smallest id, among its group's members
    by_id = {s: r for r, s in enumerate(ids.tolist())}
    for g in graph.groups.to_pylist():
        best = min(g["members"], key=lambda s: (-pixels[by_id[s]], s))
        assert g["keeper"] == best
