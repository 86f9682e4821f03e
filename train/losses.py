"""DINO, iBOT and KoLeo losses, with both teacher-target modes (EMA centering, Sinkhorn-Knopp)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train import dist


class TeacherTargets(nn.Module):
    """Turns teacher logits into target distributions, by EMA centering or Sinkhorn-Knopp.

    The EMA center is a buffer (so it is checkpointed); it is updated synchronously after the
    targets of an iteration were computed with the previous center.
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """softmax((t - center) / temp) over prototypes, in float32."""
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean over the (global) batch of teacher logits."""
        t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
        total = dist.all_reduce_sum_(t.sum(dim=0, keepdim=True))
        count = dist.all_reduce_sum_(torch.tensor(float(t.shape[0]), device=t.device))
        if float(count) == 0:
            return
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp(self, teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp targets: every prototype gets mass B/K, every sample sums to 1.

        Alternates prototype (row) and sample (column) normalisation of exp(t / temp); the last
        step is a sample normalisation, so samples sum exactly to 1 and prototypes approximately.
        """
        t = teacher_logits.float()
        # Subtracting the global max cancels in the normalisations and avoids exp overflow.
        gmax = (t.max() if t.numel() else t.new_tensor(float("-inf"))).reshape(1)  # a rank may hold no rows
        if dist.is_enabled():
            import torch.distributed as tdist

            tdist.all_reduce(gmax, op=tdist.ReduceOp.MAX)
        q = torch.exp((t - gmax) / temp).t()  # [K, B]
        n_samples = dist.all_reduce_sum_(torch.tensor(float(q.shape[1]), device=q.device))
        n_protos = q.shape[0]
        q /= dist.all_reduce_sum_(q.sum())
        for _ in range(n_iterations):
            q /= dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))
            q /= n_protos
            q /= q.sum(dim=0, keepdim=True)
            q /= n_samples
        q *= n_samples
        return q.t()


class DINOLoss(TeacherTargets):
    """Cross-entropy between teacher targets on global views and student predictions on all views."""

    def forward(self, student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                student_temp: float = 0.1) -> torch.Tensor:
        """Mean over (teacher view i, student view v != i) pairs of the batch-mean cross-entropy.

        Student view v and teacher view v are the same crop for v < len(teacher_probs).
        """
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        n_terms = 0
        for v, s in enumerate(student_logits):
            log_p = F.log_softmax(s.float() / student_temp, dim=-1)
            for i, t in enumerate(teacher_probs):
                if i == v:
                    continue
                total = total - (t * log_p).sum(dim=-1).mean()
                n_terms += 1
        return total / max(n_terms, 1)


class IBOTPatchLoss(TeacherTargets):
    """Masked-patch cross-entropy, each masked image weighted equally regardless of its number of masks.

    As the official code (`ibot_patch_loss.py` forward_masked, `ssl_meta_arch.py`): the per-image mean
    is summed over images and divided by the number of *all* global crops of the batch.
    """

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                student_temp: float = 0.1) -> torch.Tensor:
        """student_logits / teacher_probs: [M, K] for the M masked patches of `masks` ([B, N], row-major).

        Each masked patch of image b is weighted 1 / n_masked(b); the sum is divided by B, the number
        of global crops (masked or not), so unmasked crops count as zero-loss images.
        """
        masks = masks.to(torch.bool)
        n_per_image = masks.sum(dim=1)
        weights = (1.0 / n_per_image.clamp(min=1).float()).unsqueeze(1).expand_as(masks)[masks]
        ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
        return (ce * weights).sum() / masks.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser: -mean log(distance to nearest neighbour).

    Computed in float32 on L2-normalised rows; the distance is |x - y + eps|_2 as the official
    code's `nn.PairwiseDistance(2, eps=1e-8)`, so exact duplicates give a finite loss and gradients.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] features of one view; returns a scalar."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, eps=self.eps)
            with torch.no_grad():
                sims = x @ x.t()
                sims.fill_diagonal_(-2.0)
                nn_idx = sims.argmax(dim=1)
            d = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)
            return -torch.log(d + self.eps).mean()
