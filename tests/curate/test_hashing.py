"""Tests for curate.hashing: pHash packing, exact Hamming pair search and dedup decisions."""

from __future__ import annotations

import hashlib
import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from curate.hashing import (
    DEFAULT_MAX_DISTANCE,
    choose_plan,
    dedup,
    hamming_u64,
    phash_pairs,
    phash_u64,
)
from pipelines.synth import encode, make_image, reencode, resized

_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def flip(rng: np.random.Generator, value: np.uint64, distance: int) -> np.uint64:
    """value with exactly `distance` random bits flipped."""
    bits = rng.choice(64, distance, replace=False)
    return np.bitwise_xor(value, np.bitwise_or.reduce(_BIT[bits], initial=np.uint64(0)))


def planted_hashes(n: int, max_distance: int, seed: int = 0) -> np.ndarray:
    """Random hashes with planted pairs at every distance 0..max_distance+2 (3 each)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = 0
    for distance in range(max_distance + 3):
        for _ in range(3):
            values[k + 1] = flip(rng, values[k], distance)
            k += 2
    return values[rng.permutation(n)]


def brute_pairs(values: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """All pairs i < j within max_distance, by dense numpy popcount."""
    dist = hamming_u64(values[:, None], values[None, :])
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_phash_u64_matches_imagehash_hex() -> None:
    img = make_image(3)
    value = phash_u64(img)
    assert 0 <= value < 2**64
    assert f"{value:016x}" == str(imagehash.phash(img, hash_size=8))


def test_hamming_u64_broadcasts_and_has_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.array([0, 2**64 - 1, 0b1011], dtype=np.uint64)
    b = np.array([0, 0, 0b0110], dtype=np.uint64)
    assert hamming_u64(a, b).tolist() == [0, 64, 3]
    assert hamming_u64(a[:, None], b[None, :]).shape == (3, 3)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert hamming_u64(a, b).tolist() == [0, 64, 3]
    assert hamming_u64(a[:, None], b[None, :])[1].tolist() == [64, 64, 62]


@pytest.mark.parametrize("max_distance", [0, 4, 8, 10])
@pytest.mark.parametrize(("tables", "chunk"), [(None, 65536), (0, 700), (3, 65536), (4, 700)])
def test_phash_pairs_equals_brute_force(max_distance: int, tables: int | None, chunk: int) -> None:
    values = planted_hashes(3000, max_distance)
    i, j, d = phash_pairs(values, max_distance, chunk=chunk, tables=tables)
    assert i.dtype == np.int64 and j.dtype == np.int64 and d.dtype == np.uint8
    found = set(zip(i.tolist(), j.tolist()))
    assert len(found) == len(i)
    assert found == brute_pairs(values, max_distance)
    assert len(found) >= 3 * (max_distance + 1)
    assert np.array_equal(d, hamming_u64(values[i], values[j]))
    assert np.all(i < j)


def test_phash_pairs_many_identical_hashes_stay_linear() -> None:
    rng = np.random.default_rng(1)
    copies = 5000
    same = np.uint64(0x0123456789ABCDEF)
    near_value = flip(rng, same, 2)
    values = np.concatenate(
        [
            np.full(copies, same, dtype=np.uint64),
            [near_value],
            rng.integers(0, 2**64, 200, dtype=np.uint64),
        ]
    )
    perm = rng.permutation(len(values))
    values = values[perm]
    i, j, d = phash_pairs(values, 4)
    assert len(i) == copies  # 4,999 star edges + 1 pair to the near copy, not ~12.5M pairs
    assert np.sum(d == 0) == copies - 1
    members = np.flatnonzero(values == same)
    near = np.flatnonzero(values == near_value)
    linked = set(i.tolist()) | set(j.tolist())
    assert set(members.tolist()) | set(near.tolist()) == linked
    ids = [f"id{k:05d}" for k in range(len(values))]
    result = dedup(ids, [None] * len(values), values, np.ones(len(values)), 4)
    group_ids = np.unique(result.group[list(linked)])
    assert group_ids.tolist() == [0]
    assert result.keep.sum() == len(values) - copies


def test_phash_pairs_edge_cases() -> None:
    empty = phash_pairs(np.empty(0, np.uint64), 4)
    assert [len(a) for a in empty] == [0, 0, 0]
    assert len(phash_pairs(np.array([5], np.uint64), 4)[0]) == 0
    assert len(phash_pairs(np.array([5, 5, 4], np.uint64), -1)[0]) == 0
    i, j, d = phash_pairs(np.array([5, 5, 4], np.uint64), 1)
    assert list(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 0), (0, 2, 1)]


def test_choose_plan_flat_for_small_multihash_for_large() -> None:
    assert choose_plan(2000, DEFAULT_MAX_DISTANCE).tables == 0
    plan = choose_plan(1_000_000, DEFAULT_MAX_DISTANCE)
    assert plan.tables >= 2
    assert plan.nflip == DEFAULT_MAX_DISTANCE // plan.tables
    assert plan.tables * plan.bits <= 64


def _record(rid: str, data: bytes) -> dict:
    """ids/sha256/phash/pixels of one encoded image, as the ingest stage would compute them."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return {
        "id": rid,
        "sha": hashlib.sha256(data).hexdigest(),
        "phash": phash_u64(img),
        "pixels": img.width * img.height,
    }


