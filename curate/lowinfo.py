"""Low-information images: blank or single-colour placeholders and pure noise, found on a reduced copy.

Two measures on the image box-reduced to at most `side` pixels a side (cheap, size-independent):
- blank: the pixel standard deviation (max over R, G, B; 0-255 scale) is below `min_std`, or at
  least `max_flat` of the pixels lie within `flat_tol` (every channel) of the most common colour
  (a placeholder, a single colour with a small mark or compression noise);
- noise: neighbouring pixels are uncorrelated (max of the horizontal and vertical lag-1
  correlation of the luminance below `min_corr`): i.i.d. noise, whatever its distribution.
Thresholds are measured in bench/lowinfo.py (bench/RESULTS.md): photos, line drawings, icons and
Fashion-MNIST items pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

BLANK, NOISE = "blank", "noise"
REASONS = {BLANK: "low information: (nearly) one colour", NOISE: "low information: neighbouring pixels uncorrelated"}


@dataclass(frozen=True)
class LowInfoSettings:
    """Thresholds of `low_information` (defaults measured in bench/lowinfo.py)."""

    side: int = 64
    min_std: float = 2.0
    max_flat: float = 0.98
    flat_tol: int = 6
    min_corr: float = 0.2


def reduce(img: Image.Image, side: int = 64) -> np.ndarray:
    """uint8 RGB array of the image box-reduced so that its longer side is at most `side`."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    factor = max(1, -(-max(w, h) // side))
    if factor > 1:
        img = img.reduce(factor)
    return np.asarray(img, dtype=np.uint8)


def measures(rgb: np.ndarray, flat_tol: int = 6) -> dict[str, float]:
    """std (max over channels), flat (fraction near the modal colour) and corr (lag-1 luminance) of uint8 RGB."""
    ch = _channels(rgb)
    return {"std": _std(ch), "flat": _flat(ch, flat_tol), "corr": _corr(rgb)}


def _channels(rgb: np.ndarray) -> np.ndarray:
    """(3, n) contiguous uint8 channel planes of an HxWx3 uint8 array."""
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).reshape(-1, 3).T)


def _var(ch: np.ndarray) -> float:
    """Max over channels of the population variance, from exact integer moments (0.0 when empty)."""
    n = ch.shape[1]
    if not n:
        return 0.0
    s = ch.sum(axis=1, dtype=np.int64)
    s2 = np.einsum("ij,ij->i", ch, ch, dtype=np.int64)
    return float((n * s2 - s * s).max()) / (n * n)


def _std(ch: np.ndarray) -> float:
    """Max over channels of the population std (0.0 when empty)."""
    return float(np.sqrt(_var(ch)))


def _may_be_flat(var: float, max_flat: float, tol: int) -> bool:
    """False when flat >= max_flat is impossible: with a share p of pixels within tol of a centre
    and the rest at most 255 away, every channel's variance is at most p*tol^2 + (1-p)*255^2."""
    bound = max_flat * tol * tol + (1.0 - max_flat) * 255.0 * 255.0
    return var <= bound * (1 + 1e-9) + 1e-9


def _flat(ch: np.ndarray, tol: int) -> float:
    """Fraction of pixels within `tol` (every channel) of the most common colour at 4-bit precision.

    The centre is the per-channel median of the pixels of the modal 4-bit colour (np.median, from
    a histogram: the mean of the two middle values when even); in integers, |v - centre| <= tol
    is ceil(centre - tol) <= v <= floor(centre + tol).
    """
    n = ch.shape[1]
    if not n:
        return 1.0
    q = (ch >> 4).astype(np.int32)
    codes = (q[0] << 8) | (q[1] << 4) | q[2]
    members = ch[:, codes == int(np.bincount(codes).argmax())].astype(np.int32)
    m = members.shape[1]
    cum = np.cumsum(np.bincount((members + _CHANNEL_OFFSET).ravel(), minlength=768).reshape(3, 256), axis=1)
    lo = (cum <= (m - 1) // 2).sum(axis=1)
    hi = (cum <= m // 2).sum(axis=1)
    centre = (lo + hi) / 2
    near = (ch >= np.ceil(centre - tol)[:, None]) & (ch <= np.floor(centre + tol)[:, None])
    return float(np.count_nonzero(near.all(axis=0)) / n)


_CHANNEL_OFFSET = np.array([[0], [256], [512]], dtype=np.int32)


def _corr(rgb: np.ndarray) -> float:
    """Max of the horizontal and vertical lag-1 correlation of the luminance (1.0 when undefined)."""
    g = rgb.astype(np.float64) @ _LUMA
    best = -1.0
    for a, b in ((g[:, :-1], g[:, 1:]), (g[:-1, :], g[1:, :])):
        a, b = a.ravel(), b.ravel()
        a, b = a - a.mean(), b - b.mean()
        den = np.sqrt(np.dot(a, a) * np.dot(b, b))  # dot products: the sums of products in one pass
        if a.size < 2 or den == 0:
            return 1.0
        best = max(best, float(np.dot(a, b) / den))
    return best


_LUMA = np.array([0.299, 0.587, 0.114])


def low_information(img: Image.Image | np.ndarray, settings: LowInfoSettings = LowInfoSettings()) -> str | None:
    """'blank', 'noise', or None for an image that carries content; img is a PIL image or uint8 HxWx3/HxW."""
    if isinstance(img, Image.Image):
        rgb = reduce(img, settings.side)
    else:
        rgb = np.asarray(img, dtype=np.uint8)
        rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
    ch = _channels(rgb)
    var = _var(ch)
    if ch.shape[1] == 0 or float(np.sqrt(var)) < settings.min_std:
        return BLANK
    if _may_be_flat(var, settings.max_flat, settings.flat_tol) and _flat(ch, settings.flat_tol) >= settings.max_flat:
        return BLANK
    if min(rgb.shape[:2]) >= 4 and _corr(rgb) < settings.min_corr:
        return NOISE
    return None
