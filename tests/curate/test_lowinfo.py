import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curate.images import CheckSettings, check_image, to_rgb
from curate.lowinfo import BLANK, NOISE, low_information, measures, reduce
from pipelines.synth import blurred, encode, make_image, reencode, resized
from pipelines.synth_pool import make_class_image


def jpeg_round_trip(img: Image.Image, quality: int = 80) -> Image.Image:
    return Image.open(io.BytesIO(encode(img, "JPEG", quality=quality))).convert("RGB")


def junk(kind: str, seed: int) -> Image.Image:
    """Generated low-information images: one colour, placeholder, near-constant, and three kinds of noise."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if kind == "constant":
        return Image.new("RGB", (w, h), colour)
    if kind == "placeholder":  # one colour, a small mark in the middle
        img = Image.new("RGB", (w, h), colour)
        ImageDraw.Draw(img).rectangle((w // 2 - 2, h // 2 - 2, w // 2 + 2, h // 2 + 2), fill=(0, 0, 0))
        return img
    if kind == "near_constant":
        x = np.array(colour)[None, None] + rng.normal(0, 0.8, (h, w, 3))
    elif kind == "uniform_noise":
        x = rng.integers(0, 256, (h, w, 3))
    elif kind == "grey_noise":
        x = np.repeat(rng.normal(128, 30, (h, w, 1)), 3, axis=2)
    elif kind == "salt_pepper":
        x = np.broadcast_to(np.array(colour), (h, w, 3)).copy()
        x[rng.random((h, w)) < 0.2] = 255
    else:
        raise ValueError(kind)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


EXPECTED = {"constant": BLANK, "placeholder": BLANK, "near_constant": BLANK,
            "uniform_noise": NOISE, "grey_noise": NOISE, "salt_pepper": NOISE}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_junk_is_caught_with_its_status(kind):
    for seed in range(5):
        img = junk(kind, seed)
        assert low_information(img) == EXPECTED[kind], (kind, seed, measures(reduce(img)))
        assert low_information(jpeg_round_trip(img, 85)) == EXPECTED[kind], (kind, seed)


def line_drawing(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (200, 160), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        draw.line([tuple(int(v) for v in rng.integers(0, 160, 2)) for _ in range(3)], fill="black", width=2)
    return img


def icon(seed: int) -> Image.Image:
    """A transparent-background RGBA icon, composited on white as ingest does."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((12, 12, 52, 52), fill=tuple(int(c) for c in rng.integers(0, 200, 3)) + (255,))
    draw.rectangle((26, 20, 38, 44), fill=(255, 255, 255, 255))
    return to_rgb(img)


def test_ordinary_images_pass():
    imgs = [make_image(s, (int(32 + 13 * s), int(32 + 7 * s))) for s in range(30)]
    imgs += [make_class_image(c, s) for c in range(10) for s in range(3)]
    imgs += [line_drawing(s) for s in range(10)] + [icon(s) for s in range(10)]
    edited = [blurred(resized(imgs[i], 0.7), 1.5) for i in range(10)]
    imgs += edited + [Image.open(io.BytesIO(reencode(i, 40))) for i in imgs[:20]]
    for i, img in enumerate(imgs):
        assert low_information(img) is None, (i, measures(reduce(img)))


def test_arrays_and_grey_images_work_like_pil():
    rng = np.random.default_rng(0)
    grey = np.zeros((28, 28), np.uint8)
    grey[6:22, 9:19] = 180  # an item on a black background, Fashion-MNIST-like
    assert low_information(grey) is None
    assert low_information(np.full((28, 28), 7, np.uint8)) == BLANK
    assert low_information(rng.integers(0, 256, (28, 28), dtype=np.uint8)) == NOISE
    assert low_information(Image.fromarray(grey, "L")) is None


def test_check_image_reports_low_information_and_can_be_turned_off():
    blank = encode(Image.new("RGB", (80, 60), (200, 30, 30)), "PNG")
    noise = encode(junk("uniform_noise", 1), "PNG")
    res = check_image(blank)
    assert (res.status, res.width, res.height) == (BLANK, 80, 60) and "one colour" in res.error
    assert check_image(noise).status == NOISE
    assert check_image(encode(make_image(3), "JPEG")).status == "ok"
    off = CheckSettings(lowinfo=False)
    assert check_image(blank, off).status == "ok" and check_image(noise, off).status == "ok"
    assert check_image(noise, CheckSettings(lowinfo_min_corr=-1.0)).status == "ok"  # thresholds are settings
    placeholder = encode(junk("placeholder", 0), "PNG")
    assert check_image(placeholder).status == BLANK
    assert check_image(placeholder, CheckSettings(lowinfo_max_flat=1.01)).status == "ok"


def test_integer_measures_equal_the_float_formulas():
    from curate.lowinfo import _channels, _corr, _flat, _std

    rng = np.random.default_rng(3)
    for k in range(300):
        h, w = rng.integers(1, 40, 2)
        base = rng.integers(0, 256, 3)
        spread = int(rng.choice([0, 2, 5, 40, 255]))
        rgb = np.clip(base + rng.integers(-spread, spread + 1, (h, w, 3)), 0, 255).astype(np.uint8)
        x = rgb.reshape(-1, 3).astype(np.int16)
        q = x >> 4
        codes = (q[:, 0] << 8) | (q[:, 1] << 4) | q[:, 2]
        centre = np.median(x[codes == np.bincount(codes).argmax()], axis=0)
        want_flat = float((np.abs(x - centre).max(axis=1) <= 6).mean())
        ch = _channels(rgb)
        assert _flat(ch, 6) == want_flat, k
        assert abs(_std(ch) - float(x.astype(np.float64).std(axis=0).max())) < 1e-9, k
        if min(h, w) >= 2:
            g = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            want_corr = -1.0
            for a, b in ((g[:, :-1], g[:, 1:]), (g[:-1, :], g[1:, :])):
                a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
                den = np.sqrt((a * a).sum() * (b * b).sum())
                want_corr = 1.0 if den == 0 or want_corr == 1.0 else max(want_corr, float((a * b).sum() / den))
            assert want_corr == 1.0 or abs(_corr(rgb) - want_corr) < 1e-9, k


def test_flat_is_skipped_only_where_it_cannot_reach_the_threshold():
    from curate.lowinfo import _channels, _flat, _may_be_flat, _var

    rng = np.random.default_rng(5)
    skipped = 0
    for k in range(400):
        n = int(rng.integers(50, 400))
        share = rng.uniform(0.9, 1.0)
        near = rng.random(n) < share
        base = rng.integers(0, 256, 3)
        rgb = np.where(near[:, None], base + rng.integers(-6, 7, (n, 3)), rng.choice([0, 255], (n, 3)))
        ch = _channels(np.clip(rgb, 0, 255).astype(np.uint8).reshape(1, n, 3))
        for max_flat in (0.9, 0.95, 0.98):
            if not _may_be_flat(_var(ch), max_flat, 6):
                skipped += 1
                assert _flat(ch, 6) < max_flat, k
    assert skipped > 50
