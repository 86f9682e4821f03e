"""curate.hash_bands: the banded map/reduce gives exactly curate.hashing.dedup's outcome, whatever the
number of bands and map groups, including exact copies, chains of near copies and missing sha256."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.copy_graph_parts import part_buckets
from curate.hash_bands import band_edges, band_kinds, map_bands, phash_fields, write_dup_part, write_groups
from curate.hashing import dedup
from tests.curate.test_hashing import flip


def _pool(n: int, seed: int) -> pa.Table:
    """Records with exact copies (same sha256 and pHash), near copies at distances 1..10, chains, a
    few non-ok rows and ok rows without a sha256."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**64, n, dtype=np.uint64)
    sha = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    for i in range(0, n - 1, 7):  # exact copies
        phash[i + 1], sha[i + 1] = phash[i], sha[i]
    for i in range(3, n - 1, 5):  # near copies, some chained (i+1 is again copied at i+2 when i+2 % 5 == 3)
        phash[i + 1] = flip(rng, phash[i], int(rng.integers(1, 11)))
    status = np.where(rng.random(n) < 0.05, "decode_error", "ok").astype(object)
    sha = [None if (s == "ok" and rng.random() < 0.03) else h for s, h in zip(status, sha)]
    return pa.table({"id": [f"{rng.integers(0, 2**62):016x}{i}" for i in range(n)], "status": status.tolist(),
                     "sha256": sha, "phash": pa.array(phash, pa.uint64()),
                     "width": rng.integers(32, 90, n).astype(np.int32), "height": np.full(n, 64, np.int32)})


def _banded(paths: list[str], out_dir, max_distance: int, exact: bool, n_bands: int, n_maps: int,
            bucket_rows: int):
    """The Ray executor's path in this process: map groups, band reducers writing edges, then the
    copy graph's jobs over buckets of about bucket_rows rows."""
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    groups = [[(paths[k], int(offsets[k])) for k in ks] for ks in np.array_split(np.arange(len(paths)), n_maps)]
    outs = [map_bands(g, max_distance, exact, n_bands) for g in groups]
    kinds = band_kinds(max_distance, exact, n_bands)
    assert all(len(o) == len(kinds) for o in outs)
    bounds = part_buckets(offsets, bucket_rows)
    files = [str(out_dir / "_graph" / "edges" / f"{r}.arrow") for r in range(len(kinds))]
    for r, kind in enumerate(kinds):
        band_edges(files[r], bounds, kind, max_distance, *[o[r] for o in outs])
    return write_groups([str(p) for p in paths], offsets, out_dir, out_dir / "_graph", files, bounds, exact)


