"""Calibrate the copy-detection threshold of an embedding model on planted copies.

Edited copies of known originals give positive pairs (copy, its original) and negative pairs
(copy, another original): its hardest neighbours and random ones. Precision and recall of
"sim > threshold" over a grid of thresholds then show which threshold reaches a target
precision for this model. Model-agnostic: the model is any callable images -> unit vectors.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EDITS = ("crop", "resize", "jpeg", "jitter", "flip", "overlay", "pad", "blur")
DEFAULT_TARGET_PRECISION = 0.95
DEFAULT_THRESHOLDS = np.unique(np.concatenate([np.round(np.linspace(-1, 1, 2001), 3),
                                               np.round(np.linspace(0.99, 1, 101), 4)]))

Embed = Callable[[list[Image.Image]], np.ndarray]
CalibrationSet = list[tuple[int, Image.Image, str]]


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random crop keeping 50-90% of the area (both sides scaled by its square root)."""
    w, h = img.size
    side = np.sqrt(rng.uniform(0.5, 0.9))
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """JPEG re-encode at quality 20-80."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(20, 81)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.7-1.3."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.7, 1.3)))
    return img


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in PIL's default font and an emoji-like face (disc, eyes, mouth) drawn on top."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    words = ["LOL", "sale!", "@user", "wow", "meme", "2024", "#tbt"]
    text = " ".join(rng.choice(words, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.text((int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - 12)))), text,
              fill=colour, font=ImageFont.load_default())
    r = max(4, min(w, h) // 8)
    cx, cy = int(rng.integers(r, max(r + 1, w - r))), int(rng.integers(r, max(r + 1, h - r)))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 210, 0), outline=(0, 0, 0))
    e = max(1, r // 4)
    for dx in (-r // 3, r // 3):
        draw.ellipse((cx + dx - e, cy - r // 3 - e, cx + dx + e, cy - r // 3 + e), fill=(0, 0, 0))
    draw.arc((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2), 20, 160, fill=(0, 0, 0), width=max(1, e // 2))
    return out


def _pad(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A border of 5-25% of each side in a random flat colour."""
    w, h = img.size
    border = tuple(int(rng.uniform(0.05, 0.25) * s) for s in (w, h, w, h))
    return ImageOps.expand(img.convert("RGB"), border, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))


