"""Training data: webdataset shards or an image folder, as a deterministic per-iteration batch stream.

Resume design: sample slot p = iteration * global_batch + rank * batch + j is mapped to a record by a
seeded permutation of the whole sample index for epoch p // N (N = dataset size), and every random
choice (crops, colours, replacement of undecodable samples) comes from a generator seeded by
(seed, iteration, position in the global batch); the masks of the whole global batch are drawn by
(seed, iteration) and each rank takes its rows. The global batch of iteration i is thus the same
images, crops and masks for any world size, and rank r's part is a pure function of (seed, i, r): resuming at
iteration i needs only i, and no stream state. Shards are indexed once by reading their tar
headers (no index.parquet needed) and samples are read by offset; the stream is infinite
(epochs are reshuffled), split by rank (slots) and by DataLoader worker (iteration i -> worker
i % num_workers, which PyTorch yields back in order).
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from train.augment import MultiCropAugment
from train.masking import sample_masks

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "tif")
_TAG_AUG, _TAG_MASK, _TAG_RETRY, _TAG_PERM = 0, 1, 2, 3


def expand_shard_paths(spec: str | list[str]) -> list[str]:
    """Shard list from a directory, a comma list, a brace pattern ({000..009}) or a glob."""
    import braceexpand

    specs = spec if isinstance(spec, list) else [s for s in str(spec).split(",") if s.strip()]
    out: list[str] = []
    for s in specs:
        s = s.strip()
        if os.path.isdir(s):
            out.extend(sorted(glob.glob(os.path.join(s, "*.tar"))))
            continue
        for e in braceexpand.braceexpand(s):
            matches = sorted(glob.glob(e)) if any(c in e for c in "*?[") else [e]
            out.extend(matches)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing or not out:
        raise FileNotFoundError(f"no shards found for {spec!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    return out


class TarIndex:
    """Random-access index of the image members of webdataset tar shards (one entry per sample)."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = list(shards)
        rows: list[tuple[int, int, int]] = []
        keys: list[str] = []
        exts: list[str] = []
        for si, path in enumerate(self.shards):
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    if ext.lower() in IMAGE_EXTS:
                        rows.append((si, m.offset_data, m.size))
                        keys.append(os.path.join(os.path.dirname(m.name), key))
                        exts.append(ext.lower())
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.keys, self.exts = keys, exts

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> tuple[bytes, str]:
        """Raw image bytes and the record key of sample i."""
        si, off, size = (int(v) for v in self.rows[i])
        with open(self.shards[si], "rb") as f:
            f.seek(off)
            return f.read(size), self.keys[i]


