"""A labelled, long-tailed, web-like raw pool for the demo: classes that look alike inside and
differ between each other, power-law class sizes, exact and edited duplicates, junk files, and a
labelled evaluation set with a few of its images planted (edited) in the pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.synth import encode, reencode, resized


def make_class_image(cls: int, seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """An image of class `cls`: the class fixes the palette and the shape kind, the seed the layout."""
    crng = np.random.default_rng(10_000 + cls)
    palette = crng.integers(0, 256, (3, 3))
    kind = cls % 3
    rng = np.random.default_rng(seed)
    w, h = size
    jitter = lambda c: tuple(int(v) for v in np.clip(c + rng.integers(-25, 26, 3), 0, 255))  # noqa: E731
    img = Image.new("RGB", size, jitter(palette[0]))
    draw = ImageDraw.Draw(img)
    for _ in range(int(crng.integers(3, 6))):
        cx, cy = rng.integers(w // 6, 5 * w // 6), rng.integers(h // 6, 5 * h // 6)
        r = int(rng.integers(min(w, h) // 9, min(w, h) // 4))
        box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
        colour = jitter(palette[1 + int(rng.integers(0, 2))])
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(int(cx), box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return img


def class_sizes(n: int, n_classes: int, alpha: float) -> np.ndarray:
    """Power-law class sizes summing to n, every class at least 2."""
    weights = 1.0 / np.arange(1, n_classes + 1) ** alpha
    sizes = np.maximum(2, np.floor(weights / weights.sum() * n)).astype(int)
    sizes[0] += n - sizes.sum()
    return sizes


def write_labelled_pool(root: str | Path, n: int = 2000, n_classes: int = 10, alpha: float = 1.2,
                        seed: int = 0, eval_per_class: tuple[int, int] = (20, 10)) -> dict:
    """Write root/raw (the pool), root/eval/{train,test}/<class>/ and root/labels.json; returns what was planted."""
    root = Path(root)
    raw, rng = root / "raw", np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    labels: dict[str, int] = {}
    planted = {"images": 0, "exact_copy": 0, "near_copy": 0, "junk": 0, "eval_copies": 0}
    for cls, size in enumerate(class_sizes(n, n_classes, alpha)):
        for i in range(size):
            img = make_class_image(cls, seed * 7_919_000 + cls * 100_000 + i)
            name = f"c{cls:02d}_{i:05d}.jpg"
            data = encode(img, "JPEG", quality=90)
            (raw / name).write_bytes(data)
            labels[name] = cls
            planted["images"] += 1
            if rng.random() < 0.05:
                (raw / f"copy_{name}").write_bytes(data)
                labels[f"copy_{name}"] = cls
                planted["exact_copy"] += 1
            if rng.random() < 0.05:
                (raw / f"edit_{name}").write_bytes(reencode(resized(img, float(rng.uniform(0.8, 1.3))), 70))
                labels[f"edit_{name}"] = cls
                planted["near_copy"] += 1
    for split, per_class in zip(("train", "test"), eval_per_class):
        for cls in range(n_classes):
            d = root / "eval" / split / f"class{cls:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = make_class_image(cls, 900_000_000 + seed * 1_000_000 + cls * 1000 + i + (500 if split == "test" else 0))
                img.save(d / f"{i:03d}.png")
                if split == "test" and i == 0:  # a copy of this benchmark image leaks into the pool
                    (raw / f"leak_class{cls:02d}.jpg").write_bytes(reencode(resized(img, 1.1), 85))
                    labels[f"leak_class{cls:02d}.jpg"] = cls
                    planted["eval_copies"] += 1
    junk = [b"", b"caption text, not an image\n", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
            encode(make_class_image(0, 1, (12, 12)), "PNG")]
    for j in range(max(4, n // 100)):
        (raw / f"junk{j:04d}.jpg").write_bytes(junk[j % len(junk)])
        planted["junk"] += 1
    (root / "labels.json").write_text(json.dumps(labels))
    return planted
