"""DINOv2 multi-crop augmentation, driven by an explicit numpy Generator (reproducible per sample).

Blur probabilities default to the official code's *effective* values (global1 0.0, global2 0.9,
local 0.5), with which the released models were trained: its GaussianBlur applies with 1 - p.
The papers' intended values (1.0 / 0.1 / 0.5, as in DINO/BYOL) are `INTENDED_BLUR_PROBS`
(`crops.blur_probs: [1.0, 0.1, 0.5]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from train.models import IMAGENET_MEAN, IMAGENET_STD

INTENDED_BLUR_PROBS = (1.0, 0.1, 0.5)
OFFICIAL_EFFECTIVE_BLUR_PROBS = (0.0, 0.9, 0.5)


@dataclass
class ViewParams:
    """All random decisions for one view (so they can be inspected and tested)."""

    box: tuple[int, int, int, int]  # left, top, width, height
    size: int
    flip: bool
    jitter: tuple[float, float, float, float, tuple[int, ...]] | None  # b, c, s, h, order
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


class MultiCropAugment:
    """Two global crops and `n_local` local crops per image, each a normalised float tensor."""

    def __init__(self, global_size: int = 224, local_size: int = 98, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.05, 0.32),
                 blur_probs: tuple[float, float, float] = OFFICIAL_EFFECTIVE_BLUR_PROBS, solarize_prob: float = 0.2,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_prob: float = 0.8,
                 grayscale_prob: float = 0.2) -> None:
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur_probs = tuple(blur_probs)
        self.solarize_prob = solarize_prob
        self.jitter, self.jitter_prob, self.grayscale_prob = tuple(jitter), jitter_prob, grayscale_prob
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @staticmethod
    def crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
        """RandomResizedCrop box (left, top, w, h): area fraction in `scale`, log-uniform aspect."""
        area = width * height
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side

    def view_params(self, kind: str, width: int, height: int, rng: np.random.Generator,
                    size: int | None = None) -> ViewParams:
        """Draw the parameters of one view; kind is 'global1', 'global2' or 'local'."""
        is_local = kind == "local"
        scale = self.local_scale if is_local else self.global_scale
        box = self.crop_box(width, height, scale, rng)
        flip = bool(rng.random() < 0.5)
        jitter = None
        if rng.random() < self.jitter_prob:
            b, c, s, h = self.jitter
            jitter = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s),
                      rng.uniform(-h, h), tuple(int(i) for i in rng.permutation(4)))
        gray = bool(rng.random() < self.grayscale_prob)
        p_blur = {"global1": self.blur_probs[0], "global2": self.blur_probs[1], "local": self.blur_probs[2]}[kind]
        blur = float(rng.uniform(0.1, 2.0)) if rng.random() < p_blur else None
        solarize = kind == "global2" and bool(rng.random() < self.solarize_prob)
        if size is None:
            size = self.local_size if is_local else self.global_size
        return ViewParams(box, size, flip, jitter, gray, blur, solarize)

    def apply(self, img: Image.Image, p: ViewParams) -> torch.Tensor:
        """Apply drawn parameters to an RGB PIL image; returns a normalised [3, size, size] tensor."""
        import torchvision.transforms.functional as TF

        left, top, w, h = p.box
        out = img.resize((p.size, p.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if p.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if p.jitter is not None:
            b, c, s, hue, order = p.jitter
            ops = [lambda x: TF.adjust_brightness(x, b), lambda x: TF.adjust_contrast(x, c),
                   lambda x: TF.adjust_saturation(x, s), lambda x: TF.adjust_hue(x, hue)]
            for i in order:
                out = ops[i](out)
        if p.grayscale:
            out = out.convert("L").convert("RGB")
        if p.blur_sigma is not None:
            out = out.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
        if p.solarize:
            out = ImageOps.solarize(out, threshold=128)
        arr = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (arr - self.mean) / self.std

    def __call__(self, img: Image.Image, rng: np.random.Generator, global_size: int | None = None,
                 local_size: int | None = None) -> dict[str, list[torch.Tensor]]:
        """Return {"global": [2 tensors], "local": [n_local tensors]} for one RGB image."""
        img = img.convert("RGB")
        w, h = img.size
        gs = global_size or self.global_size
        ls = local_size or self.local_size
        globals_ = [self.apply(img, self.view_params(k, w, h, rng, gs)) for k in ("global1", "global2")]
        locals_ = [self.apply(img, self.view_params("local", w, h, rng, ls)) for _ in range(self.n_local)]
        return {"global": globals_, "local": locals_}
