"""Measure pHash Hamming distances of edited copies vs distinct images to pick a dedup threshold.

For each data set (synthetic images from pipelines.synth, and Fashion-MNIST when the Debian
package dataset-fashion-mnist is installed) this computes
  (a) the distance between an original and each of its edited copies (JPEG q30..95,
      resize 0.5x..2x, light blur, and combinations), and
  (b) the distance between every pair of distinct originals,
then, for every threshold 0..16: the recall of edited copies (distance <= t), the false-merge
rate of distinct pairs, and the fraction of distinct originals that dedup would drop (merges
chain through connected components). It prints one JSON line per (data set, threshold), one
summary JSON line with the recommendation, and a short table.

Run: python bench/phash_threshold.py   (well under a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import emit
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.hashing import hamming_u64, phash_u64
from pipelines.synth import blurred, make_image, reencode, resized

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
THRESHOLDS = range(0, 17)
# "About 0" false merges: at most one distinct pair in 10,000.
MAX_FALSE_MERGE_RATE = 1e-4


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Decode of a JPEG re-encode at the given quality."""
    out = Image.open(io.BytesIO(reencode(img, quality)))
    out.load()
    return out


def edits() -> dict[str, Callable[[Image.Image], Image.Image]]:
    """Named edits that should still count as the same image."""
    ops: dict[str, Callable[[Image.Image], Image.Image]] = {}
    for q in (30, 50, 70, 95):
        ops[f"jpeg{q}"] = lambda im, q=q: _jpeg(im, q)
    for f in (0.5, 0.75, 1.5, 2.0):
        ops[f"resize{f}"] = lambda im, f=f: resized(im, f)
    for r in (0.5, 1.0):
        ops[f"blur{r}"] = lambda im, r=r: blurred(im, r)
    ops["resize0.5+jpeg50"] = lambda im: _jpeg(resized(im, 0.5), 50)
    ops["resize2.0+jpeg70"] = lambda im: _jpeg(resized(im, 2.0), 70)
    ops["blur1.0+jpeg30"] = lambda im: _jpeg(blurred(im, 1.0), 30)
    ops["resize0.75+blur0.5+jpeg60"] = lambda im: _jpeg(blurred(resized(im, 0.75), 0.5), 60)
    return ops


def synthetic_images(n: int, size: tuple[int, int]) -> list[Image.Image]:
    """Distinct generated images, one per seed."""
    return [make_image(seed, size) for seed in range(n)]


def fashion_mnist_images(n: int, upscale: int, seed: int = 0) -> list[Image.Image] | None:
    """A random sample of Fashion-MNIST test images (upscaled, RGB), or None if not installed."""
    if not FASHION_MNIST.exists():
        return None
    with gzip.open(FASHION_MNIST, "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8)
    images = raw[16:].reshape(-1, 28, 28)
    pick = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    side = 28 * upscale
    return [
        Image.fromarray(images[k], "L").resize((side, side), Image.BICUBIC).convert("RGB")
        for k in pick
    ]


@dataclass
class Distances:
    """pHash distances of one data set: per-edit copy distances and all distinct pairs."""

    copies: dict[str, np.ndarray]
    distinct: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray]
    n_images: int

    def all_copies(self) -> np.ndarray:
        """Copy distances of every edit, concatenated."""
        return np.concatenate(list(self.copies.values()))


def measure(images: list[Image.Image], n_edited: int) -> Distances:
    """Edit distances for the first n_edited images and distances of all distinct pairs."""
    originals = np.array([phash_u64(im) for im in images], dtype=np.uint64)
    copies: dict[str, np.ndarray] = {}
    for name, op in edits().items():
        edited = np.array([phash_u64(op(im)) for im in images[:n_edited]], dtype=np.uint64)
        copies[name] = hamming_u64(originals[:n_edited], edited)
    iu, ju = np.triu_indices(len(originals), k=1)
    distinct = hamming_u64(originals[iu], originals[ju])
    return Distances(copies, distinct, (iu, ju), len(images))


