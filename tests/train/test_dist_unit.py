"""Single-process pieces of multi-process training: world-size-free batches, skip policy, rank seeds."""
from __future__ import annotations

import pytest
import torch

from train import dist
from train.loop import build_batches, resolve_global_batch
from train.ssl_model import SSLMetaArch


def test_global_batch_is_the_same_for_any_world_size(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("b", "optim.batch_size=4", "mask.sample_probability=0.5")
    whole = build_batches(cfg, 4)(3)
    parts = []
    for r in range(2):
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        parts.append(build_batches(cfg, 2)(3))
    assert whole["keys"] == parts[0]["keys"] + parts[1]["keys"]
    for key in ("global", "masks"):  # crop-major: [view 0 of the batch, view 1 of the batch]
        w = whole[key].chunk(2)
        p = [x[key].chunk(2) for x in parts]
        for v in range(2):
            assert torch.equal(w[v], torch.cat([p[0][v], p[1][v]])), key
    w, p = whole["local"].chunk(2), [x["local"].chunk(2) for x in parts]
    assert all(torch.equal(w[v], torch.cat([p[0][v], p[1][v]])) for v in range(2))
    assert whole["masks"].any()


def test_resolve_global_batch(tiny_cfg):
    cfg = tiny_cfg("g", "optim.batch_size=4")
    assert resolve_global_batch(cfg, 2, None) == 8
    assert resolve_global_batch(cfg, 1, {"global_batch_size": 8}) == 8
    with pytest.raises(ValueError, match="global batch of 8"):
        resolve_global_batch(tiny_cfg("g2", "dist.global_batch_size=4"), 1, {"global_batch_size": 8})
    with pytest.raises(ValueError, match="does not split"):
        resolve_global_batch(cfg, 3, {"global_batch_size": 8})


def test_rank_seeds_are_distinct_and_deterministic():
    seeds = [dist.rank_seed(0, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [dist.rank_seed(0, r) for r in range(8)]
    assert dist.rank_seed(1, 0) != seeds[0]


def test_skip_policy_skips_then_stops(tiny_cfg, monkeypatch):
    from train.loop import TrainingDiverged, train

    real = SSLMetaArch.forward_loss

    def poisoned(self, batch, teacher_temp):
        loss, terms = real(self, batch, teacher_temp)
        return (loss * float("nan") if batch["iteration"] in (1, 3, 4) else loss), terms

    monkeypatch.setattr(SSLMetaArch, "forward_loss", poisoned)
    out = train(tiny_cfg("skip", "optim.iterations=3", "dist.nonfinite=skip", "dist.max_skips=1"))
    assert [h["iteration"] for h in out["history"]] == [0, 2]
    with pytest.raises(TrainingDiverged, match="iteration 4"):
        train(tiny_cfg("skip2", "optim.iterations=6", "dist.nonfinite=skip", "dist.max_skips=1"))
