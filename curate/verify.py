"""Copy verification of candidate pairs by local features with geometric consistency (no weights).

A pair is an edited copy when RootSIFT matches (ratio test) between the two images, or between one
and the mirror of the other, admit one similarity transform (RANSAC) whose inliers spread over the
overlap of the two images: the overlap is cut into a grid, and most cells holding keypoints of both
images, and most cells holding keypoints of at least one image, must hold an inlier. Crops,
padding (flat borders are trimmed first), rescaling, JPEG, jitter and small overlays keep that share
high; distinct images that share a logo or half a background keep it low. A pair whose images have
too few keypoints to judge is marked `abstained`, for another method to decide.

Candidates come from pHash neighbours (a loose Hamming radius, mirrored hashes included) and from
the global embedding's k-NN at a loose cosine, capped per image. Features are computed once per
image (LRU cache) on a grey image scaled to a bounded side; RANSAC is seeded per pair, so results
do not depend on pair order or batching.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class VerifySettings:
    """Knobs of local verification; defaults measured by bench/copy_quality.py (see bench/RESULTS.md)."""

    min_side: int = 0  # smaller images are upscaled to this longer side (0: never; SIFT doubles them itself)
    max_side: int = 512  # larger images are downscaled to this longer side (bounds cost per image)
    max_features: int = 600  # strongest SIFT keypoints kept per image (bounds cost per pair)
    contrast: float = 0.005  # SIFT contrastThreshold (OpenCV's 0.04 finds none on smooth images)
    clahe: float = 2.0  # CLAHE clip limit applied before SIFT (0: off); lifts weak textures
    trim: bool = True  # cut flat borders (padding, letterboxes) before features
    ratio: float = 0.8  # Lowe's ratio test
    min_inliers: int = 10  # RANSAC inliers needed
    reproj: float = 0.012  # RANSAC reprojection error, as a fraction of the working side
    grid: int = 6  # the overlap is cut into grid x grid cells
    min_cell_keypoints: int = 2  # a cell with this many keypoints is informative
    min_share: float = 0.55  # share of informative overlap cells holding an inlier (see match)
    min_overlap: float = 0.3  # the overlap must cover this much of at least one image
    max_scale: float = 6.0  # similarity scale must lie in [1/max_scale, max_scale]
    mirror: bool = True  # also match against the mirrored image
    min_judge_keypoints: int = 40  # with fewer keypoints in either image a pair is too flat to judge (abstain)
    cache_images: int = 2048  # feature sets kept in memory (about 80 KB each)
    seed: int = 0  # RANSAC seed (cv2.setRNGSeed before each pair)
    threads: int = 1  # cv2.setNumThreads while verifying (1: safe inside worker processes)

    def to_dict(self) -> dict:
        """The settings as a plain dict (for manifests)."""
        return asdict(self)


@dataclass
class Features:
    """Keypoint positions (working pixels), RootSIFT descriptors (float16) and the working size."""

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]


@dataclass
class PairScore:
    """The verdict on one pair: inliers, cell share, overlap, whether the mirror matched."""

    verified: bool
    inliers: int = 0
    matches: int = 0
    share: float = 0.0
    overlap: float = 0.0
    mirrored: bool = False
    reason: str | None = None  # why not verified when no geometry was found
    keypoints: int = -1  # keypoints of the image with fewer (-1: not loaded)


def border_box(img: Image.Image | np.ndarray, tol: int = 6) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image without flat borders (padding, letterboxes).

    A border row or column is flat when each channel spans at most 2 * tol and its mean is within tol
    of the outermost one; at most 40% of each side is cut, and nothing from an image that is all flat.
    """
    a = np.asarray(img, dtype=np.int16)
    a = a[..., None] if a.ndim == 2 else a
    h, w = a.shape[:2]

    def lead(lines: np.ndarray) -> int:
        span = (lines.max(axis=1) - lines.min(axis=1)).max(axis=1)
        mean = lines.mean(axis=1)
        flat = (span <= 2 * tol) & (np.abs(mean - mean[0]).max(axis=1) <= tol)
        k = int(np.argmin(flat)) if not flat.all() else len(flat)
        return k if k < len(flat) else 0

    top, bottom = lead(a[: int(0.4 * h)]), lead(a[::-1][: int(0.4 * h)])
    left, right = lead(a.transpose(1, 0, 2)[: int(0.4 * w)]), lead(a.transpose(1, 0, 2)[::-1][: int(0.4 * w)])
    return left, top, w - right, h - bottom