def apply_edit(img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """One named edit (see EDITS) with its strength drawn from rng."""
    if name == "crop":
        return _crop(img, rng)
    if name == "resize":
        f = float(rng.uniform(0.5, 1.5))
        return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
    if name == "jpeg":
        return _jpeg(img, rng)
    if name == "jitter":
        return _jitter(img, rng)
    if name == "flip":
        return ImageOps.mirror(img)
    if name == "overlay":
        return _overlay(img, rng)
    if name == "pad":
        return _pad(img, rng)
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    raise ValueError(f"unknown edit {name!r}; expected one of {', '.join(EDITS)}")


def make_calibration_set(
    images: Sequence[Image.Image], seed: int = 0, edits: Sequence[str] = EDITS, copies_per_image: int = 1
) -> CalibrationSet:
    """Edited copies of each image: (original index, edited image, edit name), deterministic in seed.

    Each image gets copies_per_image distinct edits, assigned in turn so every edit is used about as
    often; the strength of each edit (crop size, JPEG quality, ...) is drawn at random.
    """
    if not edits or not 1 <= copies_per_image <= len(edits):
        raise ValueError(f"copies_per_image must be in 1..{len(edits)}")
    rng = np.random.default_rng(seed)
    out: CalibrationSet = []
    for idx, img in enumerate(images):
        first = (idx * copies_per_image) % len(edits)
        for c in range(copies_per_image):
            name = edits[(first + c) % len(edits)]
            out.append((idx, apply_edit(img.convert("RGB"), name, rng), name))
    return out


@dataclass(frozen=True)
class PRTable:
    """Precision and recall of "sim > threshold" per threshold (rows sorted by threshold).

    precision is NaN where nothing is predicted; it depends on the ratio of negatives to positives.
    """

    threshold: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def to_arrow(self) -> pa.Table:
        """The table as a pyarrow Table (one row per threshold)."""
        return pa.table({name: getattr(self, name) for name in self.__dataclass_fields__})

    def at(self, threshold: float) -> dict:
        """The row of the given threshold (the nearest one in the table)."""
        r = int(np.argmin(np.abs(self.threshold - threshold)))
        return {name: getattr(self, name)[r].item() for name in self.__dataclass_fields__}

    def markdown(self, thresholds: Sequence[float]) -> str:
        """A markdown table of the rows nearest to the given thresholds."""
        lines = ["| threshold | precision | recall | tp | fp | fn |", "|---|---|---|---|---|---|"]
        for t in thresholds:
            r = self.at(t)
            lines.append(f"| {r['threshold']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} "
                         f"| {r['tp']} | {r['fp']} | {r['fn']} |")
        return "\n".join(lines)


def precision_recall(sim_pos: np.ndarray, sim_neg: np.ndarray, thresholds: Sequence[float] | None = None) -> PRTable:
    """Counts, precision and recall of predicting "copy" when sim > threshold (strict, as dedup)."""
    pos = np.sort(np.asarray(sim_pos, dtype=np.float64).reshape(-1))
    neg = np.sort(np.asarray(sim_neg, dtype=np.float64).reshape(-1))
    t = np.unique(np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64))
    tp = len(pos) - np.searchsorted(pos, t, side="right")
    fp = len(neg) - np.searchsorted(neg, t, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        recall = tp / len(pos) if len(pos) else np.full(len(t), np.nan)
    return PRTable(t, tp.astype(np.int64), fp.astype(np.int64), (len(pos) - tp).astype(np.int64),
                   precision, np.asarray(recall, dtype=np.float64))


def recommend_threshold(table: PRTable, target_precision: float = DEFAULT_TARGET_PRECISION) -> float | None:
    """The smallest threshold whose precision reaches the target: the best recall at that precision.

    None when no threshold that predicts anything reaches it.
    """
    meets = np.flatnonzero((table.tp > 0) & (table.precision >= target_precision))
    return float(table.threshold[meets[0]]) if len(meets) else None


def calibration_pairs(
    originals: np.ndarray, copies: np.ndarray, copy_of: np.ndarray, k_hard: int = 5, n_random: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarities of positives (copy, its original), hard negatives (its k_hard most similar other
    originals) and random negatives (n_random other originals per copy, not already hard ones)."""
    a = np.asarray(originals, dtype=np.float64)
    b = np.asarray(copies, dtype=np.float64)
    copy_of = np.asarray(copy_of, dtype=np.int64)
    sims = b @ a.T
    rows = np.arange(len(b))
    pos = sims[rows, copy_of]
    others = sims.copy()
    others[rows, copy_of] = -np.inf
    k_hard = min(k_hard, len(a) - 1)
    hard = np.argsort(-others, axis=1, kind="stable")[:, :k_hard]
    taken = np.zeros_like(others, dtype=bool)
    taken[rows[:, None], hard] = True
    taken[rows, copy_of] = True
    rng = np.random.default_rng(seed)
    rand_rows, rand_cols = [], []
    for r in rows:
        free = np.flatnonzero(~taken[r])
        pick = rng.choice(free, size=min(n_random, len(free)), replace=False)
        rand_rows.append(np.full(len(pick), r))
        rand_cols.append(pick)
    rr = np.concatenate(rand_rows) if rand_rows else np.zeros(0, dtype=np.int64)
    rc = np.concatenate(rand_cols) if rand_cols else np.zeros(0, dtype=np.int64)
    return pos, sims[rows[:, None], hard].reshape(-1), sims[rr, rc]


@dataclass
class CalibrationReport:
    """One model's calibration: the PR table, the recommended threshold and the raw similarities."""

    table: PRTable
    recommended: float | None
    target_precision: float
    sim_pos: np.ndarray
    sim_hard: np.ndarray
    sim_random: np.ndarray
    edits: list[str]

    def summary(self) -> dict:
        """Headline figures: recommended threshold, its precision/recall, recall per edit there."""
        out = {"target_precision": self.target_precision, "recommended": self.recommended,
               "positives": len(self.sim_pos), "negatives": len(self.sim_hard) + len(self.sim_random)}
        if self.recommended is not None:
            row = self.table.at(self.recommended)
            out.update(precision=row["precision"], recall=row["recall"])
            names = np.array(self.edits)
            out["recall_by_edit"] = {e: float(np.mean(self.sim_pos[names == e] > self.recommended))
                                     for e in sorted(set(self.edits))}
        return out


def evaluate_embedder(
    embed: Embed,
    originals: Sequence[Image.Image],
    copies: CalibrationSet,
    thresholds: Sequence[float] | None = None,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    k_hard: int = 5,
    n_random: int = 5,
    seed: int = 0,
) -> CalibrationReport:
    """Precision/recall per threshold of a model on a calibration set, and its recommended threshold.

    embed maps a list of images to L2-normalised float32 [n, d]. Negatives are a sample (k_hard
    hardest + n_random per copy): a bigger pool has more close non-copies, so its precision is lower.
    """
    orig = np.asarray(embed(list(originals)), dtype=np.float32)
    emb = np.asarray(embed([img for _, img, _ in copies]), dtype=np.float32)
    copy_of = np.array([i for i, _, _ in copies], dtype=np.int64)
    pos, hard, rand = calibration_pairs(orig, emb, copy_of, k_hard, n_random, seed)
    table = precision_recall(pos, np.concatenate([hard, rand]), thresholds)
    return CalibrationReport(table, recommend_threshold(table, target_precision), target_precision,
                             pos, hard, rand, [name for _, _, name in copies])


COPY_DESCRIPTOR_THRESHOLD = 0.6  # DINOv2's cosine for its SSCD copy descriptor: only for declared ones
# Cosines measured for a spec, by spec prefix. Empty: no weights-free embedder has one threshold that
# holds across pools (pixels:16 at precision 0.95: 0.90 on generated images, 0.988 on wallpaper tiles,
# 0.954 on the wallpaper folder), so those are calibrated on the pool itself.
KNOWN_THRESHOLDS: dict[str, float] = {}


@dataclass(frozen=True)
class ThresholdChoice:
    """A copy threshold and how it was chosen: "given", "copy descriptor", "known", "calibrated on pool"."""

    threshold: float
    how: str
    detail: dict

    def manifest(self) -> dict:
        """The choice as manifest fields."""
        return {"threshold": self.threshold, "threshold_how": self.how, **self.detail}


def choose_threshold(
    spec: str,
    threshold: float | str = "auto",
    copy_descriptor: bool = False,
    calibrate: Callable[[], CalibrationReport] | None = None,
    known: dict[str, float] | None = None,
) -> ThresholdChoice:
    """The copy-dedup cosine for an embedder spec: a given number; DINOv2's 0.6 for a declared copy
    descriptor (SSCD-style); a known value for the spec; else calibrate() on the pool's own images."""
    if threshold != "auto":
        return ThresholdChoice(float(threshold), "given", {"spec": spec})
    if copy_descriptor:
        return ThresholdChoice(COPY_DESCRIPTOR_THRESHOLD, "copy descriptor", {"spec": spec})
    table = KNOWN_THRESHOLDS if known is None else known
    for prefix in sorted(table, key=len, reverse=True):
        if spec == prefix or spec.startswith(prefix + ":"):
            return ThresholdChoice(float(table[prefix]), "known", {"spec": spec, "known_as": prefix})
    if calibrate is None:
        raise ValueError(f"no known copy threshold for {spec!r}: give a threshold, declare a copy descriptor, "
                         f"or let dedup calibrate on the pool")
    report = calibrate()
    if report.recommended is None:
        raise ValueError(f"calibration on the pool found no cosine of {spec!r} with precision >= "
                         f"{report.target_precision}: use local verification or give a threshold")
    summary = report.summary()
    return ThresholdChoice(report.recommended, "calibrated on pool", {
        "spec": spec, "target_precision": report.target_precision, "calibration_precision": summary["precision"],
        "calibration_recall": summary["recall"], "calibration_positives": summary["positives"],
        "calibration_negatives": summary["negatives"]})


def _pr(pred: np.ndarray, label: np.ndarray) -> dict:
    """Precision, recall and F1 of boolean decisions on labelled pairs."""
    tp, fp, fn = int((pred & label).sum()), int((pred & ~label).sum()), int((~pred & label).sum())
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4),
            "tp": tp, "fp": fp, "fn": fn}


