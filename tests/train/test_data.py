"""Data sources and the deterministic per-iteration batch stream."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from train.augment import MultiCropAugment
from train.data import (BatchBuilder, BatchSpec, FolderIndex, TarIndex, expand_shard_paths, make_loader,
                        slot_to_index)

from .conftest import make_images, write_shards


def _builder(index, batch_size=6, rank=0, world=1, seed=0, **spec_kw) -> BatchBuilder:
    aug = MultiCropAugment(global_size=16, local_size=8, n_local=2)
    spec = BatchSpec(seed=seed, batch_size=batch_size, world_size=world, rank=rank, total_iters=100, patch_size=4,
                     global_size=16, local_size=8, **spec_kw)
    return BatchBuilder(index, aug, spec)


def test_expand_shard_paths(shard_dir):
    d = expand_shard_paths(shard_dir)
    assert [os.path.basename(p) for p in d] == ["shard-000000.tar", "shard-000001.tar"]
    assert expand_shard_paths(os.path.join(shard_dir, "shard-{000000..000001}.tar")) == d
    assert expand_shard_paths(",".join(d)) == d
    assert expand_shard_paths(os.path.join(shard_dir, "*.tar")) == d
    with pytest.raises(FileNotFoundError):
        expand_shard_paths(os.path.join(shard_dir, "shard-{000000..000005}.tar"))


def test_tar_index_reads_samples(shard_dir):
    idx = TarIndex(expand_shard_paths(shard_dir))
    assert len(idx) == 24
    assert idx.keys[0] == f"{0:016x}" and idx.exts[:2] == ["png", "jpg"]
    data, key = idx.read(13)
    assert key == f"{13:016x}" and Image.open(__import__("io").BytesIO(data)).size == (48, 48)


def test_batch_layout_and_determinism(shard_dir):
    b = _builder(TarIndex(expand_shard_paths(shard_dir)))
    x, y = b(3), b(3)
    assert x["global"].shape == (12, 3, 16, 16) and x["local"].shape == (12, 3, 8, 8)
    assert x["masks"].shape == (12, 16) and x["masks"].dtype == torch.bool
    assert (x["mask_ratios"] > 0).sum() == 6
    assert torch.equal(x["global"], y["global"]) and torch.equal(x["masks"], y["masks"]) and x["keys"] == y["keys"]
    assert x["keys"] != b(4)["keys"]


def test_epoch_permutation_covers_everything_and_ranks_disjoint(shard_dir):
    idx = TarIndex(expand_shard_paths(shard_dir))
    r0, r1 = _builder(idx, batch_size=3, rank=0, world=2), _builder(idx, batch_size=3, rank=1, world=2)
    keys = []
    for it in range(4):  # 4 iterations x 2 ranks x 3 = 24 = one epoch
        keys += r0(it)["keys"] + r1(it)["keys"]
    assert sorted(keys) == sorted(idx.keys)
    perm0 = [slot_to_index(0, s, 24) for s in range(24)]
    perm1 = [slot_to_index(0, s, 24) for s in range(24, 48)]
    assert sorted(perm0) == sorted(perm1) == list(range(24)) and perm0 != perm1


def test_corrupt_sample_counted_and_skipped(tmp_path):
    bad = f"{5:016x}"
    write_shards(str(tmp_path), n_shards=1, per_shard=8, corrupt_keys=(bad,))
    idx = TarIndex(expand_shard_paths(str(tmp_path)))
    b = _builder(idx, batch_size=8)
    batch = b(0)  # one epoch: the corrupt record is drawn exactly once
    assert batch["decode_errors"] >= 1
    assert batch["global"].shape[0] == 16 and torch.isfinite(batch["global"]).all()
    assert bad not in batch["keys"] and len(batch["keys"]) == 8
    total = sum(b(i)["decode_errors"] for i in range(1, 4))
    assert total >= 3  # once per epoch


def test_folder_source(tmp_path):
    for i, arr in enumerate(make_images(5)):
        sub = tmp_path / ("a" if i % 2 else "b") / "deep"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("skip me")
    idx = FolderIndex(str(tmp_path))
    assert len(idx) == 5 and idx.files[0] == os.path.join("a", "deep", "1.png")
    batch = _builder(idx, batch_size=5)(0)
    assert batch["global"].shape == (10, 3, 16, 16)


def test_high_res_phase_sizes(shard_dir):
    idx = TarIndex(expand_shard_paths(shard_dir))
    b = _builder(idx, batch_size=2, high_res_global_size=32, high_res_local_size=12, high_res_iters=10)
    assert b.spec.crop_sizes(89) == (16, 8) and b.spec.crop_sizes(90) == (32, 12)
    batch = b(95)
    assert batch["global"].shape[-1] == 32 and batch["local"].shape[-1] == 12 and batch["masks"].shape[1] == 64


def test_loader_workers_keep_iteration_order(shard_dir):
    b = _builder(TarIndex(expand_shard_paths(shard_dir)), batch_size=2)
    its = [batch["iteration"] for batch in make_loader(b, 5, 11, num_workers=2)]
    assert its == list(range(5, 11))
    single = [batch["keys"] for batch in make_loader(b, 5, 11, num_workers=0)]
    multi = [batch["keys"] for batch in make_loader(b, 5, 11, num_workers=2)]
    assert single == multi
