"""iBOT masking: which crops, how much, block shapes."""
from __future__ import annotations

import numpy as np

from train.masking import BlockMaskGenerator, sample_masks, stratified_ratios


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of 4-connected components of a 2D bool mask."""
    seen = np.zeros_like(mask)
    sizes = []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, size = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
                sizes.append(size)
    return sizes


def test_half_of_global_crops_masked_with_stratified_ratios():
    rng = np.random.default_rng(0)
    masks, ratios = sample_masks(16, (16, 16), rng)
    assert masks.shape == (16, 256) and masks.dtype == bool
    masked = ratios > 0
    assert masked.sum() == 8
    assert not masks[~masked].any()
    assert masks[masked].any(axis=1).all()
    # one ratio in each eighth of [0.1, 0.5]
    bins = np.floor((np.sort(ratios[masked]) - 0.1) / 0.05).astype(int)
    assert bins.tolist() == list(range(8))
    achieved = masks[masked].sum(1) / 256
    target = ratios[masked]
    assert np.all(achieved <= target + 1e-9)
    assert np.all(achieved >= target - 0.1)


def test_stratified_ratio_distribution_many_draws():
    rng = np.random.default_rng(1)
    draws = np.stack([stratified_ratios(4, 0.1, 0.5, rng) for _ in range(2000)])
    edges = np.linspace(0.1, 0.5, 5)
    assert np.all(draws >= edges[:-1]) and np.all(draws <= edges[1:])
    assert np.allclose(draws.mean(0), (edges[:-1] + edges[1:]) / 2, atol=0.005)


def test_blocks_have_min_size_and_shape():
    gen = BlockMaskGenerator((14, 14), min_block_patches=4, min_aspect=0.3)
    rng = np.random.default_rng(2)
    for n in (5, 20, 60, 98):
        for _ in range(20):
            m = gen(n, rng)
            assert m.sum() <= n
            assert all(size >= 4 for size in _components(m))
    gen.max_block = 1000
    for _ in range(200):
        m = np.zeros((14, 14), dtype=bool)
        added = gen._add_block(m, 40, rng)
        if added:
            ys, xs = np.nonzero(m)
            bh, bw = np.ptp(ys) + 1, np.ptp(xs) + 1
            assert bh * bw == added >= 4
            assert 0.3 * 0.6 <= bh / bw <= 1 / (0.3 * 0.6) # aspect in [0.3, 1/0.3] up to rounding


def test_mask_probability_rounding():
    masks, ratios = sample_masks(6, (4, 4), np.random.default_rng(3), sample_probability=0.5)
    assert (ratios > 0).sum() == 3
    masks, ratios = sample_masks(4, (4, 4), np.random.default_rng(3), sample_probability=0.0)
    assert not masks.any()
