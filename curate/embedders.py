"""Embedder factory: a model spec string -> (model, its own preprocessing, output dimension).

Specs:
  pixels[:<side>]                        no weights: downsampled, centred pixels (a baseline)
  colorhist[:<bins>]                     no weights: joint RGB histogram (palette), Hellinger
  timm:<name>[:<weights file>]           any timm model (e.g. vit_large_patch14_dinov2.lvd142m)
  open_clip:<arch>[:<pretrained tag or weights file>]
  torchscript:<file>[:<side>]            e.g. an SSCD copy-detection descriptor
  checkpoint:<file>                      a teacher backbone saved by our trainer (train/); the
                                         adapter is registered by pipelines/ (curate/ never imports train/)
Without a weights file, timm and open_clip use their normal download, which needs internet.
Other kinds can be added with `register_kind`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Embedder:
    """A ready model: `transform` maps a PIL RGB image to a tensor, `model` maps a batch to [B, dim]."""

    spec: str
    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    dim: int


class CentredPixels(nn.Module):
    """Flattened pixels minus their per-image mean: a no-weights embedding for tiny images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).float()
        return flat - flat.mean(dim=1, keepdim=True)


class ColourHistogram(nn.Module):
    """Joint RGB histogram with `bins` levels per channel, square-rooted (Hellinger): a no-weights
    descriptor of an image's palette, for demos and pools whose concepts differ by colour."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x.clamp(0, 1) * (self.bins - 1e-6)).long()  # [B, 3, H, W] -> level per channel
        idx = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]
        hist = torch.zeros(x.shape[0], self.bins ** 3, device=x.device)
        hist.scatter_add_(1, idx.flatten(1), torch.ones_like(idx.flatten(1), dtype=hist.dtype))
        return (hist / idx[0].numel()).sqrt()


class _EncodeImage(nn.Module):
    """open_clip models embed images through encode_image."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


def slug(spec: str) -> str:
    """A directory-safe name for a spec (the default embedding name)."""
    head = spec.split(":")[0]
    rest = [Path(p).stem if ("/" in p or p.endswith((".pt", ".pth", ".bin", ".safetensors"))) else p
            for p in spec.split(":")[1:]]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join([head, *rest])).strip("-").lower()


def _eval_transform(size: int, mean, std, resize: int | None = None, interpolation: str = "bicubic"):
    from torchvision import transforms as T

    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(resize or size, interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean, std)])


def _pixels(arg: str | None) -> tuple[nn.Module, Callable]:
    from torchvision import transforms as T

    side = int(arg) if arg else 16
    return CentredPixels(), T.Compose([T.Resize((side, side), interpolation=T.InterpolationMode.BICUBIC,
                                                antialias=True), T.ToTensor()])


def _colourhist(arg: str | None) -> tuple[nn.Module, Callable]:
    from torchvision import transforms as T

    return ColourHistogram(int(arg) if arg else 8), T.Compose([T.Resize((64, 64), antialias=True), T.ToTensor()])


def _timm(name: str, weights: str | None) -> tuple[nn.Module, Callable]:
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=weights is None, num_classes=0)
    if weights:
        state = _load_state(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit timm model {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    cfg = resolve_data_config({}, model=model)
    return model, create_transform(**cfg, is_training=False)


def _open_clip(arch: str, pretrained: str | None) -> tuple[nn.Module, Callable]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    return _EncodeImage(model), preprocess


def _torchscript(path: str, side: str | None) -> tuple[nn.Module, Callable]:
    model = torch.jit.load(path, map_location="cpu")
    size = int(side) if side else 224
    from torchvision import transforms as T

    return model, T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                             T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size: int, mean, std) -> Callable:
    """The usual evaluation preprocessing: resize the short side to size * 256 / 224, centre crop."""
    return _eval_transform(size, mean, std, resize=round(size * 256 / 224))


# kind -> factory(args) -> (model, transform); filled by register_kind (e.g. `checkpoint` from pipelines/)
_EXTRA_KINDS: dict[str, tuple[Callable[[list[str]], tuple[nn.Module, Callable]], str]] = {}


def register_kind(kind: str, factory: Callable[[list[str]], tuple[nn.Module, Callable]], usage: str) -> None:
    """Add a spec kind: `factory(args)` returns (model, transform); `usage` is shown when args are missing."""
    _EXTRA_KINDS[kind] = (factory, usage)


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def split_spec(spec: str) -> tuple[str, list[str]]:
    """`kind:arg1:arg2` -> (kind, [args]); a weights path may itself hold no colon."""
    kind, _, rest = spec.partition(":")
    return kind, [a for a in rest.split(":") if a] if rest else []


def load_embedder(spec: str, device: str | torch.device = "cpu") -> Embedder:
    """Build the model named by `spec` with its own preprocessing, in eval mode on `device`."""
    kind, args = split_spec(spec)
    if kind == "pixels":
        model, transform = _pixels(args[0] if args else None)
    elif kind == "colorhist":
        model, transform = _colourhist(args[0] if args else None)
    elif kind == "timm":
        if not args:
            raise ValueError("timm spec needs a model name: timm:<name>[:<weights file>]")
        model, transform = _timm(args[0], args[1] if len(args) > 1 else None)
    elif kind == "open_clip":
        if not args:
            raise ValueError("open_clip spec needs an arch: open_clip:<arch>[:<pretrained tag or file>]")
        model, transform = _open_clip(args[0], args[1] if len(args) > 1 else None)
    elif kind == "torchscript":
        if not args:
            raise ValueError("torchscript spec needs a file: torchscript:<file>[:<side>]")
        model, transform = _torchscript(args[0], args[1] if len(args) > 1 else None)
    elif kind in _EXTRA_KINDS:
        factory, usage = _EXTRA_KINDS[kind]
        if not args:
            raise ValueError(f"{kind} spec needs arguments: {usage}")
        model, transform = factory(args)
    else:
        known = ", ".join(["pixels", "colorhist", "timm", "open_clip", "torchscript", *_EXTRA_KINDS])
        raise ValueError(f"unknown model spec {spec!r}: use {known}")
    model = model.eval().to(device)
    probe = transform(Image.new("RGB", (64, 48), (128, 64, 32))).unsqueeze(0).to(device)
    with torch.inference_mode():
        dim = int(model(probe).shape[-1])
    return Embedder(spec=spec, model=model, transform=transform, dim=dim)
