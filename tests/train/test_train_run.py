"""End-to-end tiny runs: loss goes down, exact resume, NaN guard, high-res phase, CLI."""
from __future__ import annotations

import json
import os

import pytest
import torch

from train import cli
from train.checkpoint import load_checkpoint
from train.loop import TrainingDiverged, train
from train.models import load_backbone
from train.ssl_model import SSLMetaArch


def test_tiny_run_lowers_loss_and_logs(tiny_cfg):
    cfg = tiny_cfg("run", "optim.iterations=16", "checkpoint_every=8", "log_every=4")
    out = train(cfg)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 16 and all(map(lambda v: v == v, losses))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    lines = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in lines] == [3, 7, 11, 15]
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp",
                "images_per_s"):
        assert key in lines[-1]
    files = set(os.listdir(cfg.output_dir))
    assert {"last.pt", "last_good.pt", "teacher_backbone.pt", "config.yaml"} <= files
    assert load_checkpoint(os.path.join(cfg.output_dir, "last_good.pt"))["iteration"] == 8
    ckpt = load_checkpoint(os.path.join(cfg.output_dir, "last.pt"))
    assert ckpt["iteration"] == 16 and set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    backbone = load_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pt"))
    teacher_sd = {k[len("teacher.backbone."):]: v for k, v in ckpt["model"].items()
                  if k.startswith("teacher.backbone.")}
    assert all(torch.equal(v, teacher_sd[k]) for k, v in backbone.backbone.state_dict().items())
    assert backbone(torch.randn(2, 3, 24, 24)).shape == (2, 48)


def test_resume_is_bit_identical(tiny_cfg):
    n = 3
    full = train(tiny_cfg("full", f"optim.iterations={2 * n}", f"checkpoint_every={n}"))
    part_cfg = tiny_cfg("part", f"optim.iterations={2 * n}", f"checkpoint_every={n}")
    first = train(part_cfg, stop_at=n)
    assert first["iterations"] == n
    second = train(part_cfg)
    assert second["start_iteration"] == n
    assert [h["loss"] for h in first["history"] + second["history"]] == [h["loss"] for h in full["history"]]
    a = load_checkpoint(os.path.join(tiny_cfg("full").output_dir, "last.pt"))
    b = load_checkpoint(os.path.join(part_cfg.output_dir, "last.pt"))
    assert a["iteration"] == b["iteration"] == 2 * n
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the plain data too (a resumed optimizer once saved AdamW's betas as a list: other bytes)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert all(type(g["betas"]) is tuple for g in b["optimizer"]["param_groups"])


def test_nan_guard_stops_and_keeps_last_good(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("nan", "optim.iterations=6", "checkpoint_every=2")
    real = SSLMetaArch.forward_loss

    def poisoned(self, batch, teacher_temp):
        loss, terms = real(self, batch, teacher_temp)
        if batch["iteration"] >= 3:
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(SSLMetaArch, "forward_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss at iteration 3"):
        train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.output_dir, "last.pt"))
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    args = ["tiny", "optim.iterations=6", "checkpoint_every=2", "progress=false", "data.num_workers=0",
            "optim.batch_size=4", "crops.n_local=1", f"data.path={cfg.data.path}", f"output_dir={cfg.output_dir}_cli"]
    assert cli.main(args) == 3


def test_high_res_phase_runs(tiny_cfg):
    cfg = tiny_cfg("hr", "optim.iterations=3", "crops.high_res_global_size=40", "crops.high_res_local_size=16",
                   "crops.high_res_iters=1")
    out = train(cfg)
    assert len(out["history"]) == 3
    # the saved backbone evaluates at eval_size (24 here), not at the 40 px high-res training size
    assert load_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pt")).image_size == 24
    cfg0 = tiny_cfg("hr0", "optim.iterations=3", "crops.high_res_global_size=40", "crops.high_res_iters=1",
                    "eval_size=0")
    train(cfg0)
    assert load_backbone(os.path.join(cfg0.output_dir, "teacher_backbone.pt")).image_size == 40


def test_cli_main_and_config_errors(tiny_cfg, capsys):
    cfg = tiny_cfg("cli")
    base = ["tiny", "optim.iterations=2", "optim.batch_size=4", "crops.n_local=1", "progress=false",
            "data.num_workers=0", f"data.path={cfg.data.path}", f"output_dir={cfg.output_dir}"]
    assert cli.main(base) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 2
    assert cli.main(base + ["optim.itrations=3"]) == 2
    assert cli.main(base + ["loss.centering=bogus"]) == 2
    assert cli.main(["no_such_config"]) == 2