def _reference(tmp_path, paths, max_distance: int, exact: bool):
    """`dedup` over all ok records, written part by part: (its folder, its result, the ok ids)."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    tables = [pq.read_table(p) for p in paths]
    oks = [np.flatnonzero(np.array(t.column("status").to_pylist(), dtype=object) == "ok") for t in tables]
    sub = pa.concat_tables([t.take(pa.array(ok, pa.int64())) for t, ok in zip(tables, oks)])
    ids = sub.column("id").to_pylist()
    ref = dedup(ids, sub.column("sha256").to_pylist() if exact else [f"#{i}" for i in ids],
                sub.column("phash").to_numpy(), sub.column("width").to_numpy().astype(np.int64) * 64, max_distance)
    start = 0
    for k, (p, ok) in enumerate(zip(paths, oks)):
        sl = slice(start, start + len(ok))
        write_dup_part(p, ref_dir / f"part-{k:05d}.parquet", ok, ref.dup_of[sl], ref.reason[sl], ref.group[sl],
                       ref.distance[sl])
        start += len(ok)
    return ref_dir, ref, ids


def _assert_outcome(got, out_dir, ref_dir, ref, ids, n_parts: int, max_distance: int, exact: bool):
    n_ok, dropped, groups = got
    assert n_ok == len(ids) and groups == len(np.unique(ref.group[ref.group >= 0]))
    want = {f"duplicate_{r}": ref.reason.count(r) for r in ("exact", "near") if ref.reason.count(r)}
    assert dropped == want
    if max_distance >= 4:
        assert set(want) == ({"duplicate_exact", "duplicate_near"} if exact else {"duplicate_near"})
    assert sorted(x.name for x in out_dir.iterdir()) == [f"part-{k:05d}.parquet" for k in range(n_parts)]
    for k in range(n_parts):
        name = f"part-{k:05d}.parquet"
        assert (out_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name


@pytest.mark.parametrize("max_distance, exact, n_bands, n_maps, bucket_rows", [
    (4, True, 3, 2, 10_000), (4, True, 1, 1, 100), (8, True, 5, 4, 250), (0, True, 2, 3, 1), (-1, True, 2, 2, 300),
    (4, False, 4, 2, 200), (20, True, 3, 2, 130)])
def test_banded_dedup_equals_dedup_over_all_records(tmp_path, max_distance, exact, n_bands, n_maps, bucket_rows):
    """Any number of bands, map groups and row buckets: the parts `dedup` over all ok records writes."""
    table = _pool(600, seed=max_distance + 7)
    paths = _write_pool(tmp_path, table, [130, 0, 250, 220])
    ref_dir, ref, ids = _reference(tmp_path, paths, max_distance, exact)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    got = _banded(paths, out_dir, max_distance, exact, n_bands, n_maps, bucket_rows)
    _assert_outcome(got, out_dir, ref_dir, ref, ids, len(paths), max_distance, exact)


def test_phash_fields_cover_all_bits_and_the_pigeonhole():
    for r in range(0, 16):
        fields = phash_fields(r)
        if 64 // (r + 1) >= 4:
            assert len(fields) == r + 1 and sum(w for _, w in fields) == 64
            assert [s for s, _ in fields] == list(np.cumsum([0] + [w for _, w in fields])[:-1])
        else:
            assert fields == [(0, 0)]
    assert phash_fields(-1) == []


def test_write_dup_part_fills_the_rows_without_a_value(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "status": ["ok", "decode_error", "ok", "ok"]}),
                   tmp_path / "in.parquet")
    n_ok = write_dup_part(tmp_path / "in.parquet", tmp_path / "out.parquet", np.array([3]), ["a"], ["near"],
                          np.array([0]), np.array([2], np.int16))
    t = pq.read_table(tmp_path / "out.parquet")
    assert n_ok == 3
    assert t.to_pydict() == {"id": ["a", "b", "c", "d"], "dup_of": [None, None, None, "a"],
                             "dup_reason": [None, None, None, "near"], "dup_group": [-1, -1, -1, 0],
                             "dup_distance": [-1, -1, -1, 2]}
    assert t.schema.field("dup_distance").type == pa.int16()


def _write_pool(tmp_path, table: pa.Table, sizes: list[int]) -> list:
    paths, start = [], 0
    for k, size in enumerate(sizes):
        paths.append(tmp_path / f"part-{k:05d}.parquet")
        pq.write_table(table.slice(start, size), paths[-1])
        start += size
    return paths


@pytest.mark.parametrize("max_distance, exact, band_rows, buffer_bytes", [
    (4, True, 100, 1), (4, True, 10_000, 64 << 20), (8, True, 150, 5000), (0, True, 90, 1), (-1, True, 200, 1),
    (4, False, 120, 1), (20, True, 100, 1)])
def test_spilled_dedup_writes_the_parts_dedup_over_all_records_gives(tmp_path, max_distance, exact, band_rows,
                                                                     buffer_bytes):
    """The local executor's disk-spilled bands write byte-identical parts to `dedup` over all ok records
    (the previous local path), whatever the band size and spill buffer."""
    from curate.hash_bands import dedup_spilled

    table = _pool(700, seed=max_distance + 11)
    paths = _write_pool(tmp_path, table, [130, 0, 250, 220, 100])
    ref_dir, ref, ids = _reference(tmp_path, paths, max_distance, exact)
    out_dir = tmp_path / "out"
    got = dedup_spilled(paths, out_dir, max_distance, exact, band_rows, buffer_bytes, bucket_rows=300)
    _assert_outcome(got, out_dir, ref_dir, ref, ids, len(paths), max_distance, exact)


def test_spilled_dedup_refuses_repeated_ids_among_linked_records(tmp_path):
    from curate.hash_bands import dedup_spilled

    table = _pool(60, seed=3)
    ids = table.column("id").to_pylist()
    ids[1] = ids[0]  # rows 0 and 1 are exact copies (linked)
    paths = _write_pool(tmp_path, table.set_column(0, "id", pa.array(ids)), [30, 30])
    with pytest.raises(ValueError, match="unique"):
        dedup_spilled(paths, tmp_path / "out", 4, True, 20, 1)


def test_spilled_dedup_of_a_pool_without_duplicates_marks_nothing(tmp_path):
    from curate.hash_bands import dedup_spilled

    rng = np.random.default_rng(5)
    n = 50
    table = pa.table({"id": [f"r{i:03d}" for i in range(n)], "status": ["ok"] * n,
                      "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
                      "phash": pa.array(rng.integers(0, 2**64, n, dtype=np.uint64), pa.uint64()),
                      "width": np.full(n, 64, np.int32), "height": np.full(n, 64, np.int32)})
    assert (dedup(table.column("id").to_pylist(), table.column("sha256").to_pylist(),
                  table.column("phash").to_numpy(), np.full(n, 4096), 4).group == -1).all()  # no link at all
    paths = _write_pool(tmp_path, table, [20, 30])
    assert dedup_spilled(paths, tmp_path / "out", 4, True, 10, 1) == (n, {}, 0)
    for k in range(2):
        t = pq.read_table(tmp_path / "out" / f"part-{k:05d}.parquet")
        assert t.column("dup_of").null_count == t.num_rows and set(t.column("dup_group").to_pylist()) == {-1}


def test_spread_bits_is_a_permutation_that_keeps_distances():
    """A band's pHashes are searched with their bits spread (curate.hash_bands.spread_bits): every bit lands
    on its own place, so Hamming distances, equal hashes and so the links are the same."""
    from curate.hash_bands import spread_bits
    from curate.hashing import hamming_u64

    one = np.uint64(1)
    singles = spread_bits(np.array([one << np.uint64(b) for b in range(64)], dtype=np.uint64))
    assert sorted(int(v).bit_length() - 1 for v in singles) == list(range(64))
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64) * np.uint64(2) for _ in range(2))
    assert np.array_equal(hamming_u64(a, b), hamming_u64(spread_bits(a), spread_bits(b)))
