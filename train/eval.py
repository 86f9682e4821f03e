"""Frozen-feature evaluation: weighted k-NN and the official linear protocol (train/linear.py)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from train.data import IMAGE_EXTS, decode_image
from train.models import BackboneEmbedder, build_backbone, load_backbone


def labelled_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Image paths, integer labels and class names of `root/<class>/<img>` (sorted, recursive per class)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for ci, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for n in sorted(names):
                if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    paths.append(os.path.join(dirpath, n))
                    labels.append(ci)
    if not paths:
        raise FileNotFoundError(f"no labelled images under {root!r}")
    return paths, np.asarray(labels, dtype=np.int64), classes


def load_eval_model(path: str) -> BackboneEmbedder:
    """Teacher backbone from a `teacher_backbone.pt`, a training checkpoint, or an output dir."""
    if os.path.isdir(path):
        path = os.path.join(path, "teacher_backbone.pt")
    from train.checkpoint import safe_load

    payload = safe_load(path)
    if isinstance(payload, dict) and "model" in payload and "arch" in payload:
        arch = dict(payload["arch"], drop_path_rate=0.0)
        backbone = build_backbone(arch)
        prefix = "teacher.backbone."
        backbone.load_state_dict({k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)})
        from train.models import IMAGENET_MEAN, IMAGENET_STD

        size = int(payload.get("eval_size", arch["img_size"]))
        return BackboneEmbedder(backbone, size, IMAGENET_MEAN, IMAGENET_STD).eval()
    return load_backbone(path)


def preprocess(img, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the short side to image_size * 256/224, center-crop image_size, normalise."""
    from PIL import Image

    short = int(round(image_size * 256 / 224))
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def extract_features(model: BackboneEmbedder, paths: Sequence[str], batch_size: int = 128,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised CLS features [N, D] of the given image files."""
    model = model.to(device).eval()
    feats = []
    for i in range(0, len(paths), batch_size):
        batch = []
        for p in paths[i:i + batch_size]:
            with open(p, "rb") as f:
                batch.append(preprocess(decode_image(f.read()), model.image_size, model.mean, model.std))
        feats.append(model(torch.stack(batch).to(device)).float().cpu())
    return F.normalize(torch.cat(feats), dim=1)


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, float]:
    """Top-1 accuracy of softmax-weighted k-NN votes (weight exp(sim / T)) for each k (clipped to n_train)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    ks_eff = sorted({min(int(k), train_f.shape[0]) for k in ks})
    correct = {k: 0 for k in ks_eff}
    for i in range(0, test_f.shape[0], chunk):
        sims = test_f[i:i + chunk] @ train_f.t()
        top_sim, top_idx = sims.topk(ks_eff[-1], dim=1)
        top_lab = train_y[top_idx]
        weights = torch.exp(top_sim / temperature)
        for k in ks_eff:
            votes = torch.zeros(sims.shape[0], n_classes)
            votes.scatter_add_(1, top_lab[:, :k], weights[:, :k])
            correct[k] += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return {k: correct[k] / test_f.shape[0] for k in ks_eff}


def _decode_all(paths: Sequence[str]) -> list:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(decode_image(f.read()))
    return out


def evaluate(checkpoint: str, train_dir: str, test_dir: str, ks: Sequence[int] = (10, 20, 100, 200),
             temperature: float = 0.07, batch_size: int = 128, device: str = "cpu",
             probe_steps: int = 1000, image_size: int | None = None, probe_n_aug: int = 4,
             probe_lrs: Sequence[float] | None = None) -> dict[str, Any]:
    """k-NN and official-protocol linear accuracies of a checkpoint's teacher on labelled train/test folders.

    Images are evaluated at `image_size`, else the checkpoint's eval size (224 for the ViT recipes),
    whatever resolution training ended at.
    """
    from train.linear import OFFICIAL_LRS, linear_eval

    model = load_eval_model(checkpoint)
    if image_size:
        if image_size % model.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {model.patch_size}")
        model.image_size = int(image_size)
    tr_paths, tr_y, classes = labelled_folder(train_dir)
    te_paths, te_y, te_classes = labelled_folder(test_dir)
    if te_classes != classes:
        raise ValueError("train and test folders have different class subfolders")
    tr_f = extract_features(model, tr_paths, batch_size, device)
    te_f = extract_features(model, te_paths, batch_size, device)
    tr_t, te_t = torch.from_numpy(tr_y), torch.from_numpy(te_y)
    knn = knn_accuracy(tr_f, tr_t, te_f, te_t, ks, temperature)
    probe = linear_eval(model, _decode_all(tr_paths), tr_y, _decode_all(te_paths), te_y,
                        lrs=tuple(probe_lrs or OFFICIAL_LRS), steps=probe_steps, n_aug=probe_n_aug, device=device)
    return {"knn": {str(k): v for k, v in knn.items()}, "linear": probe, "n_train": len(tr_paths),
            "n_test": len(te_paths), "classes": len(classes), "image_size": model.image_size}