def trim_borders(img: Image.Image) -> Image.Image:
    """The image without flat borders (for content hashes of padded copies)."""
    return img.crop(border_box(img.convert("RGB")))


def _grey(img: Image.Image | np.ndarray, s: VerifySettings) -> np.ndarray:
    """uint8 grey image with its longer side scaled into [min_side, max_side]."""
    import cv2

    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("L"))
    elif img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)
    if s.trim:
        x0, y0, x1, y1 = border_box(img)
        img = img[y0:y1, x0:x1]
    h, w = img.shape[:2]
    longer = max(h, w)
    target = min(max(longer, s.min_side), s.max_side)
    if target != longer:
        f = target / longer
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=interp)
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if s.clahe > 0:
        img = cv2.createCLAHE(clipLimit=s.clahe, tileGridSize=(8, 8)).apply(img)
    return img


def extract(img: Image.Image | np.ndarray, s: VerifySettings, mirror: bool = False) -> Features:
    """SIFT keypoints with RootSIFT descriptors of an image (or of its mirror)."""
    import cv2

    grey = _grey(img, s)
    if mirror:
        grey = np.ascontiguousarray(grey[:, ::-1])
    sift = cv2.SIFT_create(nfeatures=s.max_features, contrastThreshold=s.contrast)
    kps, desc = sift.detectAndCompute(grey, None)
    size = (grey.shape[1], grey.shape[0])
    if desc is None or not len(kps):
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float16), size)
    desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)
    return Features(np.array([k.pt for k in kps], dtype=np.float32), np.sqrt(desc).astype(np.float16), size)


def _overlap_box(m: np.ndarray, other: tuple[int, int], own: tuple[int, int]) -> tuple[float, float, float, float]:
    """Bounding box, clipped to `own`, of the `other` image's rectangle mapped by the 2x3 transform m."""
    w, h = other
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=np.float64) @ m.T
    x0, y0 = np.clip(corners.min(axis=0), 0, own)
    x1, y1 = np.clip(corners.max(axis=0), 0, own)
    return float(x0), float(y0), float(x1), float(y1)


def _cells(xy: np.ndarray, box: tuple[float, float, float, float], grid: int) -> np.ndarray:
    """Grid cell of each point inside the box (grid x grid cells), -1 outside."""
    x0, y0, x1, y1 = box
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    cx = np.clip(((xy[:, 0] - x0) / max(x1 - x0, 1e-9) * grid).astype(int), 0, grid - 1)
    cy = np.clip(((xy[:, 1] - y0) / max(y1 - y0, 1e-9) * grid).astype(int), 0, grid - 1)
    return np.where(inside, cy * grid + cx, -1)


def _cell_share(a_xy: np.ndarray, b_in_a: np.ndarray, inl_xy: np.ndarray, box: tuple[float, float, float, float],
                s: VerifySettings) -> float:
    """Share of the overlap's informative cells (>= min_cell_keypoints keypoints of both images, b's
    mapped into a's frame) that hold an inlier: low when part of the shared area differs."""
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return 0.0
    n = s.grid * s.grid
    count = lambda xy: np.bincount(_cells(xy, box, s.grid) + 1, minlength=n + 1)[1:]  # noqa: E731
    informative = (count(a_xy) >= s.min_cell_keypoints) & (count(b_in_a) >= s.min_cell_keypoints)
    hit = count(inl_xy) > 0
    return float((hit & informative).sum() / informative.sum()) if informative.any() else 0.0


