"""Measure the low-information filter (curate.lowinfo): false positives on real and synthetic images, catch rate on junk.

Real images: all 70k Fashion-MNIST items (/usr/share/datasets/fashion-mnist, train + test) and
the photos, wallpapers, icons and diagrams found on this machine (--real-dirs; alpha composited on
white as ingest does). Synthetic: pipelines/synth.py and synth_pool.py images, JPEG-encoded.
Junk (`junk_image`): constant colours, placeholders (one colour + a small mark), near-constant
(sd 1 noise), uniform / Gaussian / salt-and-pepper noise, grey or colour, some JPEG-encoded.
Prints one JSON line: rates per set, and min / 1st / 99th percentile / max of each measure.

Run: python bench/lowinfo.py [--n-synth 1000] [--n-junk 2000]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from _common import emit
from PIL import Image, ImageDraw

from curate.images import to_rgb
from curate.lowinfo import LowInfoSettings, low_information, measures, reduce

DATA = Path("/usr/share/datasets/fashion-mnist")
REAL_DIRS = ["/usr/share/backgrounds", "/usr/share/wallpapers", "/usr/share/icons/Adwaita",
             "/usr/share/doc", "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc",
             "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/matplotlib/mpl-data/sample_data"]
JUNK_KINDS = ["constant", "placeholder", "near_constant", "uniform_noise", "gaussian_noise", "salt_pepper"]


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file as a uint8 array."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """The image after a JPEG round trip."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def junk_image(kind: str, seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A generated low-information image of the given kind (see JUNK_KINDS), deterministic in seed."""
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(48, 400)), int(rng.integers(48, 400)))
    grey = rng.random() < 0.3
    colour = rng.integers(0, 256, 3) if not grey else np.repeat(rng.integers(0, 256), 3)
    if kind == "constant":
        img = Image.new("RGB", (w, h), tuple(int(c) for c in colour))
    elif kind == "placeholder":  # one colour with a small centred mark (< 0.4% of the area)
        img = Image.new("RGB", (w, h), tuple(int(c) for c in colour))
        r = max(1, int(0.03 * min(w, h)))
        ImageDraw.Draw(img).rectangle((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r),
                                      fill=tuple(int(c) for c in 255 - colour))
    elif kind == "near_constant":
        x = colour[None, None, :] + rng.normal(0, 1.0, (h, w, 3))
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")
    else:
        shape = (h, w, 1) if grey else (h, w, 3)
        if kind == "uniform_noise":
            x = rng.integers(0, 256, shape)
        elif kind == "gaussian_noise":
            x = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), shape)
        elif kind == "salt_pepper":
            x = np.broadcast_to(colour, (h, w, 3)).copy()
            hit = rng.random((h, w)) < rng.uniform(0.05, 0.5)
            x[hit] = rng.choice([0, 255], size=(int(hit.sum()), 1))
        else:
            raise ValueError(f"unknown junk kind {kind!r}")
        x = np.broadcast_to(x, (h, w, 3))
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")
    return jpeg(img, int(rng.integers(60, 95))) if rng.random() < 0.5 else img


def real_images(dirs: list[str], limit: int) -> list[tuple[str, Image.Image]]:
    """(folder group, RGB image) of the distinct .jpg/.png files under dirs (at least 32 px a side)."""
    seen, out = set(), []
    for d in dirs:
        for p in sorted(Path(d).rglob("*")) if Path(d).exists() else []:
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png") or p.name in seen or len(out) >= limit:
                continue
            try:
                with Image.open(p) as im:
                    im.draft("RGB", (256, 256))
                    im.load()
                    rgb = to_rgb(im)
            except (OSError, ValueError, SyntaxError):  # unreadable files are not what we measure
                continue
            if min(rgb.size) >= 32:
                seen.add(p.name)
                out.append((d.rstrip("/").split("/")[-1], rgb))
    return out


def rate(flags: list) -> float:
    """Fraction of non-None entries."""
    return round(sum(f is not None for f in flags) / max(1, len(flags)), 5)


def pct(rows: list[dict]) -> dict:
    """Minimum, 1st and 99th percentiles and maximum of each measure."""
    return {k: [round(float(np.percentile([r[k] for r in rows], q)), 3) for q in (0, 1, 99, 100)] for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-synth", type=int, default=1000)
    ap.add_argument("--n-junk", type=int, default=2000)
    ap.add_argument("--real-limit", type=int, default=3000)
    args = ap.parse_args()
    from pipelines.synth import make_image
    from pipelines.synth_pool import make_class_image

    settings = LowInfoSettings()
    t0 = time.perf_counter()
    fm = np.concatenate([read_idx(DATA / f) for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")])
    fm_flags = [low_information(im, settings) for im in fm]
    fm_fp = {k: int(sum(f == k for f in fm_flags)) for k in ("blank", "noise")}
    fm_meas = [measures(np.repeat(im[..., None], 3, axis=2)) for im in fm]
    fm_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    synth = []
    for i in range(args.n_synth):
        size = (int(rng.integers(32, 300)), int(rng.integers(32, 300)))
        img = make_image(i, size) if i % 2 else make_class_image(i % 10, i, size)
        synth.append(jpeg(img, int(rng.integers(50, 95))) if i % 3 else img)
    synth_flags = [low_information(im, settings) for im in synth]

    real = real_images(REAL_DIRS, args.real_limit)
    real_flags = [low_information(im, settings) for _, im in real]
    groups = sorted({g for g, _ in real})
    by_group = {g: {"n": sum(gg == g for gg, _ in real),
                    "flagged": sum(f is not None for (gg, _), f in zip(real, real_flags) if gg == g)} for g in groups}
    real_meas = [measures(reduce(im, settings.side)) for _, im in real]
    fp_real = [(g, f) for (g, _), f in zip(real, real_flags) if f is not None]

    junk = {k: [junk_image(k, 1000 * j + i) for i in range(args.n_junk // len(JUNK_KINDS))]
            for j, k in enumerate(JUNK_KINDS)}
    junk_flags = {k: [low_information(im, settings) for im in ims] for k, ims in junk.items()}
    junk_meas = {k: pct([measures(reduce(im, settings.side)) for im in ims]) for k, ims in junk.items()}
    emit(
        "lowinfo", settings=vars(settings),
        fashion_mnist={"n": len(fm), "false_positive_rate": rate(fm_flags), "by_status": fm_fp,
                       "measures_min_p1_p99_max": pct(fm_meas), "s": round(fm_s, 1)},
        synthetic={"n": len(synth), "false_positive_rate": rate(synth_flags)},
        real_on_disk={"n": len(real), "false_positive_rate": rate(real_flags), "by_folder": by_group,
                      "flagged": fp_real[:20], "measures_min_p1_p99_max": pct(real_meas)},
        junk={k: {"n": len(v), "catch_rate": rate(v), "measures_min_p1_p99_max": junk_meas[k]} for k, v in junk_flags.items()},
        junk_catch_rate=rate([f for v in junk_flags.values() for f in v]),
    )


if __name__ == "__main__":
    main()
