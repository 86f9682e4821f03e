"""Backbones, heads, parameter groups and the saved-backbone format."""
from __future__ import annotations

import pytest
import torch

from train.heads import DINOHead
from train.models import ARCH_PRESETS, build_backbone, load_backbone, resolve_arch, save_backbone
from train.optim import layer_id, param_groups


def _tiny(**kw):
    return build_backbone(resolve_arch("vit_tiny", patch_size=4, img_size=16, **{"embed_dim": 24, "num_heads": 2,
                                                                                  "depth": 2, **kw}))


def test_forward_shapes_registers_and_interpolation():
    torch.manual_seed(0)
    m = _tiny(reg_tokens=2).eval()
    out = m(torch.randn(3, 3, 16, 16))
    assert out["cls"].shape == (3, 24) and out["patch"].shape == (3, 16, 24) and out["reg"].shape == (3, 2, 24)
    hi = m(torch.randn(2, 3, 36, 36))  # other resolution: pos-embed interpolated (9x9 grid)
    assert hi["patch"].shape == (2, 81, 24) and torch.isfinite(hi["cls"]).all()
    assert m(torch.randn(1, 3, 8, 8))["patch"].shape == (1, 4, 24)


def test_layerscale_and_presets():
    m = _tiny()
    gammas = [p for n, p in m.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 4 and all(torch.all(g == 1e-5) for g in gammas)
    assert ARCH_PRESETS["vit_giant"]["ffn"] == "swiglu" and ARCH_PRESETS["vit_large"]["depth"] == 24
    s = build_backbone(resolve_arch("vit_small"))
    n_params = sum(p.numel() for p in s.parameters())
    assert 21.5e6 < n_params < 22.3e6  # ViT-S/14 at 224: ~22.06M incl. pos-embed and mask token
    assert s.vit.patch_embed.proj.kernel_size == (14, 14)
    assert s(torch.randn(1, 3, 98, 98))["patch"].shape == (1, 49, 384)  # official 98 px local crop
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        s(torch.randn(1, 3, 96, 96))  # never drop pixels silently


def test_swiglu_hidden_width_matches_dinov2():
    m = build_backbone(resolve_arch("vit_tiny", patch_size=4, img_size=16, embed_dim=1536 // 16, depth=1,
                                    num_heads=2, ffn="swiglu"))
    fc1 = m.vit.blocks[0].mlp.fc1
    # DINOv2: hidden = round8(int(4 * dim * 2 / 3)); packed fc1 holds both halves
    assert fc1.out_features == 2 * ((int(96 * 4 * 2 / 3) + 7) // 8 * 8)


def test_mask_token_replaces_patches_before_pos_embed():
    torch.manual_seed(0)
    m = _tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        m.mask_token.fill_(3.0)
        a = m(x, masks)
        b = m(x)
        # image 1 is unmasked: identical; image 0 differs
        assert torch.allclose(a["patch"][1], b["patch"][1]) and not torch.allclose(a["cls"][0], b["cls"][0])
        # masking with the mask token == feeding patch embeddings replaced by it (direct computation)
        emb = m.vit.patch_embed(x)
        emb[0].view(-1, 24)[:5] = 3.0
        ref = m.vit.norm(m.vit.blocks(m.vit._pos_embed(emb)))
    assert torch.allclose(a["cls"], ref[:, 0], atol=1e-6)


def test_dino_head_weight_norm_g_starts_at_one_and_trains():
    torch.manual_seed(0)
    h = DINOHead(24, out_dim=50, hidden_dim=32, bottleneck_dim=16)
    g = h.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1)  # the official head trains weight_g
    w = h.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)
    out = h(torch.randn(7, 24))
    assert out.shape == (7, 50) and out.abs().max() <= 1.0 + 1e-5  # cosine logits
    assert len(h.last_layer_parameters()) == 2  # g and v
    h(torch.randn(7, 24)).pow(2).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_param_groups_layer_decay_and_no_wd():
    m = _tiny()
    student = torch.nn.ModuleDict({"backbone": m, "dino_head": DINOHead(24, 10, 16, 8)})
    assert layer_id("vit.blocks.1.attn.qkv.weight", 2) == 2 and layer_id("mask_token", 2) == 0
    groups = param_groups(student, depth=2, layer_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.vit.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.9 ** 3 * 0.2)
    assert by_name["backbone.vit.pos_embed"]["lr_mult"] == pytest.approx(0.9 ** 3)
    assert by_name["backbone.mask_token"]["lr_mult"] == pytest.approx(0.9 ** 3)
    assert by_name["backbone.vit.blocks.0.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.9 ** 2)
    assert by_name["backbone.vit.blocks.1.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.9)
    assert by_name["backbone.vit.norm.weight"]["lr_mult"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_mult"] == 1.0
    for name in ("backbone.vit.blocks.0.ls1.gamma", "backbone.vit.blocks.0.norm1.weight",
                 "backbone.vit.blocks.0.attn.qkv.bias", "dino_head.mlp.0.bias"):
        assert by_name[name]["wd_mult"] == 0.0
    assert by_name["backbone.vit.blocks.0.attn.qkv.weight"]["wd_mult"] == 1.0
    assert by_name["dino_head.last_layer.parametrizations.weight.original1"]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in student.parameters() if p.requires_grad)


def test_load_backbone_round_trip(tmp_path):
    torch.manual_seed(0)
    arch = resolve_arch("vit_tiny", patch_size=4, img_size=16, embed_dim=24, num_heads=2, depth=2, reg_tokens=1,
                        drop_path_rate=0.2)
    m = build_backbone(arch).eval()
    path = str(tmp_path / "teacher_backbone.pt")
    save_backbone(path, m, arch, image_size=16)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dinocurate-backbone-v1" and raw["image_size"] == 16
    assert set(raw) == {"format", "arch", "state_dict", "image_size", "mean", "std"}
    loaded = load_backbone(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x)["cls"])
    assert loaded.image_size == 16 and loaded.mean == (0.485, 0.456, 0.406) and not loaded.training
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(Exception):
        load_backbone(str(tmp_path / "bad.pt"))


def _official_pos(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The official `interpolate_pos_encoding` with the training config's interpolate_antialias=false and
    interpolate_offset=0.1 (facebookresearch/dinov2 models/vision_transformer.py), written out here."""
    import math

    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    if n == h * w and h == w == side:
        return pos
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, scale_factor=((h + 0.1) / side, (w + 0.1) / side),
                                            mode="bicubic", antialias=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


@pytest.mark.parametrize("side", [8, 12, 16, 24])  # local crops (smaller grid), the training grid, larger
def test_position_embedding_resampling_matches_official(side):
    """Local crops use the official bicubic resampling without antialiasing (timm's default antialiases,
    which blurs a shrunk table: the local crops of every step saw blurred positions)."""
    torch.manual_seed(0)
    m = _tiny().eval()
    x = torch.randn(2, 3, side, side)
    g = side // 4
    with torch.no_grad():
        tokens = m._tokens(x, None)
        emb = m.vit.patch_embed(x).reshape(2, g * g, 24)
        ref = torch.cat([m.vit.cls_token.expand(2, -1, -1), emb], dim=1) + _official_pos(m.vit.pos_embed, g, g)
    torch.testing.assert_close(tokens, ref, atol=1e-6, rtol=1e-6)


def test_position_embedding_resampling_with_registers():
    """Registers (timm no_embed_class): no position for the prefix tokens, the patch table resampled as above."""
    torch.manual_seed(0)
    m = _tiny(reg_tokens=2).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        tokens = m._tokens(x, None)
        emb = m.vit.patch_embed(x).reshape(1, 4, 24)
        table = torch.cat([torch.zeros(1, 1, 24), m.vit.pos_embed], dim=1)  # a dummy CLS slot for the helper
        ref_patch = emb + _official_pos(table, 2, 2)[:, 1:]
    torch.testing.assert_close(tokens[:, 0], m.vit.cls_token[:, 0].expand(1, -1))
    torch.testing.assert_close(tokens[:, 1:3], m.vit.reg_token.expand(1, -1, -1))
    torch.testing.assert_close(tokens[:, 3:], ref_patch, atol=1e-6, rtol=1e-6)
