"""A generated corpus of awkward files, with the status each must get from the check."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from pipelines.synth import encode, make_image


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR declares a huge size (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    img = make_image(11, (120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [make_image(20 + i, (64, 64)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _palette_transparent_png() -> bytes:
    img = make_image(30, (64, 48)).convert("P", palette=Image.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def _png16() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected status). Names carry misleading extensions on purpose."""
    jpeg = encode(make_image(1, (96, 80)), "JPEG", quality=90)
    png = encode(make_image(2, (96, 80)), "PNG")
    rng = np.random.default_rng(0)
    return {
        "good.jpg": (jpeg, "ok"),
        "good_png_named.txt": (png, "ok"),
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "random.jpg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_image"),
        "bomb.png": (_png_with_header_size(100_000, 100_000), "too_many_pixels"),
        "vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "not_image"),
        "readme.jpg": (b"just some text\n" * 20, "not_image"),
        "cmyk.jpg": (encode(make_image(3, (80, 64)).convert("CMYK"), "JPEG"), "ok"),
        "sixteen.png": (_png16(), "ok"),
        "palette_alpha.png": (_palette_transparent_png(), "ok"),
        "animated.gif": (_animated_gif(), "ok"),
        "rotated.jpg": (_exif_rotated_jpeg(), "ok"),
        "tiny.png": (encode(make_image(4, (16, 16)), "PNG"), "too_small"),
    }
