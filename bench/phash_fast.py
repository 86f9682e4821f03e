"""Fast pHash (JPEG draft decode + reduced pHash, the default) against the exact one (imagehash).

Both hashes come from curate.images.check_image on the same bytes (phash_exact False / True).
Images: real photos (/usr/share/backgrounds: each wallpaper at 1024 px long side plus four
512x384 tiles) and Fashion-MNIST test items upscaled to 256x256, each stored as JPEG q90 and
edited (JPEG q30..95, resize 0.5x..2x, blur, combinations, a PNG copy; every edit stored as
JPEG q85 unless named). Reports
  - bits: Hamming distance between the fast and exact hash of the same bytes;
  - copies: original-vs-edit duplicate decisions at --max-distance (default 4) under each mode,
    and the share of pairs on which the two modes agree;
  - distinct: all pairs of distinct originals: false merges under each mode, agreement;
  - the check_image time per image of each mode;
  - lowinfo: blank/noise statuses of every blob (originals and edits) in fast vs exact mode.
Originals flagged blank/noise (never hashed by ingest) are left out.

    python bench/phash_fast.py [--fashion 1000] [--max-distance 4] [--draft-side 32]
"""

from __future__ import annotations

import argparse
import gzip
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import emit
from PIL import Image

from curate.hashing import DEFAULT_MAX_DISTANCE, hamming_u64
from curate.images import CheckSettings, check_image
from pipelines.synth import blurred, encode, resized

BACKGROUNDS = Path("/usr/share/backgrounds")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FAST = CheckSettings(min_side=8, lowinfo=False)
EXACT = CheckSettings(min_side=8, lowinfo=False, phash_exact=True)
LOW_FAST = CheckSettings(min_side=8, phash=False)
LOW_EXACT = CheckSettings(min_side=8, phash=False, phash_exact=True)


def statuses(blobs: list[bytes]) -> dict:
    """Low-information statuses (blank/noise/ok) of fast and exact mode on the same bytes."""
    fast = [check_image(b, LOW_FAST).status for b in blobs]
    exact = [check_image(b, LOW_EXACT).status for b in blobs]
    return {"blobs": len(blobs), "flagged_exact": sum(s != "ok" for s in exact),
            "flagged_fast": sum(s != "ok" for s in fast), "differ": sum(f != e for f, e in zip(fast, exact))}


def real_images() -> list[Image.Image]:
    """Every decodable wallpaper at 1024 px long side, and four 512x384 tiles of its centre."""
    out = []
    for p in sorted(BACKGROUNDS.rglob("*")):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except Exception:  # noqa: BLE001 - not an image (xml, svg)
            continue
        full = im.copy()
        full.thumbnail((1024, 1024), Image.LANCZOS)
        out.append(full)
        scale = max(1024 / im.width, 768 / im.height)
        big = im.resize((max(1024, round(im.width * scale)), max(768, round(im.height * scale))), Image.LANCZOS)
        x0, y0 = (big.width - 1024) // 2, (big.height - 768) // 2
        out += [big.crop((x0 + dx, y0 + dy, x0 + dx + 512, y0 + dy + 384)) for dx in (0, 512) for dy in (0, 384)]
    return out


