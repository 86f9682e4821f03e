"""DINOv2 ViT backbones on top of timm's VisionTransformer, plus the saved-backbone format.

Mask-token placement: masked patch embeddings are replaced by a learnable mask token right
after the patch projection and *before* the position embedding is added (as in DINOv2), so
the student still knows where a masked patch sits.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

BACKBONE_FORMAT = "dinocurate-backbone-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, ffn="mlp"),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, ffn="mlp"),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, ffn="mlp"),
    "vit_giant": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4.0, ffn="swiglu"),
    "vit_tiny": dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, ffn="mlp"),
}


def resolve_arch(
    arch: str,
    patch_size: int = 14,
    img_size: int = 224,
    reg_tokens: int = 0,
    init_values: float = 1e-5,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> dict[str, Any]:
    """Merge a named preset with explicit settings into the full backbone kwargs dict.

    Overrides whose value is None keep the preset value; the result is what `build_backbone` takes
    and what `teacher_backbone.pt` stores under "arch".
    """
    if arch not in ARCH_PRESETS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_PRESETS)}")
    kwargs = dict(ARCH_PRESETS[arch])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    kwargs.update(
        patch_size=int(patch_size),
        img_size=int(img_size),
        reg_tokens=int(reg_tokens),
        init_values=float(init_values),
        drop_path_rate=float(drop_path_rate),
    )
    return kwargs


def resample_pos_grid(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings [1, gh*gw, D] on an `old` (gh, gw) grid -> [1, h*w, D] on a `new` one.

    As the official `interpolate_pos_encoding` under its training config (`interpolate_antialias:
    false`, `interpolate_offset: 0.1`): the table itself on the same grid, otherwise bicubic
    resampling *without* antialiasing at scale factor (h + 0.1) / gh. (timm's own dynamic-size
    resampling antialiases, which blurs the table when it shrinks it for the local crops.)
    """
    (gh, gw), (h, w) = old, new
    if (h, w) == (gh, gw):
        return table
    d = table.shape[-1]
    grid = table.float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    out = nn.functional.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                                    antialias=False)
    if tuple(out.shape[-2:]) != (h, w):
        raise RuntimeError(f"position-embedding resampling gave {tuple(out.shape[-2:])}, not {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, d).to(table.dtype)


def _swiglu_ratio(embed_dim: int, mlp_ratio: float) -> float:
    """Packed-SwiGLU ratio giving DINOv2's hidden width: 2 * round8(int(dim * ratio * 2/3))."""
    hidden = (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
    return 2 * hidden / embed_dim


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT: LayerScale, optional registers/SwiGLU, iBOT mask token, any input resolution.

    forward(images, masks=None) returns {"cls": [B, D], "patch": [B, N, D], "reg": [B, R, D]},
    all after the final LayerNorm. `masks` is a bool [B, N] (True = replace by the mask token).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        patch_size: int = 14,
        img_size: int = 224,
        reg_tokens: int = 0,
        init_values: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from timm.layers import DropPath, SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer

        extra: dict[str, Any] = {}
        ratio = mlp_ratio
        if ffn == "swiglu":
            extra = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
            ratio = _swiglu_ratio(embed_dim, mlp_ratio)
        elif ffn != "mlp":
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="token",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=ratio,
            init_values=init_values, reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0,
            dynamic_img_size=True, **extra,
        )
        # DINOv2 uses a uniform stochastic-depth rate for every block.
        for blk in self.vit.blocks:
            blk.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.num_reg_tokens = reg_tokens

    def _tokens(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        vit = self.vit
        p = self.patch_size
        h_in, w_in = images.shape[-2:]
        if h_in % p or w_in % p:  # as the official PatchEmbed: never drop pixels silently
            raise ValueError(f"image size {h_in}x{w_in} is not a multiple of the patch size {p}")
        x = vit.patch_embed(images)  # [B, H, W, D] (dynamic size)
        if masks is not None:
            b, h, w, d = x.shape
            m = masks.reshape(b, h, w, 1).to(torch.bool)
            x = torch.where(m, self.mask_token.to(x.dtype).view(1, 1, 1, d), x)
        return vit.norm_pre(vit.pos_drop(self._pos_embed(x)))

    def _patch_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings of an h x w patch grid, [1, h*w, D] (see `resample_pos_grid`)."""
        vit = self.vit
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return resample_pos_grid(vit.pos_embed[:, n_prefix:], tuple(vit.patch_embed.grid_size), (h, w))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, D] patch tokens -> [B, prefix + H*W, D] with CLS (+ registers) and positions."""
        vit = self.vit
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d) + self._patch_pos_embed(h, w)
        cls = vit.cls_token
        if not vit.no_embed_class:  # the CLS token has its own position embedding
            cls = cls + vit.pos_embed[:, :1]
        prefix = [cls.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        return torch.cat(prefix + [x], dim=1)

    def _split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n_prefix = self.vit.num_prefix_tokens
        return {"cls": x[:, 0], "reg": x[:, 1:n_prefix], "patch": x[:, n_prefix:]}

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Embed images (optionally with iBOT masks) and return CLS, patch and register tokens."""
        x = self.vit.blocks(self._tokens(images, masks))
        return self._split(self.vit.norm(x))

    def last_blocks(self, images: torch.Tensor, n: int) -> list[dict[str, torch.Tensor]]:
        """Outputs of the last `n` blocks (oldest first), each through the final norm, as the official
        `get_intermediate_layers(norm=True)` used by the linear evaluation."""
        x = self._tokens(images, None)
        outs = []
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x)
            if i >= len(self.vit.blocks) - n:
                outs.append(self._split(self.vit.norm(x)))
        return outs


@torch.no_grad()
def xavier_init_(backbone: DinoVisionTransformer) -> None:
    """Re-initialise a backbone the MAE / LightlySSL way: xavier-uniform for every Linear layer and for
    the patch projection (as a Linear over the flattened patch), zero biases, unit LayerNorms, CLS
    token normal(0.02). Position embeddings, registers, mask token and LayerScale are left as built.
    """
    for m in backbone.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    w = backbone.vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(backbone.vit.patch_embed.proj.bias)
    if backbone.vit.cls_token is not None:
        nn.init.normal_(backbone.vit.cls_token, std=0.02)


def build_backbone(arch: dict[str, Any]) -> DinoVisionTransformer:
    """Build a backbone from a full kwargs dict (see `resolve_arch`)."""
    return DinoVisionTransformer(**arch)


class BackboneEmbedder(nn.Module):
    """Inference wrapper: forward(normalised images [B,3,H,W]) -> CLS embedding [B, D].

    Inputs are expected already normalised with `.mean` / `.std` (ImageNet statistics by default)
    and a side multiple of the patch size (`.image_size` is the training resolution).
    """

    def __init__(self, backbone: DinoVisionTransformer, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the final-norm CLS token of each image."""
        return self.backbone(images)["cls"]


def save_backbone(path: str, backbone: DinoVisionTransformer, arch: dict[str, Any], image_size: int,
                  mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
    """Atomically write a standalone backbone file in the `dinocurate-backbone-v1` format."""
    arch = dict(arch)
    arch["drop_path_rate"] = 0.0
    payload = {
        "format": BACKBONE_FORMAT,
        "arch": arch,
        "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        "image_size": int(image_size),
        "mean": list(mean),
        "std": list(std),
    }
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_backbone(path: str, map_location: str | torch.device = "cpu") -> BackboneEmbedder:
    """Load a `teacher_backbone.pt` file into an eval-mode module mapping images to CLS embeddings."""
    from train.checkpoint import safe_load

    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{path}: not a {BACKBONE_FORMAT} file")
    backbone = build_backbone(copy.deepcopy(payload["arch"]))
    backbone.load_state_dict(payload["state_dict"])
    model = BackboneEmbedder(backbone, payload["image_size"], tuple(payload["mean"]), tuple(payload["std"]))
    return model.to(map_location).eval()
