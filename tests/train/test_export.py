"""Export to timm / official DINOv2 layouts and import back: strict keys, same features."""
from __future__ import annotations

import os

import pytest
import torch

from train.export import export, load_into_backbone, read_backbone, to_timm
from train.models import build_backbone, resolve_arch, save_backbone


def _backbone(reg: int = 0, arch: str = "vit_small", depth: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    a = resolve_arch(arch, 14, 518, reg, 1e-5, 0.0, depth=depth)
    bb = build_backbone(a).eval()
    with torch.no_grad():  # non-trivial LayerScale and mask token, so a dropped or swapped key shows
        for name, p in bb.named_parameters():
            if "gamma" in name or "mask_token" in name or "token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return bb, a


def _hub_keys(depth: int, reg: bool, swiglu: bool = False) -> set[str]:
    """Parameter names of the official facebookresearch/dinov2 DinoVisionTransformer (block_chunks=0)."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} | ({"register_tokens"} if reg else set())
    mlp = ("w12", "w3") if swiglu else ("fc1", "fc2")
    for i in range(depth):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", f"mlp.{mlp[0]}", f"mlp.{mlp[1]}"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("reg", [0, 4])
def test_timm_export_loads_strictly_with_same_features(tmp_path, reg):
    import timm

    bb, arch = _backbone(reg)
    src = str(tmp_path / "teacher_backbone.pt")
    save_backbone(src, bb, arch, 518)
    out = str(tmp_path / "timm.pth")
    info = export(src, "timm", out)
    assert info["timm_model"] == ("vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2")
    model = timm.create_model(info["timm_model"], pretrained=False, checkpoint_path=out, **info["timm_kwargs"]).eval()
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        ours = bb(x)
        tokens = model.forward_features(x)
    n = model.num_prefix_tokens
    torch.testing.assert_close(tokens[:, 0], ours["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, n:], ours["patch"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reg", [0, 4])
def test_dinov2_export_has_hub_keys_and_round_trips(tmp_path, reg):
    bb, arch = _backbone(reg)
    src = str(tmp_path / "teacher_backbone.pt")
    save_backbone(src, bb, arch, 518)
    out = str(tmp_path / "hub.pth")
    info = export(src, "dinov2", out)
    assert info["hub_model"] == ("dinov2_vits14_reg" if reg else "dinov2_vits14")
    sd = torch.load(out, weights_only=True)
    assert set(sd) == _hub_keys(1, bool(reg))
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.testing.assert_close(sd["mask_token"], bb.mask_token.detach())
    back, _ = _backbone(reg, seed=1)
    load_into_backbone(back, out)  # what init_weights does
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        a, b = bb(x), back(x)
    for k in ("cls", "patch", "reg"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.mask_token, bb.mask_token)


def test_giant_swiglu_maps_to_w12_w3(tmp_path):
    torch.manual_seed(0)
    a = resolve_arch("vit_giant", 14, 518, 0, 1e-5, 0.0, depth=1)
    bb = build_backbone(a).eval()
    sd = to_timm(bb.state_dict(), a)
    src = str(tmp_path / "g_timm.pth")
    torch.save(sd, src)
    assert read_backbone(src)[0].keys() == sd.keys()
    out = str(tmp_path / "g_hub.pth")
    export(src, "dinov2", out)  # a timm file is accepted as input too (arch inferred from the weights)
    hub = torch.load(out, weights_only=True)
    assert set(hub) == _hub_keys(1, False, swiglu=True)
    assert hub["blocks.0.mlp.w12.weight"].shape == (8192, 1536) and hub["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    torch.testing.assert_close(hub["blocks.0.mlp.w12.weight"], sd["blocks.0.mlp.fc1.weight"])


def test_init_weights_starts_training_from_a_timm_file(tiny_cfg, tmp_path):
    from train.loop import build_model

    cfg = tiny_cfg("src")
    torch.manual_seed(5)
    donor_model = build_model(cfg)
    donor = donor_model.student["backbone"]
    path = str(tmp_path / "tiny_timm.pth")
    torch.save(to_timm(donor.state_dict(), donor_model.arch, img_size=cfg.crops.global_size), path)
    model = build_model(tiny_cfg("dst", f"init_weights={path}"))
    for k, v in donor.vit.state_dict().items():
        assert torch.equal(model.student["backbone"].vit.state_dict()[k], v), k
        assert torch.equal(model.teacher["backbone"].vit.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError):
        build_model(tiny_cfg("bad", f"init_weights={os.path.join(str(tmp_path), 'missing.pth')}"))



@pytest.mark.parametrize("reg", [0, 2])
def test_timm_export_at_another_size_uses_the_backbones_resampling(reg):
    """The exported position table at another size is the one our backbone itself uses at that size
    (official resampling, no antialias), so the export embeds as the trained backbone does there."""
    torch.manual_seed(0)
    a = resolve_arch("vit_tiny", 4, 16, reg, 1e-5, 0.0, embed_dim=24, num_heads=2, depth=1)
    bb = build_backbone(a).eval()
    prefix = 0 if reg else 1
    for size in (8, 24, 36):
        g = size // 4
        pos = to_timm(bb.state_dict(), a, img_size=size)["pos_embed"]
        assert pos.shape == (1, prefix + g * g, 24)
        with torch.no_grad():
            torch.testing.assert_close(pos[:, prefix:], bb._patch_pos_embed(g, g), atol=0, rtol=0)
            torch.testing.assert_close(pos[:, :prefix], bb.vit.pos_embed[:, :prefix])
