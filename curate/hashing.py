"""Exact (sha256) and perceptual (64-bit pHash) duplicate detection.

Perceptual near-duplicates are found with an exact Hamming range search: FAISS multi-index
hashing (``IndexBinaryMultiHash``) for large inputs, brute force (``IndexBinaryFlat``) for small
ones. Identical hashes are collapsed before the search so that many copies of one image cost
O(copies), not O(copies^2). Records linked by either kind of edge form connected components;
one keeper is kept per component.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import comb

import numpy as np
from PIL import Image

from curate.groups import id_ranks, pick_keepers

# Largest pHash Hamming distance treated as "same image". Chosen by bench/phash_threshold.py
# (3,000 synthetic images and 3,000 Fashion-MNIST test images, 7,000 edited copies each: JPEG
# q30..95, resize 0.5x..2x, blur, combinations): 4 is the smallest threshold reaching the best
# recall among those whose false-merge rate of distinct pairs is about 0 (<= 1e-4) on both sets:
# recall 0.9990 / 0.9991, false-merge rate 0 / 8.7e-5. At 6 Fashion-MNIST false merges rise to
# 3.9e-4 for +0.1% recall. pHash hashes have exactly 32 bits set, so distances are even: 4 == 5.
DEFAULT_MAX_DISTANCE = 4

# Cost model for choosing the search plan, in CPU nanoseconds, fitted to the CPU times of
# IndexBinaryFlat and IndexBinaryMultiHash with 2..5 tables (n = 200k and 1M random hashes,
# max_distance 4, and 8 with 3 tables; the settings of bench/hashdedup.py): fixed cost per
# query, a table probe, a probe that hits a non-empty bucket, a shortlisted candidate (set insert
# plus Hamming check), one brute-force comparison, and one single-threaded insert per table.
# At n = 1M and max_distance 4 it picks 3 tables of 21 bits with 1 flip, the fastest measured
# (CPU s: 3 tables 10.8, 5 tables 38, 4 tables 89, 2 tables 77, brute force about 300).
_NS_QUERY = 2000.0
_NS_PROBE = 70.0
_NS_HIT = 150.0
_NS_CANDIDATE = 60.0
_NS_FLAT = 0.3
_NS_ADD = 100.0
_MAX_TABLES = 16

_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def phash_u64(img: Image.Image) -> int:
    """64-bit pHash (imagehash.phash, hash_size=8) of a decoded image as an unsigned int.

    Bit order: the 8x8 boolean DCT-sign matrix is flattened row-major and its first element is
    the most significant bit, so ``f"{phash_u64(img):016x}" == str(imagehash.phash(img))``.
    The caller passes the image after EXIF transpose and first-frame selection.
    """
    import imagehash  # imported here (as faiss and scipy below): ingest workers hash without them

    bits = np.asarray(imagehash.phash(img, hash_size=8).hash, dtype=bool).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# Fast pHash: the same algorithm as imagehash.phash (32x32 LANCZOS grey image, 2-D DCT-II, the 8x8
# low frequencies against their median), with two shortcuts: the image is box-reduced to within
# _REDUCING_GAP of 32 px before the LANCZOS pass (PIL's reducing_gap), and the DCT is two small
# matrix products instead of scipy.fftpack. check_image also feeds it a JPEG decoded in draft
# mode (DCT-domain downscaling). Values can differ from imagehash by a few bits (bench/RESULTS.md,
# "Ingest speed (issue 16)"); phash_u64 stays imagehash-exact.
_REDUCING_GAP = 3.0
_N = np.arange(32)
_DCT8 = 2.0 * np.cos(np.pi * np.arange(8)[:, None] * (2 * _N[None, :] + 1) / 64.0)  # scipy dct type II rows 0..7


def phash_fast_u64(img: Image.Image) -> int:
    """64-bit pHash like ``phash_u64`` computed from a reduced image (can differ from it by a few bits).

    Same bit order as phash_u64. The caller passes the image after EXIF transpose and first-frame
    selection; any size works (check_image passes a JPEG drafted to >= 32 px a side). The grey
    image is box-reduced to within _REDUCING_GAP of 32 px, then resampled to 32x32 with PIL's
    LANCZOS weights as two matrix products (in floats, no rounding between the passes).
    """
    grey = img.convert("L") if img.mode != "L" else img
    w, h = grey.size
    fx, fy = max(1, int(w / 32 / _REDUCING_GAP)), max(1, int(h / 32 / _REDUCING_GAP))
    if fx > 1 or fy > 1:
        grey = grey.reduce((fx, fy))
    pixels = np.asarray(grey, dtype=np.float64)
    small = _lanczos_weights(pixels.shape[0]) @ pixels @ _lanczos_weights(pixels.shape[1]).T
    low = (_DCT8 @ small @ _DCT8.T).reshape(-1)
    mid = np.partition(low, (31, 32))
    bits = low > (mid[31] + mid[32]) / 2  # np.median of 64 values
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@lru_cache(maxsize=512)
def _lanczos_weights(size_in: int, size_out: int = 32) -> np.ndarray:
    """(size_out, size_in) resampling matrix with the weights of PIL's LANCZOS (a = 3) resize."""
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    m = np.zeros((size_out, size_in))
    for xx in range(size_out):
        center = (xx + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        w = np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)
        m[xx, lo:hi] = w / w.sum()
    return m


