"""Loss checks against direct computations on small tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, TeacherTargets


def _sinkhorn_reference(logits: torch.Tensor, temp: float, iters: int) -> torch.Tensor:
    q = torch.exp(logits.double() / temp)  # [B, K]
    b, k = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=0, keepdim=True) / k  # each prototype mass 1/K
        q = q / q.sum(dim=1, keepdim=True) / b  # each sample mass 1/B
    return (q * b).float()


def test_sinkhorn_matches_reference_and_marginals():
    torch.manual_seed(0)
    logits = torch.randn(16, 8)
    t = TeacherTargets(8)
    q = t.sinkhorn_knopp(logits, temp=1.0, n_iterations=3)
    assert torch.allclose(q, _sinkhorn_reference(logits, 1.0, 3), atol=1e-6)
    # last normalisation is per sample: every row is a distribution
    assert torch.allclose(q.sum(dim=1), torch.ones(16), atol=1e-6)
    # prototypes end up (nearly) equipartitioned: each gets B/K = 2 samples' worth of mass
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 2.0), atol=0.05)
    q1 = t.sinkhorn_knopp(logits, temp=1.0, n_iterations=1)
    assert (q1.sum(0) - 2).abs().max() > 0.3  # one iteration is visibly not balanced yet
    q10 = t.sinkhorn_knopp(logits, temp=1.0, n_iterations=10)
    assert torch.allclose(q10.sum(dim=0), torch.full((8,), 2.0), atol=1e-5)


def test_sinkhorn_no_overflow_with_large_logits():
    logits = torch.tensor([[10.0, 7.0], [9.0, 8.0], [8.0, 8.0]])  # exp(10 / 0.04) overflows float32
    q = TeacherTargets(2).sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(3), atol=1e-5)


def test_centering_update_arithmetic():
    t = TeacherTargets(4, center_momentum=0.9)
    t.center.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]])
    probs = t.softmax_center(logits, temp=0.5)
    expected = F.softmax((logits - torch.tensor([[1.0, 2.0, 3.0, 4.0]])) / 0.5, dim=-1)
    assert torch.allclose(probs, expected)
    t.update_center(logits)
    assert torch.allclose(t.center, 0.9 * torch.tensor([[1.0, 2.0, 3.0, 4.0]]) + 0.1 * logits.mean(0, keepdim=True))


def test_dino_loss_skips_same_view_pairs():
    torch.manual_seed(1)
    student = [torch.randn(3, 5) for _ in range(4)]  # 2 global + 2 local
    teacher = [F.softmax(torch.randn(3, 5), -1) for _ in range(2)]
    loss = DINOLoss(5)(student, teacher, student_temp=0.1)
    terms = []
    for v, s in enumerate(student):
        for i, t in enumerate(teacher):
            if i != v:
                terms.append(-(t * F.log_softmax(s / 0.1, -1)).sum(-1).mean())
    assert len(terms) == 2 * 4 - 2
    assert torch.allclose(loss, torch.stack(terms).mean())


def test_ibot_per_image_weighting():
    torch.manual_seed(2)
    masks = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    m = int(masks.sum())
    s = torch.randn(m, 6)
    t = F.softmax(torch.randn(m, 6), -1)
    loss = IBOTPatchLoss(6)(s, t, masks, student_temp=0.1)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    # image 0 has patch 0; image 1 has patches 1..3; image 2 is unmasked but still counts in the
    # denominator: the official loss divides by all global crops of the batch (3), not the masked ones
    expected = (ce[0] + ce[1:4].mean()) / 3
    assert torch.allclose(loss, expected)
    uniform = ce.mean()
    assert not torch.allclose(loss, uniform)


def test_koleo_known_points():
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    loss = KoLeoLoss()(pts * 3.0)  # normalised internally
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-5)
    two = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert KoLeoLoss()(two).item() == pytest.approx(-math.log(math.sqrt(0.4 ** 2 + 0.8 ** 2)), abs=1e-5)


def test_koleo_duplicates_finite_loss_and_grad():
    x = torch.randn(1, 8).repeat(4, 1).requires_grad_(True)
    loss = KoLeoLoss()(x.to(torch.bfloat16))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert loss.dtype == torch.float32