def make_records() -> list[dict]:
    """Groups of copies of generated images plus distinct singletons.

    Seeds 0..5: original, byte-identical copy, JPEG re-encode, half-size copy (keeper: original).
    Seeds 6..9: as above plus a 1.5x upscale with a larger id (keeper: the upscale).
    Seeds 10..39: one distinct image each.
    """
    records = []
    for seed in range(40):
        img = make_image(seed, (128, 96))
        png = encode(img, "PNG")
        records.append(_record(f"s{seed:02d}-a", png))
        if seed >= 10:
            continue
        records.append(_record(f"s{seed:02d}-b", png))
        records.append(_record(f"s{seed:02d}-c", reencode(img, 75)))
        records.append(_record(f"s{seed:02d}-d", encode(resized(img, 0.5), "PNG")))
        if seed >= 6:
            records.append(_record(f"s{seed:02d}-z", reencode(resized(img, 1.5), 90)))
    return records


def run_dedup(records: list[dict], max_distance: int = DEFAULT_MAX_DISTANCE) -> dict[str, tuple]:
    result = dedup(
        [r["id"] for r in records],
        [r["sha"] for r in records],
        np.array([r["phash"] for r in records], dtype=np.uint64),
        np.array([r["pixels"] for r in records]),
        max_distance,
    )
    assert result.group.dtype == np.int64 and result.distance.dtype == np.int16
    return {
        r["id"]: (
            bool(result.keep[k]),
            result.dup_of[k],
            result.reason[k],
            int(result.group[k]),
            int(result.distance[k]),
        )
        for k, r in enumerate(records)
    }


def test_dedup_exact_near_keeper_and_distinct() -> None:
    out = run_dedup(make_records())
    for seed in range(10):
        s = f"s{seed:02d}"
        keeper = f"{s}-z" if seed >= 6 else f"{s}-a"
        members = [f"{s}-{x}" for x in "abcd"] + ([f"{s}-z"] if seed >= 6 else [])
        assert out[keeper][:3] == (True, None, None)
        assert out[keeper][4] == -1
        assert len({out[m][3] for m in members}) == 1 and out[keeper][3] >= 0
        for m in members:
            if m != keeper:
                keep, dup_of, reason, _, distance = out[m]
                assert (keep, dup_of) == (False, keeper)
                assert 0 <= distance
                expected = "exact" if seed < 6 and m == f"{s}-b" else "near"
                assert reason == expected, (m, out[m])
    assert out["s00-b"][4] == 0
    for seed in range(10, 40):
        assert out[f"s{seed:02d}-a"] == (True, None, None, -1, -1)
    groups = [out[f"s{seed:02d}-a"][3] for seed in range(10)]
    assert groups == sorted(groups) == list(range(10))  # numbered by smallest id


def test_dedup_is_order_invariant() -> None:
    records = make_records()
    reference = run_dedup(records)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(records))
        assert run_dedup([records[k] for k in perm]) == reference


def test_dedup_exact_only_when_perceptual_disabled() -> None:
    out = run_dedup(make_records(), max_distance=-1)
    dropped = {rid: v for rid, v in out.items() if not v[0]}
    assert set(dropped) == {f"s{seed:02d}-b" for seed in range(10)}
    assert all(v[1] == rid[:3] + "-a" and v[2] == "exact" for rid, v in dropped.items())


def test_dedup_missing_sha_links_nothing_and_ids_must_be_unique() -> None:
    phash = np.array([1, 2**40, 2**63], dtype=np.uint64)
    result = dedup(["a", "b", "c"], [None, "", None], phash, np.array([1, 1, 1]), 0)
    assert result.keep.all() and result.group.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="unique"):
        dedup(["a", "a"], ["x", "y"], phash[:2], np.array([1, 1]), 4)
    empty = dedup([], [], np.empty(0, np.uint64), np.empty(0), 4)
    assert len(empty.keep) == 0 and empty.dup_of == []


def test_phash_fast_is_close_to_imagehash_and_keeps_the_bit_order() -> None:
    from curate.hashing import phash_fast_u64

    for seed in range(20):
        img = make_image(seed, (512, 384))
        assert bin(phash_fast_u64(img) ^ phash_u64(img)).count("1") <= 6, seed
    small = make_image(99, (32, 32))  # no reduction: the same pixels, only the DCT differs
    assert phash_fast_u64(small) == phash_u64(small)
