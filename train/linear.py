"""Linear evaluation following the official DINOv2 protocol (`dinov2/eval/linear.py`), scaled by settings.

One pass trains a grid of linear classifiers on frozen teacher features: inputs are the CLS tokens of
the last 1 or 4 blocks (concatenated), with or without the average-pooled patch tokens of the last
block; each with every learning rate of the grid (scaled by batch / 256). SGD (momentum 0.9, no
weight decay), cosine decay to 0, random-resized-crop + flip augmentation of the training images
(re-drawn `n_aug` times). The classifier with the best accuracy on a held-out part of the training
split is scored on the test split. Official scale: 10 epochs x 1250 iterations of batch 128 per GPU;
on CPU `steps`, `n_aug` and the image count are the settings that shrink it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS = (1, 4)


def linear_input(cls_blocks: torch.Tensor, patch_mean: torch.Tensor, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Classifier input as the official `create_linear_input`.

    cls_blocks [N, n_max, D] (oldest block first); patch_mean [N, D] of the last block.
    """
    out = cls_blocks[:, -n_blocks:].flatten(1)
    if avgpool:
        out = torch.cat([out, patch_mean], dim=1)
    return out.float()


@torch.no_grad()
def block_features(model, images: Sequence, n_blocks: int, transform, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """CLS tokens of the last `n_blocks` blocks [N, n, D] and mean patch token of the last [N, D]."""
    backbone = model.backbone.to(device).eval()
    n = min(n_blocks, backbone.depth)
    cls, pm = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform(img) for img in images[i:i + batch_size]]).to(device)
        outs = backbone.last_blocks(x, n)
        cls.append(torch.stack([o["cls"] for o in outs], dim=1).float().cpu())
        pm.append(outs[-1]["patch"].mean(dim=1).float().cpu())
    return torch.cat(cls), torch.cat(pm)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0)):
    """RandomResizedCrop (bicubic) + horizontal flip + normalisation, as the official linear training."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(0.5), transforms.ToTensor(), transforms.Normalize(mean, std)])


def train_classifiers(fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_classes: int,
                      lrs: Sequence[float] = OFFICIAL_LRS, steps: int = 1000, batch_size: int = 128,
                      seed: int = 0) -> dict[tuple[int, bool, float], torch.nn.Linear]:
    """Train every (n_blocks, avgpool, lr) classifier together on the same mini-batches.

    fit = (cls_blocks [M, n, D], patch_mean [M, D], labels [M]), M possibly several augmented copies.
    """
    cls, pm, y = fit
    g = torch.Generator().manual_seed(seed)
    n_max = cls.shape[1]
    heads: dict[tuple[int, bool, float], torch.nn.Linear] = {}
    groups = []
    for n in sorted({min(b, n_max) for b in N_LAST_BLOCKS}):
        for avgpool in (False, True):
            dim = linear_input(cls[:1], pm[:1], n, avgpool).shape[1]
            for lr in lrs:
                head = torch.nn.Linear(dim, n_classes)
                with torch.no_grad():
                    head.weight.normal_(0.0, 0.01, generator=g)
                    head.bias.zero_()
                heads[(n, avgpool, lr)] = head
                groups.append({"params": list(head.parameters()), "lr": lr * batch_size / 256.0})
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
    for _ in range(steps):
        idx = torch.randint(0, y.shape[0], (min(batch_size, y.shape[0]),), generator=g)
        inputs = {(n, a): linear_input(cls[idx], pm[idx], n, a) for n, a, _ in heads}
        loss = sum(F.cross_entropy(h(inputs[(n, a)]), y[idx]) for (n, a, _), h in heads.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return heads


@torch.no_grad()
def accuracy(head: torch.nn.Linear, key: tuple[int, bool, float], feats: tuple[torch.Tensor, torch.Tensor],
             y: torch.Tensor) -> float:
    """Top-1 accuracy of one classifier on (cls_blocks, patch_mean) features."""
    x = linear_input(feats[0], feats[1], key[0], key[1])
    return float((head(x).argmax(1) == y).float().mean())


def linear_eval(model, train_images: Sequence, train_y: np.ndarray, test_images: Sequence, test_y: np.ndarray,
                lrs: Sequence[float] = OFFICIAL_LRS, steps: int = 1000, batch_size: int = 128, n_aug: int = 4,
                val_fraction: float = 0.2, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Official-protocol linear evaluation of a BackboneEmbedder on PIL images; best on held-out, scored on test."""
    from train.eval import preprocess

    size, mean, std = model.image_size, model.mean, model.std
    ytr, yte = torch.as_tensor(np.asarray(train_y)), torch.as_tensor(np.asarray(test_y))
    n_classes = int(max(ytr.max(), yte.max())) + 1
    perm = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * len(train_images))))
    val_idx, fit_idx = perm[:n_val].tolist(), perm[n_val:].tolist()
    fit_imgs = [train_images[i] for i in fit_idx]
    n_max = max(N_LAST_BLOCKS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        aug = train_transform(size, mean, std)
        views = [block_features(model, fit_imgs, n_max, aug, device=device) for _ in range(max(1, n_aug))]
    fit = (torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views]), ytr[fit_idx].repeat(len(views)))
    plain = lambda img: preprocess(img, size, mean, std)  # noqa: E731
    val = block_features(model, [train_images[i] for i in val_idx], n_max, plain, device=device)
    test = block_features(model, test_images, n_max, plain, device=device)
    heads = train_classifiers(fit, n_classes, lrs, steps, batch_size, seed)
    scores = {k: accuracy(h, k, val, ytr[val_idx]) for k, h in heads.items()}
    best = max(scores, key=lambda k: (scores[k], -k[2]))
    return {"accuracy": accuracy(heads[best], best, test, yte), "val_accuracy": scores[best],
            "n_blocks": best[0], "avgpool": best[1], "lr": best[2], "steps": steps, "n_aug": n_aug,
            "grid": len(heads)}
