"""What the teacher targets of a training run look like (the issue-17 diagnosis of near-uniform targets).

Loads RUN_DIR/last.pt with its config.yaml, passes one batch (iteration 5 of the run's data stream)
through the teacher and prints: the prototype magnitudes g, the mean pairwise cosine of the
global-crop CLS tokens and of the head's bottleneck outputs, the per-image spread of the prototype
logits, and the entropy of the Sinkhorn-Knopp and softmax targets at a few teacher temperatures
against ln K.
Usage: PYTHONPATH=. python bench/ssl_diag.py RUN_DIR   (e.g. a bench/ssl_fashion.py run-<seed>-<tag>)
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def mean_offdiag_cos(x: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of L2-normalised x."""
    n = x.shape[0]
    s = x @ x.t()
    return float((s.sum() - s.diag().sum()) / (n * n - n))


def entropy(p: torch.Tensor) -> float:
    """Mean row entropy (nats)."""
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


@torch.no_grad()
def main() -> None:
    from train.checkpoint import load_checkpoint
    from train.config import load_config
    from train.loop import build_batches, build_model

    torch.set_num_threads(1)
    run = sys.argv[1]
    cfg = load_config(os.path.join(run, "config.yaml"), [])
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(os.path.join(run, "last.pt"))["model"])
    for name, p in model.teacher.named_parameters():
        if name.endswith("original0"):
            print(f"{name}: g mean {float(p.mean()):.3f} min {float(p.min()):.3f} max {float(p.max()):.3f}")
    batch = build_batches(cfg)(5)
    cls = model.teacher["backbone"](batch["global"])["cls"]
    head = model.teacher["dino_head"]
    z = F.normalize(head.mlp(cls), dim=-1)
    print(f"mean cosine: CLS {mean_offdiag_cos(F.normalize(cls, dim=-1)):.3f}, bottleneck {mean_offdiag_cos(z):.3f}")
    logits = head(cls)
    spread = (logits.max(1).values - logits.min(1).values).mean()
    print(f"logits per image: std {float(logits.std(1).mean()):.3f}, range {float(spread):.3f}")
    ln_k = math.log(logits.shape[1])
    for temp in (0.04, 0.02, 0.01):
        sk = model.dino_loss.sinkhorn_knopp(logits, temp, cfg.loss.sinkhorn_iterations)
        print(f"T {temp}: Sinkhorn-Knopp entropy {entropy(sk):.3f}, softmax entropy "
              f"{entropy(torch.softmax(logits / temp, 1)):.3f}, ln K {ln_k:.3f}")


if __name__ == "__main__":
    main()
