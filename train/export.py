"""Export the teacher backbone as a timm or official-DINOv2 (torch hub) state dict, and import either.

Our backbone wraps a timm VisionTransformer under `vit.`, so the timm layout is our keys without
the prefix (and without the iBOT mask token). The official layout (facebookresearch/dinov2
`DinoVisionTransformer`, hub names `dinov2_vits14`, `dinov2_vits14_reg`, ...) differs in three
places: `register_tokens` for timm's `reg_token`; with registers the position embedding keeps a
class slot (timm's no_embed_class model folds it into `cls_token`; we export it as zero); and the
ViT-g SwiGLU is `mlp.w12` / `mlp.w3` for timm's packed `mlp.fc1` / `mlp.fc2`. Both exports put the
position embedding on the 37 x 37 grid of the 518 px models (resampled when trained at another size).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from torch import nn

TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
HUB_SIZES = {384: "s", 768: "b", 1024: "l", 1536: "g"}
EXPORT_IMG_SIZE = 518


def timm_name(arch: dict[str, Any]) -> str:
    """timm model name for a backbone arch, e.g. vit_small_patch14_reg4_dinov2."""
    size = TIMM_SIZES.get(int(arch["embed_dim"]))
    if size is None:
        raise ValueError(f"embed_dim {arch['embed_dim']} has no timm DINOv2 model (dims {sorted(TIMM_SIZES)})")
    reg = f"_reg{arch['reg_tokens']}" if arch.get("reg_tokens") else ""
    return f"vit_{size}_patch{arch['patch_size']}{reg}_dinov2"


def hub_name(arch: dict[str, Any]) -> str:
    """Official torch-hub entry point of the same architecture, e.g. dinov2_vits14_reg."""
    size = HUB_SIZES.get(int(arch["embed_dim"]), "?")
    return f"dinov2_vit{size}{arch['patch_size']}" + ("_reg" if arch.get("reg_tokens") else "")


def timm_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments to pass to timm.create_model(timm_name(arch), ...) for a non-standard depth."""
    standard = {384: 12, 768: 12, 1024: 24, 1536: 40}
    return {} if standard.get(int(arch["embed_dim"])) == int(arch["depth"]) else {"depth": int(arch["depth"])}


