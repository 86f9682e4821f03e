"""Decode-check of image bytes: every image is decoded once, hashed, and given a status.

The status is "ok" or a short machine-readable reason. The stored bytes are always the originals;
EXIF orientation, palette/CMYK/16-bit/alpha modes and animation (first frame) only affect the
checked size and the perceptual hash.

Fast mode (the default, ``phash_exact=False``): a JPEG is decoded in draft mode, scaled by 1/2,
1/4 or 1/8 in the DCT domain to no less than DRAFT_SIDE (32) px a side. Every coefficient is still
entropy-decoded, so truncated and corrupt files fail as in a full decode; the recorded width and
height are the true ones and the size limits (too_small, too_many_pixels) are exact. The pHash
(curate.hashing.phash_fast_u64) and the low-information measures use that one reduced decode, so
the pHash can differ from imagehash.phash by a few bits and a borderline blank/noise status can
differ from exact mode (bench/RESULTS.md, "Ingest speed (issue 16)"). ``phash_exact=True`` decodes
in full and records imagehash-identical values, as before.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL format name -> extension used in shards (webdataset decodes by extension).
FORMAT_EXT = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
    "BMP": "bmp", "TIFF": "tiff",
}


@dataclass(frozen=True)
class CheckSettings:
    """Limits applied to every image."""

    min_side: int = 32
    max_pixels: int = 178_956_970  # PIL's own bomb limit (2 x MAX_IMAGE_PIXELS)
    max_bytes: int = 64 * 2**20
    phash: bool = True
    lowinfo: bool = True  # statuses 'blank' / 'noise' for low-information images (curate/lowinfo.py)
    lowinfo_min_std: float = 2.0
    lowinfo_max_flat: float = 0.98
    lowinfo_min_corr: float = 0.2
    phash_exact: bool = False  # True: full decode and imagehash-identical pHash (slower; see module doc)


@dataclass
class ImageCheck:
    """Outcome of checking one image's bytes."""

    status: str
    sha256: str | None = None
    nbytes: int = 0
    width: int | None = None
    height: int | None = None
    format: str | None = None
    ext: str | None = None
    mode: str | None = None
    n_frames: int | None = None
    phash: int | None = None
    error: str | None = None


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of the bytes."""
    return hashlib.sha256(data).hexdigest()


# EXIF orientations that ImageOps.exif_transpose applies; 5..8 swap width and height.
_TRANSPOSING = {2, 3, 4, 5, 6, 7, 8}
_SWAPPING = {5, 6, 7, 8}
DRAFT_SIDE = 32  # fast mode: JPEG draft decode to no less than this many pixels a side (the pHash input side)


def check_image(data: bytes, settings: CheckSettings = CheckSettings()) -> ImageCheck:
    """Decode `data` once and report status, true size after EXIF orientation and pHash.

    The decode is full with ``settings.phash_exact``, else a JPEG is decoded in draft mode (module doc).
    """
    res = ImageCheck(status="ok", sha256=sha256_hex(data), nbytes=len(data))
    if not data:
        res.status, res.error = "empty", "zero bytes"
        return res
    if len(data) > settings.max_bytes:
        res.status, res.error = "too_large", f"{len(data)} bytes > {settings.max_bytes}"
        return res
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        res.format = img.format
        w, h = img.size
        res.mode, res.n_frames = img.mode, int(getattr(img, "n_frames", 1) or 1)
        if w * h > settings.max_pixels:
            res.status, res.error = "too_many_pixels", f"{w}x{h} > {settings.max_pixels} pixels"
            return res
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            drafted = not settings.phash_exact and img.format == "JPEG"
            if drafted:
                img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # DCT-domain downscale; sizes stay the header's
            img.load()
    except Image.DecompressionBombError as exc:
        res.status, res.error = "too_many_pixels", _clean(exc)
        return res
    except UnidentifiedImageError:
        res.status, res.error = "not_image", "not a recognised image format"
        return res
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        msg = _clean(exc)
        truncated = "truncated" in msg or "broken data stream" in msg or isinstance(exc, EOFError)
        res.status, res.error = ("truncated" if truncated else "decode_error"), msg
        return res
    ext = FORMAT_EXT.get(img.format or "")
    if ext is None:
        res.status, res.error = "unsupported_format", f"format {img.format}"
        return res
    res.ext = ext
    swapped = False
    try:  # exif_transpose only when it transposes: otherwise it returns a full copy
        orientation = img.getexif().get(0x0112, 1)
        oriented = ImageOps.exif_transpose(img) if orientation in _TRANSPOSING else img
        swapped = orientation in _SWAPPING
    except Exception as exc:  # a broken EXIF block must not make the image unusable
        oriented, res.error = img, "exif ignored: " + _clean(exc)
    res.width, res.height = ((h, w) if swapped else (w, h)) if drafted else oriented.size
    if min(res.width, res.height) < settings.min_side:
        res.status, res.error = "too_small", f"{res.width}x{res.height} < {settings.min_side}"
        return res
    rgb = to_rgb(oriented) if settings.lowinfo or settings.phash else None
    if settings.lowinfo:
        from curate.lowinfo import REASONS, LowInfoSettings, low_information

        limits = LowInfoSettings(min_std=settings.lowinfo_min_std, max_flat=settings.lowinfo_max_flat,
                                 min_corr=settings.lowinfo_min_corr)
        if (kind := low_information(rgb, limits)) is not None:
            res.status, res.error = kind, REASONS[kind]
            return res
    if settings.phash:
        from curate.hashing import phash_fast_u64, phash_u64

        res.phash = phash_u64(rgb) if settings.phash_exact else phash_fast_u64(rgb)
    return res


def _clean(exc: BaseException) -> str:
    """A short error text without memory addresses, so reruns write identical records."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")[:200]


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB view of any mode: 16-bit and float scaled, alpha/palette composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img
