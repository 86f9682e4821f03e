"""The total loss of one fixed batch equals a small reference written from the official formulas.

Reference (facebookresearch/dinov2 `train/ssl_meta_arch.py` forward_backward and `loss/*.py`), with
n_g = 2 global and n_l local crops per image, B images, D = n_g (n_g - 1) + n_g n_l loss terms:
- DINO: teacher targets of the two global views, swapped (view A's target for student view B);
  local crops: sum over local views and both targets of the batch-mean cross-entropy, / D;
  global crops: batch-mean CE of the student globals against the swapped targets, x 2 / D.
- iBOT: CE of each masked patch weighted 1 / n_masked(image), summed, / (n_g B) (all global crops),
  x 2 x 1/2 (loss_scales x ibot_loss_scale).
- KoLeo: 0.1 x sum over the two global views of -mean log(|x - x_nn + eps|_2 + eps) on the
  L2-normalised student CLS tokens of the (masked) global crops.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.loop import build_model

B, N_LOCAL, STUDENT_T, TEACHER_T = 4, 3, 0.1, 0.05


def _fixed_batch(size: int = 24, local: int = 12, patch: int = 4) -> dict:
    g = torch.Generator().manual_seed(123)
    masks = torch.zeros(2 * B, (size // patch) ** 2, dtype=torch.bool)
    masks[0, :6] = True  # 6 patches
    masks[3, 10:14] = True  # 4 patches
    masks[5, [1, 7, 20]] = True  # 3 patches; the other 5 global crops are unmasked
    return {"iteration": 0, "global": torch.randn(2 * B, 3, size, size, generator=g),
            "local": torch.randn(N_LOCAL * B, 3, local, local, generator=g), "masks": masks}


def _ce(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy -sum t log softmax(s / student_temp)."""
    return -(t * F.log_softmax(s / STUDENT_T, dim=-1)).sum(-1)


def _sinkhorn(t: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    q = torch.exp(t.double() / temp).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t().float()


def _koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nn_idx = dots.argmax(dim=1)
    return -torch.log(torch.nn.PairwiseDistance(2, eps=eps)(x, x[nn_idx]) + eps).mean()


def _reference_total(model, batch: dict, centering: str) -> dict[str, torch.Tensor]:
    g, loc, masks = batch["global"], batch["local"], batch["masks"]
    with torch.no_grad():
        t_out = model.teacher["backbone"](g)
        t_cls = torch.cat(t_out["cls"].chunk(2)[::-1])  # swapped: A's target goes to student B
        t_cls_logits = model.teacher["dino_head"](t_cls)
        t_patch_logits = model.teacher["dino_head"](t_out["patch"][masks])
        if centering == "centering":
            t_cls_p = F.softmax((t_cls_logits - model.dino_loss.center) / TEACHER_T, dim=-1)
            t_patch_p = F.softmax((t_patch_logits - model.ibot_loss.center) / TEACHER_T, dim=-1)
        else:
            t_cls_p = _sinkhorn(t_cls_logits, TEACHER_T)
            t_patch_p = _sinkhorn(t_patch_logits, TEACHER_T)
    s_g = model.student["backbone"](g, masks=masks)
    s_l = model.student["backbone"](loc)
    s_g_logits = model.student["dino_head"](s_g["cls"])
    s_l_logits = model.student["dino_head"](s_l["cls"])
    n_terms = 2 * 1 + 2 * N_LOCAL
    dino_local = sum(_ce(t, s).mean() for s in s_l_logits.chunk(N_LOCAL) for t in t_cls_p.chunk(2)) / n_terms
    dino_global = _ce(t_cls_p, s_g_logits).mean() * 2 / n_terms
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    s_patch_logits = model.student["dino_head"](s_g["patch"][masks])
    ibot = (_ce(t_patch_p, s_patch_logits) * weights).sum() / masks.shape[0] * 2 * 0.5
    koleo = 0.1 * sum(_koleo(c) for c in s_g["cls"].chunk(2))
    return {"dino": dino_local + dino_global, "ibot": ibot, "koleo": koleo,
            "total": dino_local + dino_global + ibot + koleo}


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_total_loss_matches_official_formulas(tiny_cfg, centering):
    torch.manual_seed(0)
    cfg = tiny_cfg("ref", "model.drop_path_rate=0.0", f"loss.centering={centering}", "crops.n_local=3")
    model = build_model(cfg).train()
    with torch.no_grad():  # a teacher that differs from the student, and a non-zero center
        for p in model.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.dino_loss.center.copy_(0.1 * torch.randn_like(model.dino_loss.center))
        model.ibot_loss.center.copy_(0.1 * torch.randn_like(model.ibot_loss.center))
    batch = _fixed_batch()
    ref = {k: float(v.detach()) for k, v in _reference_total(model, batch, centering).items()}
    total, terms = model.forward_loss(batch, teacher_temp=TEACHER_T)
    assert terms["dino"] == pytest.approx(ref["dino"], rel=1e-5)
    assert terms["ibot"] == pytest.approx(ref["ibot"], rel=1e-5)
    assert 0.1 * terms["koleo"] == pytest.approx(ref["koleo"], rel=1e-5)
    assert float(total.detach()) == pytest.approx(ref["total"], rel=1e-5)