def _resample_pos(pos: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """A [1, prefix + g*g, D] position embedding resampled to a grid x grid one, as our backbone
    resamples it at run time (`resample_pos_grid`), so an export at another size embeds alike."""
    old = int(round(math.sqrt(pos.shape[1] - prefix)))
    if old == grid:
        return pos
    from train.models import resample_pos_grid

    patch = resample_pos_grid(pos[:, prefix:], (old, old), (grid, grid))
    return torch.cat([pos[:, :prefix], patch], dim=1)


def to_timm(sd: dict[str, torch.Tensor], arch: dict[str, Any], img_size: int = EXPORT_IMG_SIZE) -> dict[str, torch.Tensor]:
    """Our backbone state dict -> timm VisionTransformer state dict (position grid for img_size)."""
    out = {k[len("vit."):]: v.detach().float().cpu().clone() for k, v in sd.items() if k.startswith("vit.")}
    prefix = 0 if arch.get("reg_tokens") else 1
    out["pos_embed"] = _resample_pos(out["pos_embed"], img_size // int(arch["patch_size"]), prefix)
    return out


def timm_to_hub(sd: dict[str, torch.Tensor], mask_token: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """timm layout -> official DINOv2 layout (the inverse of timm's own dinov2 conversion)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.w12.", k) if _is_swiglu(sd) else k
        k = re.sub(r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3.", k) if _is_swiglu(sd) else k
        out[k] = v
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = (mask_token.detach().float().cpu().reshape(1, dim).clone() if mask_token is not None
                         else torch.zeros(1, dim))
    return out


def hub_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 layout -> timm layout (mask token dropped; class position folded into cls_token)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out: dict[str, torch.Tensor] = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))] = v
    return out


def _is_swiglu(sd: dict[str, torch.Tensor]) -> bool:
    w = sd.get("blocks.0.mlp.fc1.weight")
    return w is not None and w.shape[0] != 4 * w.shape[1]


def infer_arch(timm_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Backbone arch of a timm-layout DINOv2 state dict (heads = dim / 64, as every DINOv2 model)."""
    from train.models import resolve_arch

    w = timm_sd["patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in timm_sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    reg = int(timm_sd["reg_token"].shape[1]) if "reg_token" in timm_sd else 0
    n_pos = timm_sd["pos_embed"].shape[1] - (0 if reg else 1)
    swiglu = _is_swiglu(timm_sd)
    return resolve_arch("vit_small", patch, int(round(math.sqrt(n_pos))) * patch, reg, 1e-5, 0.0, embed_dim=dim,
                        depth=depth, num_heads=max(dim // 64, 1), mlp_ratio=4.0, ffn="swiglu" if swiglu else "mlp")


def read_backbone(path: str, obj: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None,
                                                      torch.Tensor | None]:
    """(timm-layout state dict, our arch if the file says, mask token) of any supported file:
    our teacher_backbone.pt, our training checkpoint (teacher), a timm or an official DINOv2 state dict.
    `obj` is the file's content when the caller has already loaded it."""
    from train.checkpoint import safe_load
    from train.models import BACKBONE_FORMAT

    obj = safe_load(path) if obj is None else obj
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    if obj.get("format") == BACKBONE_FORMAT:
        sd, arch = obj["state_dict"], obj["arch"]
    elif "model" in obj and "iteration" in obj:
        prefix = "student_ema.backbone." if any(k.startswith("student_ema.") for k in obj["model"]) else "teacher.backbone."
        sd = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        arch = obj.get("export_arch") or obj["arch"]
    else:
        flat = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "patch_embed.proj.weight" not in flat:
            raise ValueError(f"{path}: neither our backbone/checkpoint nor a timm / DINOv2 ViT state dict")
        mask = flat.get("mask_token")
        is_hub = "mask_token" in flat or "register_tokens" in flat or any(".mlp.w12." in k for k in flat)
        return (hub_to_timm(flat) if is_hub else flat), None, mask
    timm_sd = {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
    return timm_sd, dict(arch), sd.get("mask_token")


def load_into_backbone(backbone: nn.Module, path: str, obj: Any = None) -> None:
    """Load any supported file into one of our backbones (strict keys; position grid resampled)."""
    timm_sd, _, mask = read_backbone(path, obj)
    sd = dict(timm_sd)
    target = backbone.vit.pos_embed
    prefix = 0 if backbone.num_reg_tokens else 1
    grid = int(round(math.sqrt(target.shape[1] - prefix)))
    sd["pos_embed"] = _resample_pos(sd["pos_embed"], grid, prefix)
    full = {f"vit.{k}": v for k, v in sd.items()}
    full["mask_token"] = mask.reshape(backbone.mask_token.shape) if mask is not None else backbone.mask_token.detach()
    backbone.load_state_dict(full, strict=True)


def init_backbones(model: nn.Module, path: str) -> None:
    """`init_weights`: start student and teacher backbones of an SSL model from a file."""
    load_into_backbone(model.student["backbone"], path)
    model.teacher["backbone"].load_state_dict(model.student["backbone"].state_dict())


def export(path: str, fmt: str, out: str) -> dict[str, Any]:
    """Write the teacher backbone of a checkpoint / teacher_backbone.pt as fmt 'timm' or 'dinov2'.

    The timm file is checked against the timm model's own keys and shapes before it is written.
    Returns what to call to load it.
    """
    timm_sd, arch, mask = read_backbone(path)
    arch = arch or infer_arch(timm_sd)
    ours = {f"vit.{k}": v for k, v in timm_sd.items()}
    sd = to_timm(ours, arch)
    name, kwargs = timm_name(arch), timm_kwargs(arch)
    _check_timm_keys(sd, name, kwargs)
    if fmt == "dinov2":
        sd = timm_to_hub(sd, mask)
    elif fmt != "timm":
        raise ValueError(f"format must be timm or dinov2, got {fmt!r}")
    tmp = f"{out}.tmp.{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, out)
    call = (f"timm.create_model({name!r}, pretrained=False, checkpoint_path={out!r}"
            + "".join(f", {k}={v}" for k, v in kwargs.items()) + ")") if fmt == "timm" else \
        f"torch.hub.load('facebookresearch/dinov2', {hub_name(arch)!r}, pretrained=False).load_state_dict(torch.load({out!r}))"
    return {"out": out, "format": fmt, "timm_model": name, "timm_kwargs": kwargs, "hub_model": hub_name(arch),
            "load": call, "keys": len(sd)}


def _check_timm_keys(sd: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any]) -> None:
    """Raise unless `sd` has exactly the keys and shapes of timm's `name` model."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    bad = [k for k in ref if k in sd and tuple(ref[k].shape) != tuple(sd[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"export does not match timm {name}: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"shape mismatch {bad[:3]}")