def compare_methods(
    embed: Embed,
    originals: Sequence[Image.Image],
    copies: CalibrationSet,
    threshold: float,
    phash_distance: int = 4,
    verify_settings=None,
    k_hard: int = 5,
    n_random: int = 5,
    seed: int = 0,
) -> dict:
    """Precision and recall per edit of the hash (pHash <= phash_distance), embedding (cosine >
    threshold), verified (curate.verify) and hash-or-verified decisions on the same labelled pairs
    (each copy with its original, its k_hard most similar and n_random other originals), and the
    recommended settings: local verification when hash-or-verified has the better F1."""
    from curate.hashing import hamming_u64, phash_u64
    from curate.verify import verify_pairs

    orig = np.asarray(embed(list(originals)), dtype=np.float64)
    emb = np.asarray(embed([img for _, img, _ in copies]), dtype=np.float64)
    copy_of = np.array([i for i, _, _ in copies], dtype=np.int64)
    sims = emb @ orig.T
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for r in range(len(copies)):
        others = np.argsort(-sims[r], kind="stable")
        others = others[others != copy_of[r]]
        rest = others[k_hard:]
        pick = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
        for c in [copy_of[r], *others[:k_hard], *pick]:
            rows.append(r)
            cols.append(int(c))
    rows, cols = np.array(rows), np.array(cols)
    label = cols == copy_of[rows]
    images = list(originals) + [img for _, img, _ in copies]
    hashes = np.array([phash_u64(im) for im in images], dtype=np.uint64)
    n = len(originals)
    decisions = {"hash": hamming_u64(hashes[n + rows], hashes[cols]) <= phash_distance,
                 "embedding": sims[rows, cols] > threshold}
    res = verify_pairs(cols, n + rows, lambda k: images[k], verify_settings)
    decisions["verified"] = res.verified
    decisions["hash or verified"] = decisions["hash"] | res.verified
    decisions["hash or embedding"] = decisions["hash"] | decisions["embedding"]
    edits = np.array([e for _, _, e in copies])[rows]
    table = {m: {"all": _pr(d, label), **{e: _pr(d[edits == e], label[edits == e]) for e in sorted(set(edits))}}
             for m, d in decisions.items()}
    local = table["hash or verified"]["all"]["f1"] > table["hash or embedding"]["all"]["f1"]
    return {"threshold": threshold, "phash_distance": phash_distance, "pairs": int(len(label)),
            "positives": int(label.sum()), "verify_stats": res.stats, "by_method": table,
            "recommended": {"verify": "local" if local else "none", "threshold": threshold,
                            "phash_distance": phash_distance}}


def comparison_markdown(comparison: dict) -> str:
    """Recall per edit and overall precision/recall/F1 of each method, one row per method."""
    methods = comparison["by_method"]
    edits = [e for e in next(iter(methods.values())) if e != "all"]
    lines = ["| method | precision | recall | F1 | " + " | ".join(edits) + " |", "|---|---|---|---|" + "---|" * len(edits)]
    for m, t in methods.items():
        lines.append(f"| {m} | {t['all']['precision']:.3f} | {t['all']['recall']:.3f} | {t['all']['f1']:.3f} | "
                     + " | ".join(f"{t[e]['recall']:.2f}" for e in edits) + " |")
    return "\n".join(lines)
