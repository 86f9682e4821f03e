"""Synthetic web-like images for demos, tests and benchmarks (no downloads needed).

Each image is a deterministic function of its seed: a colour gradient background with random
shapes, so that distinct seeds give visually distinct images and edits of one image stay close.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_image(seed: int, size: tuple[int, int] = (128, 96), n_shapes: int = 6) -> Image.Image:
    """A distinct RGB image for every seed: gradient background plus random shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    angle = rng.uniform(0, 1)
    v = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    mix = angle * t + (1 - angle) * v
    bg = (c0 * (1 - mix) + c1 * mix).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(bg, (h, w, 3))), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(n_shapes):
        x0, x1 = sorted(rng.integers(0, w, 2))
        y0, y1 = sorted(rng.integers(0, h, 2))
        box = (int(x0), int(y0), int(max(x1, x0 + 4)), int(max(y1, y0 + 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return img


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    """Encode an image to bytes in the given PIL format."""
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def reencode(img: Image.Image, quality: int = 60) -> bytes:
    """A re-encoded copy (JPEG at another quality)."""
    return encode(img, "JPEG", quality=quality)


def resized(img: Image.Image, factor: float) -> Image.Image:
    """A resized copy (same aspect ratio)."""
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)


def blurred(img: Image.Image, radius: float = 1.0) -> Image.Image:
    """A lightly blurred copy."""
    return img.filter(ImageFilter.GaussianBlur(radius))


def write_pool(root: str, n_distinct: int, seed: int = 0, dup_rate: float = 0.1,
               near_rate: float = 0.1, junk_rate: float = 0.03) -> dict[str, int]:
    """Write a web-like raw folder: distinct images, exact and edited copies, junk; returns what it planted."""
    from pathlib import Path

    rng = np.random.default_rng(seed)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    planted = {"distinct": 0, "exact_copy": 0, "near_copy": 0, "junk": 0}
    formats = [("JPEG", "jpg", {"quality": 90}), ("PNG", "png", {}), ("WEBP", "webp", {"quality": 90})]
    for i in range(n_distinct):
        size = (int(rng.integers(64, 192)), int(rng.integers(64, 192)))
        img = make_image(seed * 1_000_003 + i, size)
        fmt, ext, params = formats[int(rng.integers(0, len(formats)))]
        data = encode(img, fmt, **params)
        sub = out / f"dir{i % 7}"
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:06d}.{ext}").write_bytes(data)
        planted["distinct"] += 1
        if rng.random() < dup_rate:
            (out / f"copy{i:06d}.{ext}").write_bytes(data)
            planted["exact_copy"] += 1
        if rng.random() < near_rate:
            edited = resized(img, float(rng.uniform(0.7, 1.4)))
            (out / f"edit{i:06d}.jpg").write_bytes(reencode(edited, int(rng.integers(50, 90))))
            planted["near_copy"] += 1
    n_junk = max(6, int(junk_rate * n_distinct))
    good = encode(make_image(seed + 7), "JPEG")
    junk = [b"", b"this is a caption file, not an image\n", good[: len(good) // 2],
            rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
            encode(make_image(seed + 8, (12, 12)), "PNG"),
            b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>']
    names = ["empty.jpg", "notes.txt", "truncated.jpg", "random.png", "tiny.png", "vector.svg"]
    for j in range(n_junk):
        k = j % len(junk)
        (out / f"junk{j:04d}-{names[k]}").write_bytes(junk[k])
        planted["junk"] += 1
    return planted
