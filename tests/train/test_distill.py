"""Distillation: a frozen teacher (our checkpoint, or a backbone-only timm-layout file) trains a smaller student."""
from __future__ import annotations

import os

import torch

from train.checkpoint import load_checkpoint
from train.export import to_timm
from train.loop import train
from train.models import load_backbone

TEACHER = ["model.embed_dim=96", "model.depth=2", "model.num_heads=3", "optim.iterations=2"]
STUDENT = ["model.embed_dim=48", "model.depth=1", "model.num_heads=3", "model.drop_path_rate=0.0",
           "head.freeze_last_layer_iters=0", "optim.warmup_iters=1", "optim.base_lr=0.01", "checkpoint_every=100"]


def _teacher_weights(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("teacher.")}


def test_frozen_teacher_trains_student(tiny_cfg):
    teacher_cfg = tiny_cfg("teacher", *TEACHER)
    train(teacher_cfg)
    teacher_ckpt = os.path.join(teacher_cfg.output_dir, "last.pt")
    src = _teacher_weights(load_checkpoint(teacher_ckpt)["model"])
    cfg = tiny_cfg("student", *STUDENT, "optim.iterations=12", f"distill.teacher={teacher_ckpt}")
    out = train(cfg)
    losses = [h["loss"] for h in out["history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    after = _teacher_weights(load_checkpoint(os.path.join(cfg.output_dir, "last.pt"))["model"])
    assert after.keys() == src.keys()  # backbone and both heads of the teacher checkpoint
    assert all(torch.equal(after[k], src[k]) for k in src)
    exported = load_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pt"))
    assert exported.embed_dim == 48  # the student's EMA is the model, not the frozen teacher
    ema = {k[len("student_ema.backbone."):]: v for k, v in
           load_checkpoint(os.path.join(cfg.output_dir, "last.pt"))["model"].items() if k.startswith("student_ema.backbone.")}
    assert all(torch.equal(v, ema[k]) for k, v in exported.backbone.state_dict().items())


def test_teacher_from_a_backbone_only_timm_file(tiny_cfg, tmp_path):
    teacher_cfg = tiny_cfg("t2", *TEACHER, "optim.iterations=1")
    model = train(teacher_cfg)["model"]
    path = str(tmp_path / "teacher_timm.pth")
    bb = model.teacher["backbone"]
    torch.save(to_timm(bb.state_dict(), model.arch, img_size=teacher_cfg.crops.global_size), path)
    cfg = tiny_cfg("s2", *STUDENT, "optim.iterations=2", f"distill.teacher={path}")
    out = train(cfg)
    assert len(out["history"]) == 2
    frozen = out["model"].teacher["backbone"].vit.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in bb.vit.state_dict().items())
    assert out["model"].teacher["backbone"].embed_dim == 96 and out["model"].student["backbone"].embed_dim == 48


def test_distill_vits14_config():
    from train.cli import resolve_config_path
    from train.config import load_config

    cfg = load_config(resolve_config_path("distill_vits14"))
    assert cfg.distill.teacher.endswith("vitg14/last.pt") and cfg.model.arch == "vit_small"
    assert cfg.model.drop_path_rate == 0.0 and cfg.head.prototypes == 131072
