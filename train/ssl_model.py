"""Student/teacher meta-architecture: forward pass of all crops, the three losses, the EMA update."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from train import dist
from train.heads import DINOHead
from train.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from train.models import build_backbone


class SSLMetaArch(nn.Module):
    """DINOv2 = DINO (CLS, all crops) + iBOT (masked patches, global crops) + KoLeo, with an EMA teacher.

    The teacher is a frozen copy (requires_grad=False) of the student updated only by `update_teacher`.
    """

    def __init__(self, arch: dict[str, Any], prototypes: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, ibot_separate_head: bool = False,
                 ibot_prototypes: int = 65536, ibot_bottleneck_dim: int = 256, centering: str = "sinkhorn_knopp", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3, student_temp: float = 0.1, dino_weight: float = 1.0,
                 ibot_weight: float = 1.0, koleo_weight: float = 0.1) -> None:
        super().__init__()
        self.arch = dict(arch)
        backbone = build_backbone(self.arch)
        dim = backbone.embed_dim
        student = nn.ModuleDict({
            "backbone": backbone,
            "dino_head": DINOHead(dim, prototypes, hidden_dim, bottleneck_dim, nlayers),
        })
        if ibot_separate_head:
            student["ibot_head"] = DINOHead(dim, ibot_prototypes, hidden_dim, ibot_bottleneck_dim, nlayers)
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.ibot_key = "ibot_head" if ibot_separate_head else "dino_head"
        self.dino_loss = DINOLoss(prototypes, center_momentum)
        self.ibot_loss = IBOTPatchLoss(ibot_prototypes if ibot_separate_head else prototypes, center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.student_temp = student_temp
        self.weights = {"dino": dino_weight, "ibot": ibot_weight, "koleo": koleo_weight}

    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Set the student's mode; the teacher always stays in eval mode (no stochastic depth)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _targets(self, loss: DINOLoss | IBOTPatchLoss, logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp(logits, temp, self.sinkhorn_iterations)
        probs = loss.softmax_center(logits, temp)
        loss.update_center(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor,
                        teacher_temp: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher target distributions: per global view [B, K] list, and [M, K] for masked patches."""
        out = self.teacher["backbone"](global_crops)
        n_views = 2
        cls_logits = self.teacher["dino_head"](out["cls"])
        cls_probs = self._targets(self.dino_loss, cls_logits, teacher_temp).chunk(n_views)
        patch_logits = self.teacher[self.ibot_key](out["patch"][masks])
        # Every rank must join the cross-rank reductions of the targets, even with no masked patch here.
        has_masks = masks.any() or dist.world_size() > 1
        patch_probs = self._targets(self.ibot_loss, patch_logits, teacher_temp) if has_masks else patch_logits
        return list(cls_probs), patch_probs

    def forward_loss(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Total weighted loss of a batch and the float value of each term."""
        g = batch["global"]
        masks = batch["masks"].to(device=g.device, dtype=torch.bool)
        loss_masks = batch.get("loss_masks", masks)  # patches iBOT scores (distillation: all, unmasked)
        teacher_cls, teacher_patch = self.teacher_targets(g, loss_masks, teacher_temp)
        runner = self.__dict__.get("student_runner") or StudentRunner(self.student, self.ibot_key)
        cls_g, cls_logits, patch_logits = runner(g, masks, batch.get("local"), loss_masks)
        n_views = cls_logits.shape[0] // (g.shape[0] // 2)
        student_views = list(cls_logits.chunk(n_views))
        dino = self.dino_loss(student_views, teacher_cls, self.student_temp)

        terms = {"dino": dino}
        if loss_masks.any():
            terms["ibot"] = self.ibot_loss(patch_logits, teacher_patch, loss_masks, self.student_temp)
        else:  # keeps the iBOT head in the graph (DDP expects every parameter to get a gradient)
            terms["ibot"] = patch_logits.float().sum() * 0.0
        terms["koleo"] = sum(self.koleo_loss(c) for c in cls_g.chunk(2))
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def set_student_runner(self, runner: nn.Module | None) -> None:
        """Route the student forward through `runner` (a DDP/FSDP-wrapped StudentRunner), unregistered."""
        self.__dict__["student_runner"] = runner

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) parameter lists updated by EMA (all student parameters, weight-norm g included)."""
        t_params, s_params = [], []
        for (name, s), (tname, t) in zip(self.student.named_parameters(), self.teacher.named_parameters()):
            assert name == tname, (name, tname)
            if s.requires_grad:
                t_params.append(t)
                s_params.append(s)
        return t_params, s_params

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, with foreach kernels."""
        t_params, s_params = self.ema_pairs()
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [s.detach() for s in s_params], alpha=1.0 - momentum)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Prototype-layer parameters of the student heads (frozen at the start of training)."""
        params: list[nn.Parameter] = []
        for key in ("dino_head", "ibot_head"):
            if key in self.student:
                params.extend(self.student[key].last_layer_parameters())
        return params


class StudentRunner(nn.Module):
    """The whole student forward of a step as one module call, so DDP/FSDP can wrap it.

    Returns (global-crop CLS tokens, DINO-head logits of all crops, iBOT-head logits of masked patches).
    """

    def __init__(self, student: nn.ModuleDict, ibot_key: str = "dino_head") -> None:
        super().__init__()
        self.student = student
        self.ibot_key = ibot_key

    def forward(self, g: torch.Tensor, masks: torch.Tensor, local: torch.Tensor | None = None,
                loss_masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student pass over global crops (with iBOT masks) and local crops; iBOT logits of the
        `loss_masks` patches (default: the masked ones)."""
        out_g = self.student["backbone"](g, masks=masks)
        cls_all = [out_g["cls"]]
        if local is not None and local.numel():
            cls_all.append(self.student["backbone"](local)["cls"])
        cls_logits = self.student["dino_head"](torch.cat(cls_all))
        patch_logits = self.student[self.ibot_key](out_g["patch"][masks if loss_masks is None else loss_masks])
        return out_g["cls"], cls_logits, patch_logits