def fashion_images(n: int) -> list[Image.Image]:
    """The first n Fashion-MNIST test items, bicubic-upscaled to 256x256 RGB."""
    if not FASHION_MNIST.exists() or n <= 0:
        return []
    with gzip.open(FASHION_MNIST, "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8)[16:].reshape(-1, 28, 28)
    return [Image.fromarray(raw[k], "L").resize((256, 256), Image.BICUBIC).convert("RGB") for k in range(n)]


def edits() -> dict[str, Callable[[Image.Image], bytes]]:
    """Named edits, as stored bytes."""
    jpg = lambda im, q=85: encode(im, "JPEG", quality=q)  # noqa: E731
    ops: dict[str, Callable[[Image.Image], bytes]] = {f"jpeg{q}": (lambda im, q=q: jpg(im, q)) for q in (30, 50, 70, 95)}
    ops.update({f"resize{f}": (lambda im, f=f: jpg(resized(im, f))) for f in (0.5, 0.75, 1.5, 2.0)})
    ops.update({f"blur{r}": (lambda im, r=r: jpg(blurred(im, r))) for r in (0.5, 1.0)})
    ops["resize0.5+jpeg50"] = lambda im: jpg(resized(im, 0.5), 50)
    ops["blur1.0+jpeg30"] = lambda im: jpg(blurred(im, 1.0), 30)
    ops["png"] = lambda im: encode(im, "PNG")
    return ops


def hashes(blobs: list[bytes], settings: CheckSettings) -> tuple[np.ndarray, float]:
    """pHash of every blob by check_image, and the seconds it took."""
    t0 = time.perf_counter()
    out = np.array([check_image(b, settings).phash for b in blobs], dtype=np.uint64)
    return out, time.perf_counter() - t0


def evaluate(name: str, images: list[Image.Image], t: int) -> dict:
    """Bit differences and duplicate-decision agreement of the two modes on one image set.

    Originals that ingest would not hash (blank/noise by the low-information check, e.g. the
    single-colour wallpapers and their tiles, whose pHash is float noise) are left out.
    """
    originals = [encode(im, "JPEG", quality=90) for im in images]
    lowinfo = statuses(originals + [op(im) for op in edits().values() for im in images])
    hashed = [check_image(b, CheckSettings(min_side=8, phash_exact=True)).status == "ok" for b in originals]
    left_out = len(images) - sum(hashed)
    images = [im for im, h in zip(images, hashed) if h]
    originals = [b for b, h in zip(originals, hashed) if h]
    o_fast, s_fast = hashes(originals, FAST)
    o_exact, s_exact = hashes(originals, EXACT)
    bits = [hamming_u64(o_fast, o_exact)]
    copies = {"pairs": 0, "dup_exact": 0, "dup_fast": 0, "agree": 0}
    worst = {}
    for ename, op in edits().items():
        blobs = [op(im) for im in images]
        e_fast, _ = hashes(blobs, FAST)
        e_exact, _ = hashes(blobs, EXACT)
        bits.append(hamming_u64(e_fast, e_exact))
        dup_f, dup_e = hamming_u64(o_fast, e_fast) <= t, hamming_u64(o_exact, e_exact) <= t
        copies["pairs"] += len(blobs)
        copies["dup_exact"] += int(dup_e.sum())
        copies["dup_fast"] += int(dup_f.sum())
        copies["agree"] += int((dup_f == dup_e).sum())
        worst[ename] = {"recall_exact": round(float(dup_e.mean()), 4), "recall_fast": round(float(dup_f.mean()), 4)}
    copies["agreement"] = round(copies["agree"] / copies["pairs"], 5)
    iu, ju = np.triu_indices(len(images), k=1)
    m_f, m_e = hamming_u64(o_fast[iu], o_fast[ju]) <= t, hamming_u64(o_exact[iu], o_exact[ju]) <= t
    distinct = {"pairs": len(iu), "merged_exact": int(m_e.sum()), "merged_fast": int(m_f.sum()),
                "agreement": round(float((m_f == m_e).mean()), 7)}
    b = np.concatenate(bits)
    return {"set": name, "images": len(images), "left_out_lowinfo": left_out,
            "bits_fast_vs_exact": {"mean": round(float(b.mean()), 3), "p50": int(np.percentile(b, 50)),
                                   "p99": int(np.percentile(b, 99)), "max": int(b.max()),
                                   "share_identical": round(float((b == 0).mean()), 4)},
            "lowinfo_status_fast_vs_exact": lowinfo, "copies": copies, "per_edit_recall": worst, "distinct": distinct,
            "ms_per_original": {"fast": round(s_fast / len(originals) * 1e3, 3),
                                "exact": round(s_exact / len(originals) * 1e3, 3)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fashion", type=int, default=1000, help="Fashion-MNIST items (0: none)")
    ap.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE)
    ap.add_argument("--draft-side", type=int, default=None, help="override curate.images.DRAFT_SIDE")
    args = ap.parse_args()
    if args.draft_side:
        import curate.images

        curate.images.DRAFT_SIDE = args.draft_side
    sets = [("backgrounds", real_images()), ("fashion_mnist_256", fashion_images(args.fashion))]
    import curate.images

    emit("phash_fast", max_distance=args.max_distance, draft_side=curate.images.DRAFT_SIDE,
         results=[evaluate(name, ims, args.max_distance) for name, ims in sets if ims])


if __name__ == "__main__":
    main()