def hamming_u64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance (popcount of xor) of broadcastable uint64 arrays, as uint8."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.uint8, copy=False)
    x = np.ascontiguousarray(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


@dataclass(frozen=True)
class SearchPlan:
    """How phash_pairs searches: ``tables == 0`` is brute force, else multi-index hashing."""

    tables: int
    bits: int
    nflip: int


def _mih_plan(tables: int, max_distance: int) -> SearchPlan:
    """Multi-index plan with ``tables`` disjoint substrings of ``64 // tables`` bits each.

    If two hashes differ in at most r bits, some substring differs in at most r // tables bits
    (pigeonhole), so probing every table with that many flips finds all pairs.
    """
    if not 2 <= tables <= _MAX_TABLES:
        raise ValueError(f"tables must be in 2..{_MAX_TABLES}, got {tables}")
    return SearchPlan(tables, 64 // tables, max_distance // tables)


def _mih_cost(plan: SearchPlan, n: int, threads: int) -> float:
    """Estimated wall nanoseconds of an all-pairs search of n uniformly distributed hashes.

    Each query probes its tables against, on average, half of the values (later chunks only).
    """
    probes = plan.tables * sum(comb(plan.bits, k) for k in range(plan.nflip + 1))
    per_bucket = n / 2 / 2.0**plan.bits
    hits = probes * -np.expm1(-per_bucket)
    query = _NS_QUERY + probes * _NS_PROBE + hits * _NS_HIT + probes * per_bucket * _NS_CANDIDATE
    return n * query / threads + plan.tables * n * _NS_ADD


def choose_plan(n: int, max_distance: int) -> SearchPlan:
    """Cheapest exact plan by the cost model: brute force or the best number of hash tables.

    Brute force wins for small n and for large radii; multi-index hashing wins when
    n is large and max_distance // tables flips keep the number of probes small.
    """
    import faiss

    return cheapest_plan(n, max_distance, max(1, faiss.omp_get_max_threads()))[0]


def brute_force_seconds(comparisons: float, threads: int) -> float:
    """Estimated wall seconds of `comparisons` 64-bit Hamming comparisons by brute force (the cost model
    above) on `threads` threads."""
    return comparisons * _NS_FLAT * 1e-9 / max(1, threads)


def cheapest_plan(n: int, max_distance: int, threads: int) -> tuple[SearchPlan, float]:
    """The cheapest exact plan for an all-pairs search of n hashes on `threads` threads, and its
    estimated wall seconds (the cost model above; `curate plan` uses it too)."""
    best, best_cost = SearchPlan(0, 64, 0), n * n / 2 * _NS_FLAT / threads
    for tables in range(2, _MAX_TABLES + 1):
        plan = _mih_plan(tables, max_distance)
        cost = _mih_cost(plan, n, threads)
        if cost < best_cost:
            best, best_cost = plan, cost
    return best, best_cost * 1e-9


def as_codes(values: np.ndarray) -> np.ndarray:
    """uint64 values as an (n, 8) uint8 code array with 8 zero bytes of slack after the end.

    IndexBinaryMultiHash reads each substring with an unaligned 8-byte load, which can run up to
    7 bytes past the last code; the slack keeps that read inside our own buffer.
    """
    buf = np.zeros((len(values) + 1, 8), dtype=np.uint8)
    buf[: len(values)] = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    return buf[: len(values)]


def _unique_pairs(
    values: np.ndarray, max_distance: int, chunk: int, plan: SearchPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (u < v) of distinct sorted values within max_distance, by FAISS range search.

    Chunks are inserted from the last to the first and each chunk is queried right after its
    insertion, so it is only compared with itself and later chunks: every pair is examined
    about once instead of twice.
    """
    import faiss

    codes = as_codes(values)
    if plan.tables == 0:
        index = faiss.IndexBinaryFlat(64)
    else:
        index = faiss.IndexBinaryMultiHash(64, plan.tables, plan.bits)
        index.nflip = plan.nflip
    id_map = np.empty(len(values), dtype=np.int64)
    inserted = 0
    us, vs, ds = [], [], []
    for start in reversed(range(0, len(values), chunk)):
        stop = min(start + chunk, len(values))
        index.add(codes[start:stop])
        id_map[inserted : inserted + stop - start] = np.arange(start, stop)
        inserted += stop - start
        lims, dist, found = index.range_search(codes[start:stop], max_distance + 1)
        query = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims).astype(np.int64))
        found = id_map[found]
        upper = found > query
        us.append(query[upper])
        vs.append(found[upper])
        ds.append(dist[upper].astype(np.uint8))
    return np.concatenate(us), np.concatenate(vs), np.concatenate(ds)


def phash_pairs(
    phash: np.ndarray, max_distance: int, chunk: int = 65536, *, tables: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pairs (i < j) with Hamming(phash[i], phash[j]) <= max_distance.

    Returns int64 i, int64 j and uint8 distance arrays sorted by (i, j). Identical hashes are
    collapsed first: each set of equal hashes is represented by its smallest index, which is
    linked to every other member (a star, distance 0), and pairs between distinct hash values
    are reported between their representatives. When all hashes are distinct this is exactly
    the set of all pairs; in every case the connected components equal those of all pairs,
    and the output stays O(n + pairs of distinct values) instead of O(copies^2).

    ``tables`` overrides the search plan (0: brute force, m >= 2: multi-index hashing with m
    tables); by default ``choose_plan`` picks it from n and max_distance.
    """
    values = np.asarray(phash, dtype=np.uint64).reshape(-1)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8))
    if max_distance < 0 or len(values) < 2:
        return empty
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    max_distance = min(int(max_distance), 64)
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rep = first.astype(np.int64)
    inverse = inverse.reshape(-1)

    members = np.arange(len(values), dtype=np.int64)
    dup = rep[inverse] != members
    star_i, star_j = rep[inverse[dup]], members[dup]

    if max_distance == 0 or len(uniq) < 2:
        u, v, d = empty
    else:
        if tables is None:
            plan = choose_plan(len(uniq), max_distance)
        else:
            plan = SearchPlan(0, 64, 0) if tables == 0 else _mih_plan(tables, max_distance)
        u, v, d = _unique_pairs(uniq, max_distance, chunk, plan)
    ru, rv = rep[u], rep[v]
    i = np.concatenate([np.minimum(ru, rv), star_i])
    j = np.concatenate([np.maximum(ru, rv), star_j])
    dist = np.concatenate([d, np.zeros(len(star_i), dtype=np.uint8)])
    order = np.lexsort((j, i))
    return i[order], j[order], dist[order]


@dataclass
class DedupResult:
    """Per-record outcome of dedup, aligned with the input order.

    keep: bool keeper flag; dup_of: keeper id for dropped records; reason: "exact" (same sha256
    as the keeper) or "near" (linked by pHash); group: int64 component number (-1 for
    singletons, numbered by each component's smallest id); distance: int16 pHash distance to
    the keeper (-1 for keepers).
    """

    keep: np.ndarray
    dup_of: list[str | None]
    reason: list[str | None]
    group: np.ndarray
    distance: np.ndarray


def _factorize_sha(sha256: Sequence[str | None]) -> np.ndarray:
    """Integer code per record, equal for equal sha256 strings; -1 for None or ""."""
    codes: dict[str, int] = {}
    return np.fromiter(
        (codes.setdefault(s, len(codes)) if s else -1 for s in sha256),
        dtype=np.int64,
        count=len(sha256),
    )


def _exact_edges(sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges linking records with the same known sha256 code to the first of them."""
    n = len(sha)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first, inverse = np.unique(sha, return_index=True, return_inverse=True)
    src = first.astype(np.int64)[inverse.reshape(-1)]
    dst = np.arange(n, dtype=np.int64)
    linked = (src != dst) & (sha >= 0)
    return src[linked], dst[linked]


def dedup(
    ids: Sequence[str],
    sha256: Sequence[str],
    phash: np.ndarray,
    pixels: np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> DedupResult:
    """Group exact (same sha256) and perceptual (pHash within max_distance) duplicates.

    Records are linked by equal sha256 (None or "" links nothing) and, unless max_distance < 0,
    by pHash Hamming distance <= max_distance; each connected component keeps one record: the
    highest pixel count, then the smallest id in string order. Everything in the result is a
    function of the records alone, so it does not depend on the input order. Ids must be unique.
    """
    sha = _factorize_sha(sha256)
    codes = np.asarray(phash, dtype=np.uint64).reshape(-1)
    ei, ej = _exact_edges(sha)
    if max_distance >= 0 and len(codes) == len(sha):
        pi, pj, _ = phash_pairs(codes, max_distance)
        ei, ej = np.concatenate([ei, pi]), np.concatenate([ej, pj])
    return _group(ids, sha, codes, pixels, ei, ej)


def _group(ids: Sequence[str], sha: np.ndarray, codes: np.ndarray, pixels: np.ndarray,
           ei: np.ndarray, ej: np.ndarray) -> DedupResult:
    """Connected components of the edges, one keeper each, and every record's outcome."""
    n = len(ids)
    pix = np.asarray(pixels, dtype=np.int64).reshape(-1)
    if not (len(sha) == len(codes) == len(pix) == n):
        raise ValueError("ids, sha256, phash and pixels must have the same length")
    id_arr, rank = id_ranks(ids)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(ei), dtype=np.int8), (ei, ej)), shape=(n, n)).tocsr()
    ncomp, labels = connected_components(graph, directed=False)

    picked = pick_keepers(labels, pix, rank)
    keeper, keep, group = picked.keeper, picked.keep, picked.group

    distance = hamming_u64(codes, codes[keeper]).astype(np.int16)
    distance[keep] = -1
    exact = (sha == sha[keeper]) & (sha >= 0)
    dup_of: list[str | None] = [None if k else id_arr[m].item() for k, m in zip(keep, keeper)]
    reason: list[str | None] = [
        None if k else ("exact" if e else "near") for k, e in zip(keep, exact)
    ]
    return DedupResult(keep=keep, dup_of=dup_of, reason=reason, group=group, distance=distance)
