"""Multi-crop augmentation: counts, sizes, documented probabilities, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.augment import INTENDED_BLUR_PROBS, OFFICIAL_EFFECTIVE_BLUR_PROBS, MultiCropAugment

from .conftest import make_images


def _img(size: int = 64) -> Image.Image:
    return Image.fromarray(make_images(1, size)[0])


def test_crop_counts_and_sizes_default():
    aug = MultiCropAugment()
    out = aug(_img(304), np.random.default_rng(0))
    assert len(out["global"]) == 2 and len(out["local"]) == 8
    assert all(t.shape == (3, 224, 224) and t.dtype == torch.float32 for t in out["global"])
    assert all(t.shape == (3, 98, 98) for t in out["local"])  # official 98 = 7 patches of 14


def test_crop_sizes_override_and_n_local():
    aug = MultiCropAugment(global_size=32, local_size=16, n_local=3)
    out = aug(_img(), np.random.default_rng(0), global_size=40, local_size=8)
    assert [t.shape[-1] for t in out["global"]] == [40, 40]
    assert [t.shape[-1] for t in out["local"]] == [8, 8, 8]


def test_deterministic_given_generator():
    aug = MultiCropAugment(global_size=32, local_size=16, n_local=2)
    a = aug(_img(), np.random.default_rng(5))
    b = aug(_img(), np.random.default_rng(5))
    c = aug(_img(), np.random.default_rng(6))
    assert all(torch.equal(x, y) for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]))
    assert not torch.equal(a["global"][0], c["global"][0])


def _frequencies(aug: MultiCropAugment, n: int = 4000) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(123)
    out = {}
    for kind in ("global1", "global2", "local"):
        ps = [aug.view_params(kind, 200, 150, rng) for _ in range(n)]
        out[kind] = {
            "blur": np.mean([p.blur_sigma is not None for p in ps]),
            "solarize": np.mean([p.solarize for p in ps]),
            "jitter": np.mean([p.jitter is not None for p in ps]),
            "gray": np.mean([p.grayscale for p in ps]),
            "flip": np.mean([p.flip for p in ps]),
            "area": [p.box[2] * p.box[3] / (200 * 150) for p in ps],
        }
    return out


def test_default_blur_probabilities_are_the_official_effective_ones():
    # The official GaussianBlur applies with 1 - p: the released models saw 0.0 / 0.9 / 0.5.
    assert OFFICIAL_EFFECTIVE_BLUR_PROBS == (0.0, 0.9, 0.5)
    f = _frequencies(MultiCropAugment())
    assert f["global1"]["blur"] == 0.0
    assert f["global2"]["blur"] == pytest.approx(0.9, abs=0.02)
    assert f["local"]["blur"] == pytest.approx(0.5, abs=0.03)
    assert f["global1"]["solarize"] == 0.0 and f["local"]["solarize"] == 0.0
    assert f["global2"]["solarize"] == pytest.approx(0.2, abs=0.02)
    for kind in f.values():
        assert kind["jitter"] == pytest.approx(0.8, abs=0.025)
        assert kind["gray"] == pytest.approx(0.2, abs=0.025)
        assert kind["flip"] == pytest.approx(0.5, abs=0.03)


def test_intended_blur_setting():
    assert INTENDED_BLUR_PROBS == (1.0, 0.1, 0.5)
    f = _frequencies(MultiCropAugment(blur_probs=INTENDED_BLUR_PROBS), n=2000)
    assert f["global1"]["blur"] == 1.0
    assert f["global2"]["blur"] == pytest.approx(0.1, abs=0.025)


def test_crop_scales():
    f = _frequencies(MultiCropAugment(), n=1000)
    g = np.array(f["global1"]["area"])
    loc = np.array(f["local"]["area"])
    assert g.min() >= 0.30 and g.max() <= 1.0 and g.mean() > 0.5
    assert loc.min() >= 0.04 and loc.max() <= 0.34


def test_blur_and_solarize_change_pixels():
    aug = MultiCropAugment(global_size=32, local_size=16)
    p = aug.view_params("global1", 64, 64, np.random.default_rng(0))
    p.jitter, p.grayscale, p.flip, p.solarize = None, False, False, False
    img = _img()
    p.blur_sigma = None
    sharp = aug.apply(img, p)
    p.blur_sigma = 2.0
    blurred = aug.apply(img, p)
    # blur lowers high-frequency energy
    assert blurred.diff(dim=-1).abs().mean() < 0.8 * sharp.diff(dim=-1).abs().mean()
    p.blur_sigma, p.solarize = None, True
    assert not torch.equal(aug.apply(img, p), sharp)