class FolderIndex:
    """Recursive folder of image files, sorted by relative path."""

    def __init__(self, root: str) -> None:
        self.root = root
        files = []
        for dirpath, _, names in os.walk(root):
            for n in names:
                if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append(os.path.relpath(os.path.join(dirpath, n), root))
        if not files:
            raise FileNotFoundError(f"no image files under {root!r}")
        self.files = sorted(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> tuple[bytes, str]:
        """Raw bytes and relative path of file i."""
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            return f.read(), self.files[i]


def decode_image(data: bytes) -> "Image.Image":
    """Decode bytes to an RGB PIL image (first frame for animations); raises on corrupt data."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def slot_to_index(seed: int, slot: int, n: int, _cache: dict | None = None) -> int:
    """Record index of global sample slot `slot`: a seeded permutation per epoch of n records."""
    epoch, pos = divmod(slot, n)
    cache = _cache if _cache is not None else {}
    if cache.get("epoch") != epoch:
        cache["epoch"] = epoch
        cache["perm"] = np.random.default_rng([seed, _TAG_PERM, epoch]).permutation(n)
    return int(cache["perm"][pos])


@dataclass
class BatchSpec:
    """Everything that determines the batches of a run (besides the index)."""

    seed: int
    batch_size: int
    world_size: int
    rank: int
    total_iters: int
    patch_size: int
    global_size: int
    local_size: int
    high_res_global_size: int = 0
    high_res_local_size: int = 0
    high_res_iters: int = 0
    mask_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_min_block: int = 4
    mask_min_aspect: float = 0.3
    max_decode_retries: int = 16

    def crop_sizes(self, it: int) -> tuple[int, int]:
        """(global, local) crop sizes at iteration `it` (high-res phase = the last high_res_iters)."""
        if self.high_res_iters > 0 and it >= self.total_iters - self.high_res_iters:
            return self.high_res_global_size, self.high_res_local_size or self.local_size
        return self.global_size, self.local_size


class BatchBuilder:
    """Builds batch `it` for this rank as a pure function of (spec, it)."""

    def __init__(self, index: TarIndex | FolderIndex, augment: MultiCropAugment, spec: BatchSpec) -> None:
        self.index, self.augment, self.spec = index, augment, spec
        self._perm_cache: dict = {}

    def _load(self, slot: int) -> "tuple[Image.Image, str, int]":
        """Decode the record for `slot`, replacing undecodable ones by seeded random records."""
        n, s = len(self.index), self.spec
        idx = slot_to_index(s.seed, slot, n, self._perm_cache)
        errors = 0
        for attempt in range(s.max_decode_retries + 1):
            try:
                data, key = self.index.read(idx)
                return decode_image(data), key, errors
            except Exception:  # noqa: BLE001 - any decode failure is counted and skipped
                errors += 1
                idx = int(np.random.default_rng([s.seed, _TAG_RETRY, slot, attempt]).integers(n))
        raise RuntimeError(f"{errors} consecutive undecodable samples near slot {slot}; is the data corrupt?")

    def _masks(self, it: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of the global batch's masks (drawn by (seed, it) for all 2 x global crops)."""
        s = self.spec
        n_global = s.batch_size * s.world_size
        mrng = np.random.default_rng([s.seed, _TAG_MASK, it])
        masks, ratios = sample_masks(2 * n_global, grid, mrng, s.mask_probability, s.mask_ratio_min,
                                     s.mask_ratio_max, s.mask_min_block, s.mask_min_aspect)
        lo = s.rank * s.batch_size
        rows = np.r_[lo:lo + s.batch_size, n_global + lo:n_global + lo + s.batch_size]
        return masks[rows], ratios[rows]

    def __call__(self, it: int) -> dict:
        """Batch dict: global [2B,3,S,S] (crop-major), local [nB,3,s,s], masks [2B,h*w], counters."""
        s = self.spec
        gsize, lsize = s.crop_sizes(it)
        views_g: list[list[torch.Tensor]] = [[], []]
        views_l: list[list[torch.Tensor]] = [[] for _ in range(self.augment.n_local)]
        keys, errors = [], 0
        base = it * s.batch_size * s.world_size + s.rank * s.batch_size
        for j in range(s.batch_size):
            img, key, err = self._load(base + j)
            errors += err
            keys.append(key)
            rng = np.random.default_rng([s.seed, _TAG_AUG, it, s.rank * s.batch_size + j])
            crops = self.augment(img, rng, gsize, lsize)
            for v, t in enumerate(crops["global"]):
                views_g[v].append(t)
            for v, t in enumerate(crops["local"]):
                views_l[v].append(t)
        grid = (gsize // s.patch_size, gsize // s.patch_size)
        masks, ratios = self._masks(it, grid)
        batch = {
            "iteration": it,
            "global": torch.cat([torch.stack(v) for v in views_g]),
            "masks": torch.from_numpy(masks),
            "mask_ratios": torch.from_numpy(ratios),
            "decode_errors": errors,
            "keys": keys,
        }
        if views_l:
            batch["local"] = torch.cat([torch.stack(v) for v in views_l])
        return batch


class BatchStream(torch.utils.data.IterableDataset):
    """Infinite-or-bounded stream of batches start_iter, start_iter+1, ... split across workers."""

    def __init__(self, builder: BatchBuilder, start_iter: int, end_iter: int) -> None:
        super().__init__()
        self.builder, self.start_iter, self.end_iter = builder, start_iter, end_iter

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for it in range(self.start_iter + wid, self.end_iter, nw):
            yield self.builder(it)


def build_index(source: str, path: str) -> TarIndex | FolderIndex:
    """Sample index for data.source 'shards' (dir / list / brace pattern) or 'folder'."""
    if source == "shards":
        return TarIndex(expand_shard_paths(path))
    if source == "folder":
        return FolderIndex(path)
    raise ValueError(f"unknown data source {source!r}")


def make_loader(builder: BatchBuilder, start_iter: int, end_iter: int, num_workers: int,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over the batch stream (batches already built; order preserved across workers).

    It gets its own generator so that creating it does not consume the global torch RNG (exact resume).
    """
    stream = BatchStream(builder, start_iter, end_iter)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=2 if num_workers > 0 else None,
    )
