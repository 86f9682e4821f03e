"""iBOT block masking: which global crops are masked, how much, and the block masks themselves."""
from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    """Draws block-wise patch masks on an (h, w) grid.

    Blocks are rectangles of at least `min_block_patches` patches (aspect ratio in
    [min_aspect, 1/min_aspect], at most `max_block_fraction` of the grid); blocks are added until
    the requested count is reached or no more fits (so the result is <= the request, and the
    shortfall is below `min_block_patches` unless the grid is nearly full).
    """

    def __init__(self, grid: tuple[int, int], min_block_patches: int = 4, min_aspect: float = 0.3,
                 max_block_fraction: float = 0.5, attempts: int = 10) -> None:
        self.h, self.w = grid
        self.min_block = min_block_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.max_block = max(int(max_block_fraction * self.h * self.w), min_block_patches)
        self.attempts = attempts

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to add one block adding between 1 and `budget` new patches; return how many."""
        hi = min(budget, self.max_block)
        if hi < self.min_block:
            return 0
        for _ in range(self.attempts):
            area = rng.uniform(self.min_block, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh * bw < self.min_block or bh > self.h or bw > self.w:
                continue
            top = int(rng.integers(0, self.h - bh + 1))
            left = int(rng.integers(0, self.w - bw + 1))
            new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
            if 0 < new <= budget:
                mask[top:top + bh, left:left + bw] = True
                return new
        return 0

    def __call__(self, n_patches: int, rng: np.random.Generator) -> np.ndarray:
        """Return a bool [h, w] mask with at most `n_patches` masked patches."""
        mask = np.zeros((self.h, self.w), dtype=bool)
        count = 0
        while count < n_patches:
            added = self._add_block(mask, n_patches - count, rng)
            if added == 0:
                break
            count += added
        return mask


def stratified_ratios(n: int, ratio_min: float, ratio_max: float, rng: np.random.Generator) -> np.ndarray:
    """n mask ratios, the i-th uniform in the i-th of n equal sub-intervals of [ratio_min, ratio_max]."""
    edges = np.linspace(ratio_min, ratio_max, n + 1)
    return rng.uniform(edges[:-1], edges[1:]) if n > 0 else np.zeros(0)


def sample_masks(n_images: int, grid: tuple[int, int], rng: np.random.Generator,
                 sample_probability: float = 0.5, ratio_min: float = 0.1, ratio_max: float = 0.5,
                 min_block_patches: int = 4, min_aspect: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Masks for the `n_images` global crops of a batch: bool [n_images, h*w] and target ratios.

    Exactly int(n_images * sample_probability) randomly chosen images are masked, with ratios
    stratified over [ratio_min, ratio_max]; the others get no mask (target ratio 0).
    """
    h, w = grid
    n_masked = int(n_images * sample_probability)
    ratios = np.zeros(n_images)
    chosen = rng.permutation(n_images)[:n_masked]
    ratios[chosen] = rng.permutation(stratified_ratios(n_masked, ratio_min, ratio_max, rng))
    gen = BlockMaskGenerator(grid, min_block_patches, min_aspect)
    masks = np.zeros((n_images, h * w), dtype=bool)
    for i in chosen:
        masks[i] = gen(int(h * w * ratios[i]), rng).reshape(-1)
    return masks, ratios