def match(a: Features, b: Features, s: VerifySettings, mirrored: bool = False) -> PairScore:
    """Ratio-test matches of a to b, one RANSAC similarity, and its inliers' cell share on both images."""
    import cv2

    if len(a.xy) < 2 or len(b.xy) < 2:
        return PairScore(False, mirrored=mirrored, reason="too_few_keypoints")
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.desc.astype(np.float32), b.desc.astype(np.float32), k=2)
    good = [p[0] for p in knn if len(p) == 2 and p[0].distance < s.ratio * p[1].distance]
    if len(good) < max(s.min_inliers, 3):
        return PairScore(False, 0, len(good), mirrored=mirrored, reason="too_few_matches")
    qa = np.array([g.queryIdx for g in good])
    tb = np.array([g.trainIdx for g in good])
    cv2.setRNGSeed(s.seed)
    thr = s.reproj * max(*a.size, *b.size)
    m, mask = cv2.estimateAffinePartial2D(a.xy[qa], b.xy[tb], method=cv2.RANSAC, ransacReprojThreshold=thr,
                                          maxIters=2000, confidence=0.995)
    if m is None or mask is None:
        return PairScore(False, 0, len(good), mirrored=mirrored, reason="no_geometry")
    inl = mask.reshape(-1).astype(bool)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if not 1 / s.max_scale <= scale <= s.max_scale:
        return PairScore(False, int(inl.sum()), len(good), mirrored=mirrored, reason="scale")
    inv = cv2.invertAffineTransform(m)
    box_b, box_a = _overlap_box(m, a.size, b.size), _overlap_box(inv, b.size, a.size)
    area = lambda box, size: (box[2] - box[0]) * (box[3] - box[1]) / (size[0] * size[1])  # noqa: E731
    overlap = max(area(box_a, a.size), area(box_b, b.size))
    # cells where both images have keypoints must match, and so must the cells of at least one image
    joint = _cell_share(a.xy, b.xy @ inv[:, :2].T + inv[:, 2], a.xy[qa[inl]], box_a, s)
    own = max(_cell_share(a.xy, a.xy, a.xy[qa[inl]], box_a, s), _cell_share(b.xy, b.xy, b.xy[tb[inl]], box_b, s))
    share = min(joint, own)
    ok = int(inl.sum()) >= s.min_inliers and share >= s.min_share and overlap >= s.min_overlap
    return PairScore(ok, int(inl.sum()), len(good), share, overlap, mirrored)


@dataclass
class VerifyResult:
    """Verdicts on candidate pairs (aligned with the input pairs, i < j), plus timing stats."""

    i: np.ndarray
    j: np.ndarray
    verified: np.ndarray
    inliers: np.ndarray
    share: np.ndarray
    mirrored: np.ndarray
    reason: list[str | None]
    keypoints: np.ndarray  # keypoints of the pair's image with fewer
    abstained: np.ndarray  # not verified and too flat to judge (< min_judge_keypoints): another method decides
    stats: dict = field(default_factory=dict)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Verified pairs as (i, j, share) edges sorted by (i, j), the form copy_dedup(edges=...) takes."""
        v = self.verified
        order = np.lexsort((self.j[v], self.i[v]))
        return self.i[v][order], self.j[v][order], self.share[v][order].astype(np.float32)


class FeatureCache:
    """Features per (row, mirrored), computed on first use from load(row); least recently used evicted."""

    def __init__(self, load: Callable[[int], Image.Image | np.ndarray], s: VerifySettings) -> None:
        self.load, self.s = load, s
        self.items: OrderedDict[tuple[int, bool], Features | str] = OrderedDict()
        self.images: dict[int, Image.Image | np.ndarray] = {}
        self.computed, self.seconds = 0, 0.0

    def get(self, row: int, mirror: bool = False) -> Features | str:
        """Features of a row, or the load error's text (a pair with it is not verified, with that reason)."""
        key = (row, mirror)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        t0 = time.perf_counter()
        try:
            value: Features | str = extract(self.load(row), self.s, mirror)
        except Exception as exc:  # noqa: BLE001 - a bad image is a reason on its pairs, not a crash
            value = f"load_error: {type(exc).__name__}: {exc}"
        self.seconds += time.perf_counter() - t0
        self.computed += 1
        self.items[key] = value
        if len(self.items) > self.s.cache_images:
            self.items.popitem(last=False)
        return value