def dropped_fraction(d: Distances, t: int) -> float:
    """Fraction of distinct originals that dedup would drop at threshold t."""
    hit = d.distinct <= t
    iu, ju = d.pairs[0][hit], d.pairs[1][hit]
    graph = coo_matrix((np.ones(len(iu), np.int8), (iu, ju)), shape=(d.n_images, d.n_images))
    return 1.0 - connected_components(graph, directed=False)[0] / d.n_images


def rates(d: Distances) -> list[dict[str, float]]:
    """Recall of edited copies, false-merge rate and dropped fraction per threshold."""
    copies = d.all_copies()
    return [
        {
            "threshold": t,
            "recall": float(np.mean(copies <= t)),
            "worst_edit_recall": min(float(np.mean(v <= t)) for v in d.copies.values()),
            "false_merge_rate": float(np.mean(d.distinct <= t)),
            "false_merges": int(np.sum(d.distinct <= t)),
            "distinct_dropped": dropped_fraction(d, t),
        }
        for t in THRESHOLDS
    ]


def recommend(tables: list[list[dict[str, float]]]) -> int:
    """Smallest threshold reaching the best mean recall among thresholds whose false-merge
    rate is about 0 (<= MAX_FALSE_MERGE_RATE) on every data set."""
    ok = [
        k
        for k in range(len(THRESHOLDS))
        if all(rows[k]["false_merge_rate"] <= MAX_FALSE_MERGE_RATE for rows in tables)
    ]
    if not ok:
        return 0
    recall = {k: float(np.mean([rows[k]["recall"] for rows in tables])) for k in ok}
    best = max(recall.values())
    return int(THRESHOLDS[min(k for k in ok if recall[k] == best)])


def main() -> None:
    """Run the measurement on every available data set and print JSON lines and a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-distinct", type=int, default=3000, help="originals per data set")
    ap.add_argument("--n-edited", type=int, default=500, help="originals that get edited copies")
    args = ap.parse_args()
    t0 = time.perf_counter()

    sets = {"synthetic": synthetic_images(args.n_distinct, (192, 144))}
    fm = fashion_mnist_images(args.n_distinct, upscale=4)
    if fm is None:
        why = f"{FASHION_MNIST} not found (apt-get install -y dataset-fashion-mnist)"
        print(json.dumps({"dataset": "fashion-mnist", "skipped": why}))
    else:
        sets["fashion-mnist"] = fm

    table: dict[str, list[dict[str, float]]] = {}
    summary: dict[str, dict[str, object]] = {}
    for name, images in sets.items():
        d = measure(images, min(args.n_edited, len(images)))
        table[name] = rates(d)
        for row in table[name]:
            print(json.dumps({"dataset": name, **row}))
        summary[name] = {
            "n_images": d.n_images,
            "n_copies": int(len(d.all_copies())),
            "n_distinct_pairs": int(len(d.distinct)),
            "max_copy_distance_by_edit": {k: int(v.max()) for k, v in d.copies.items()},
            "p99_copy_distance": float(np.percentile(d.all_copies(), 99)),
            "min_distinct_distance": int(d.distinct.min()),
            "odd_distances": int(np.sum(d.distinct % 2) + np.sum(d.all_copies() % 2)),
            "recommended_alone": recommend([table[name]]),
        }
    emit(
        "phash_threshold",
        summary=summary,
        recommended_threshold=recommend(list(table.values())),
        criterion="smallest t with the best mean recall among t whose false-merge rate is "
        f"<= {MAX_FALSE_MERGE_RATE} on every data set",
        seconds=round(time.perf_counter() - t0, 1),
    )

    names = list(table)
    print("   t | " + " | ".join(f"{n:<13.13} recall      fmr  dropped" for n in names))
    for k, t in enumerate(THRESHOLDS):
        cells = [
            f"{'':13} {r['recall']:.4f} {r['false_merge_rate']:8.1e} {r['distinct_dropped']:8.4f}"
            for r in (table[n][k] for n in names)
        ]
        print(f"{t:>4} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
