"""Shared fixtures for trainer tests: tiny generated shards / folders and a tiny config."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def make_images(n: int, size: int = 48, seed: int = 0, n_classes: int = 0) -> list[np.ndarray]:
    """Random smooth-ish RGB images (optionally class-dependent colours) as uint8 arrays."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.random((size // 8, size // 8, 3))
        if n_classes:
            base = 0.3 * base + 0.7 * np.eye(3)[i % n_classes % 3] * (1 + (i % n_classes) // 3) / 2
        arr = np.kron(base, np.ones((8, 8, 1))) + 0.1 * rng.random((size, size, 3))
        out.append((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    return out


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(root: str, n_shards: int = 2, per_shard: int = 12, corrupt_keys: tuple[str, ...] = ()) -> list[str]:
    """Webdataset shards in the curation layout (image under its extension + json metadata)."""
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    images = make_images(n_shards * per_shard)
    paths = []
    for s in range(n_shards):
        path = os.path.join(root, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(per_shard):
                idx = s * per_shard + i
                key = f"{idx:016x}"
                ext = "jpg" if idx % 2 else "png"
                data = encode(images[idx], "JPEG" if ext == "jpg" else "PNG")
                if key in corrupt_keys:
                    data = b"not an image at all" + data[:10]
                meta = {"id": key, "uri": f"mem://{key}", "width": 48, "height": 48}
                w.write({"__key__": key, ext: data, "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


TINY_OVERRIDES = [
    "model.arch=vit_tiny", "model.patch_size=4", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
    "model.drop_path_rate=0.1", "crops.global_size=24", "crops.local_size=12", "crops.n_local=2",
    "head.prototypes=128", "head.hidden_dim=64", "head.bottleneck_dim=32", "head.freeze_last_layer_iters=1",
    "optim.batch_size=6", "optim.warmup_iters=2", "optim.base_lr=0.02", "loss.warmup_teacher_temp_iters=3",
    "data.num_workers=0", "checkpoint_every=2", "progress=false", "eval_size=24",
]


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards"))
    write_shards(root)
    return root


@pytest.fixture
def tiny_cfg(shard_dir, tmp_path):
    """Factory for a tiny TrainConfig writing into tmp_path/<name>."""
    from train.config import load_config

    def make(name: str = "run", *extra: str):
        return load_config(None, TINY_OVERRIDES + [f"data.path={shard_dir}", f"output_dir={tmp_path / name}",
                                                   *extra])

    return make