def verify_pairs(
    i: Sequence[int] | np.ndarray,
    j: Sequence[int] | np.ndarray,
    load: Callable[[int], Image.Image | np.ndarray],
    settings: VerifySettings | None = None,
) -> VerifyResult:
    """Verify candidate pairs (rows i[t], j[t]) with images from load(row): a verdict per pair.

    Each pair is matched as (min row, max row); the larger row's mirror is tried when the direct
    match fails. Stats hold the time spent on features and on matching, and the time per pair.
    """
    import cv2

    s = settings or VerifySettings()
    a = np.minimum(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    b = np.maximum(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(s.threads)
    cache = FeatureCache(load, s)
    scores: list[PairScore] = []
    t0 = time.perf_counter()
    try:
        for order in np.lexsort((b, a)):
            scores.append((order, _verify_one(int(a[order]), int(b[order]), cache, s)))
    finally:
        cv2.setNumThreads(threads)
    total = time.perf_counter() - t0
    scores.sort(key=lambda t: t[0])
    out = [sc for _, sc in scores]
    n = len(out)
    stats = {"pairs": n, "verified": sum(sc.verified for sc in out), "images": len({*a.tolist(), *b.tolist()}),
             "features_computed": cache.computed, "seconds": round(total, 3),
             "feature_seconds": round(cache.seconds, 3), "match_seconds": round(total - cache.seconds, 3),
             "ms_per_pair": round(1000 * total / max(n, 1), 2),
             "reasons": {r: sum(sc.reason == r for sc in out) for r in sorted({sc.reason for sc in out if sc.reason})}}
    verified = np.array([sc.verified for sc in out], dtype=bool)
    keypoints = np.array([sc.keypoints for sc in out], dtype=np.int32)
    abstained = ~verified & (keypoints >= 0) & (keypoints < s.min_judge_keypoints)
    stats["abstained"] = int(abstained.sum())
    return VerifyResult(a, b, verified, np.array([sc.inliers for sc in out], dtype=np.int32),
                        np.array([sc.share for sc in out], dtype=np.float32),
                        np.array([sc.mirrored for sc in out], dtype=bool), [sc.reason for sc in out],
                        keypoints, abstained, stats)


def merge_results(results: Sequence[VerifyResult], positions: np.ndarray) -> VerifyResult:
    """One VerifyResult from results on pieces of a pair list: the pieces concatenated are the pairs at
    `positions` of the whole list, in that order (e.g. the list sorted and cut into pieces verified apart).
    Verdicts do not depend on the piece a pair was in (module doc); stats add up, and "images" counts
    the distinct images of all pieces (features_computed counts each piece's own cache)."""
    positions = np.asarray(positions, dtype=np.int64)
    n = len(positions)
    if sum(len(r.i) for r in results) != n:
        raise ValueError(f"the pieces hold {sum(len(r.i) for r in results)} pairs, the positions {n}")

    def place(values: list[np.ndarray], dtype) -> np.ndarray:
        out = np.zeros(n, dtype=dtype)
        if n:
            out[positions] = np.concatenate(values).astype(dtype, copy=False)
        return out

    fields_ = {name: place([getattr(r, name) for r in results], dtype) for name, dtype in
               (("i", np.int64), ("j", np.int64), ("verified", bool), ("inliers", np.int32), ("share", np.float32),
                ("mirrored", bool), ("keypoints", np.int32), ("abstained", bool))}
    reason: list[str | None] = [None] * n
    for pos, r in zip(positions.tolist(), (x for res in results for x in res.reason)):
        reason[pos] = r
    stats: dict = {"pairs": n, "verified": int(fields_["verified"].sum()),
                   "images": len(np.union1d(fields_["i"], fields_["j"])), "pieces": len(results)}
    for key in ("features_computed", "seconds", "feature_seconds", "match_seconds"):
        stats[key] = round(sum(r.stats.get(key, 0) for r in results), 3)
    stats["ms_per_pair"] = round(1000 * stats["seconds"] / max(n, 1), 2)
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.stats.get("reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    stats["reasons"] = dict(sorted(reasons.items()))
    stats["abstained"] = int(fields_["abstained"].sum())
    return VerifyResult(reason=reason, stats=stats, **fields_)


def _verify_one(a: int, b: int, cache: FeatureCache, s: VerifySettings) -> PairScore:
    """One pair: direct match, then the mirror of b when allowed and the direct match failed."""
    fa, fb = cache.get(a), cache.get(b)
    for f in (fa, fb):
        if isinstance(f, str):
            return PairScore(False, reason=f)
    keypoints = min(len(fa.xy), len(fb.xy))
    best = match(fa, fb, s)
    best.keypoints = keypoints
    if best.verified or not s.mirror:
        return best
    fm = cache.get(b, mirror=True)
    if isinstance(fm, str):
        return best
    flipped = match(fa, fm, s, mirrored=True)
    flipped.keypoints = keypoints
    return flipped if flipped.verified or flipped.share > best.share else best


DEFAULT_CANDIDATE_DISTANCE = 16  # loose pHash radius for candidates (dedup decides at 4)
DEFAULT_CANDIDATE_K = 10  # embedding neighbours per image for candidates
DEFAULT_CANDIDATE_COSINE = 0.5  # loose cosine for embedding candidates
DEFAULT_MAX_PAIRS_PER_IMAGE = 20  # candidates kept per image (the best-ranked), bounding the cost


def phash_candidates(
    phash: np.ndarray, max_distance: int = DEFAULT_CANDIDATE_DISTANCE, mirror_phash: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) whose pHashes, or one's and the other's mirrored pHash, are within max_distance.

    Returns (i, j, distance/64) with the smaller distance of the two ways. Rows with equal hashes are
    linked as stars to their first row (curate.hashing.phash_pairs), which keeps their components.
    """
    from curate.hashing import phash_pairs

    codes = np.asarray(phash, dtype=np.uint64).reshape(-1)
    n = len(codes)
    if mirror_phash is not None:
        codes = np.concatenate([codes, np.asarray(mirror_phash, dtype=np.uint64).reshape(-1)])
    i, j, d = phash_pairs(codes, max_distance)
    i, j = i % n, j % n  # a mirrored row stands for its image
    keep = i != j
    return best_per_pair(np.minimum(i, j)[keep], np.maximum(i, j)[keep], d[keep] / 64.0, n)


def embedding_candidates(
    vectors, k: int = DEFAULT_CANDIDATE_K, threshold: float = DEFAULT_CANDIDATE_COSINE, valid: np.ndarray | None = None,
    index_spec=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs among each row's k nearest neighbours with cosine > threshold: (i, j, 1 - cosine)."""
    from curate.dedup import knn_edges

    i, j, sim = knn_edges(vectors, k=k, threshold=threshold, valid=valid, index_spec=index_spec)
    return i, j, 1.0 - sim.astype(np.float64)


def best_per_pair(i: np.ndarray, j: np.ndarray, cost: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (i, j) (rows 0 .. n - 1) with its lowest cost, sorted by (i, j)."""
    keys = i.astype(np.int64) * max(n, 1) + j
    order = np.lexsort((cost, keys))
    keys, cost = keys[order], np.asarray(cost, dtype=np.float64)[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first] // max(n, 1), keys[first] % max(n, 1), cost[first]


def ranked_pairs(n: int, i: np.ndarray, j: np.ndarray, cost: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (i, j, cost) among rows 0 .. n - 1 as one row per pair (i < j, its lowest cost, sorted by
    (i, j)), with the pair's rank among the pairs of each of its rows (a row's pairs, whichever end it is,
    ranked by (cost, other row); 0 is the best). Returns (i, j, cost, rank at i, rank at j)."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    a, b = np.minimum(i, j), np.maximum(i, j)
    keep = a != b
    a, b, cost = best_per_pair(a[keep], b[keep], np.asarray(cost, dtype=np.float64)[keep], n)
    m = len(a)  # every pair of a row ranked together, whichever end it is
    rank = row_ranks(np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([cost, cost]))
    return a, b, cost, rank[:m], rank[m:]


def row_ranks(mine: np.ndarray, other: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Each candidate's rank among its row's (`mine`) candidates, by (cost, other row); 0 is the best."""
    order = np.lexsort((other, cost, mine))
    start = np.searchsorted(mine[order], mine[order], side="left")
    rank = np.empty(len(mine), dtype=np.int64)
    rank[order] = np.arange(len(mine)) - start
    return rank


def candidate_pairs(
    n: int, *sources: tuple[np.ndarray, np.ndarray, np.ndarray], max_pairs_per_image: int = DEFAULT_MAX_PAIRS_PER_IMAGE,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Union of candidate sources (i, j, cost; lower cost = more alike), capped per image.

    A pair is kept when it is among the max_pairs_per_image lowest-cost pairs of both its rows
    (ties by the other row), so the verification cost is at most n * max_pairs_per_image / 2 pairs.
    Returns (i, j, stats) with i < j sorted; stats count the pairs dropped by the cap.
    """
    cat = [np.concatenate([np.asarray(s[c]) for s in sources]) if sources else np.zeros(0) for c in range(3)]
    i, j, _, rank_i, rank_j = ranked_pairs(n, cat[0], cat[1], cat[2])
    ok = (rank_i < max_pairs_per_image) & (rank_j < max_pairs_per_image)
    stats = {"candidates": int(len(i)), "kept": int(ok.sum()), "dropped_by_cap": int((~ok).sum()),
             "max_pairs_per_image": max_pairs_per_image}
    return i[ok], j[ok], stats
