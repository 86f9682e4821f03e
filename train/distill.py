"""Distillation as in the DINOv2 paper (section 5): a large frozen teacher trains a smaller student.

Same training loop and losses, with the paper's exceptions: the teacher is frozen (never updated),
the student sees no iBOT masking and the iBOT loss is applied to all patches of the two global
crops, and a spare EMA of the student is kept; that EMA is the model written as teacher_backbone.pt
and exported. Stochastic depth follows `model.drop_path_rate` (the paper removes it: set 0).
The teacher comes from our training checkpoint (backbone and heads, as the paper), or from a
backbone-only file (teacher_backbone.pt, timm or official DINOv2 weights), whose DINO/iBOT heads
are then seeded random projections, frozen like the rest.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.config import TrainConfig
from train.heads import DINOHead
from train.ssl_model import SSLMetaArch


def _head_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.create(ckpt["config"]))["head"])


def build_frozen_teacher(path: str, cfg: TrainConfig) -> nn.ModuleDict:
    """Teacher backbone (+ heads) from `path`, frozen and in eval mode."""
    from train.checkpoint import safe_load
    from train.export import infer_arch, load_into_backbone, read_backbone
    from train.models import build_backbone

    obj = safe_load(path)
    timm_sd, arch, _ = read_backbone(path, obj)
    backbone = build_backbone(dict(arch or infer_arch(timm_sd), drop_path_rate=0.0))
    load_into_backbone(backbone, path, obj)
    h = cfg.head
    teacher = nn.ModuleDict({"backbone": backbone})
    if isinstance(obj, dict) and "model" in obj and "iteration" in obj:  # our checkpoint: its own heads
        hc = _head_config(obj)
        if hc["prototypes"] != h.prototypes or bool(hc["ibot_separate_head"]) != h.ibot_separate_head:
            raise ValueError(f"{path}: teacher heads have {hc['prototypes']} prototypes (separate iBOT head: "
                             f"{hc['ibot_separate_head']}); set head.prototypes / head.ibot_separate_head to match")
        for key in ("dino_head", "ibot_head") if hc["ibot_separate_head"] else ("dino_head",):
            k = hc["prototypes"] if key == "dino_head" else hc["ibot_prototypes"]
            bdim = hc["bottleneck_dim"] if key == "dino_head" else hc.get("ibot_bottleneck_dim", hc["bottleneck_dim"])
            head = DINOHead(backbone.embed_dim, k, hc["hidden_dim"], bdim, hc["nlayers"])
            prefix = f"teacher.{key}."
            head.load_state_dict({n[len(prefix):]: v for n, v in obj["model"].items() if n.startswith(prefix)})
            teacher[key] = head
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 17)
            teacher["dino_head"] = DINOHead(backbone.embed_dim, h.prototypes, h.hidden_dim, h.bottleneck_dim,
                                            h.nlayers)
            if h.ibot_separate_head:
                teacher["ibot_head"] = DINOHead(backbone.embed_dim, h.ibot_prototypes, h.hidden_dim,
                                                h.ibot_bottleneck_dim, h.nlayers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class DistillMetaArch(SSLMetaArch):
    """SSLMetaArch whose teacher is a frozen (larger) network; the student's EMA is the exported model."""

    export_prefix = "student_ema.backbone."

    def __init__(self, *args: Any, teacher: nn.ModuleDict, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.student_ema = self.teacher  # the EMA copy SSLMetaArch made of the student
        self.teacher = teacher
        self.export_arch = dict(self.arch)

    def train(self, mode: bool = True) -> "DistillMetaArch":
        """Student in `mode`; teacher and student EMA always in eval mode."""
        super().train(mode)
        self.student_ema.eval()
        return self

    def forward_loss(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict[str, float]]:
        """DINO + iBOT on every global-crop patch (no student masking) + KoLeo, against the frozen teacher."""
        masks = batch["masks"].to(dtype=torch.bool)
        batch = dict(batch, masks=torch.zeros_like(masks), loss_masks=torch.ones_like(masks))
        return super().forward_loss(batch, teacher_temp)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(student EMA, student) parameter lists."""
        pairs = [(e, s) for e, s in zip(self.student_ema.parameters(), self.student.parameters()) if s.requires_grad]
        return [e for e, _ in pairs], [s for _, s in pairs]


def build_distill_model(cfg: TrainConfig) -> DistillMetaArch:
    """The distillation model of a config with `distill.teacher` set (student = the `model` settings)."""
    from train.loop import _build_ssl

    teacher = build_frozen_teacher(cfg.distill.teacher, cfg)
    if teacher["backbone"].patch_size != cfg.model.patch_size:
        raise ValueError(f"teacher patch size {teacher['backbone'].patch_size} != model.patch_size "
                         f"{cfg.model.patch_size}: the iBOT loss pairs teacher and student patches")
    model = _build_ssl(cfg, DistillMetaArch, teacher=teacher)
    if cfg.init_weights:
        from train.export import load_into_backbone

        load_into_backbone(model.student["backbone"], cfg.init_weights)
        model.student_ema.load_state_dict(model.student.state_dict())
    return model
