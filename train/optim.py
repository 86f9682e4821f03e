"""AdamW parameter groups: layer-wise lr decay, patch-embed lr multiplier, no decay on bias/norm/gamma."""
from __future__ import annotations

from torch import nn

_LOWEST = ("patch_embed", "pos_embed", "cls_token", "mask_token", "reg_token")


def layer_id(name: str, depth: int) -> int:
    """Backbone layer of a student parameter: 0 for embeddings/tokens, i+1 for block i, depth+1 otherwise."""
    parts = name.split(".")
    if any(p in _LOWEST for p in parts):
        return 0
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    return depth + 1


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, normalisation parameters and LayerScale gammas get no weight decay."""
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def param_groups(student: nn.ModuleDict, depth: int, layer_decay: float = 0.9,
                 patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Group trainable student parameters by (lr_mult, wd_mult, is_last_layer).

    Backbone parameters get lr_mult = layer_decay ** (depth + 1 - layer_id) (x patch_embed_lr_mult
    for the patch projection); head parameters get 1. The loop sets lr = lr * lr_mult and
    weight_decay = wd * wd_mult every iteration.
    """
    groups: dict[tuple[float, float, bool], dict] = {}
    for module_name, module in student.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if module_name == "backbone":
                lr_mult = layer_decay ** (depth + 1 - layer_id(name, depth))
                if "patch_embed" in name:
                    lr_mult *= patch_embed_lr_mult
            else:
                lr_mult = 1.0
            wd_mult = 0.0 if no_weight_decay(name, p) else 1.0
            last = module_name != "backbone" and name.startswith("last_layer")
            key = (lr_mult, wd_mult, last)
            g = groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                                        "is_last_layer": last})
            g["params"].append(p)
            g["names"].append(f"{module_name}.{name}")
    return list(groups.values())


def build_optimizer(student: nn.ModuleDict, depth: int, layer_decay: float, patch_embed_lr_mult: float,
                    betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW over `param_groups` (lr and weight decay are set by the loop each iteration)."""
    import torch

    groups = param_groups(student, depth, layer_decay, patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=betas)
