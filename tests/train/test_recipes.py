"""The bundled ViT configs equal the official facebookresearch/dinov2 recipes, value for value.

Each row of RECIPE names our key, the official file and key it comes from, and the value per model.
Files are under dinov2/configs/ unless a path says otherwise; "x 1250" is the official
OFFICIAL_EPOCH_LENGTH converting epochs to iterations. The released ViT-S/14 and ViT-B/14 were
distilled, so the official repo has no training config for them: they take the default recipe
(ssl_default_config.yaml) with the backbone of eval/vit{s,b}14_pretrain.yaml.
"""
from __future__ import annotations

import pytest

from train.cli import resolve_config_path
from train.config import load_config
from train.models import resolve_arch

MODELS = ("vits14", "vitb14", "vitl14", "vitg14")
DEF = "ssl_default_config.yaml"


def _all(v):
    return dict.fromkeys(MODELS, v)


def _sb_lg(small, large):
    return {"vits14": small, "vitb14": small, "vitl14": large, "vitg14": large}


RECIPE: dict[str, tuple[str, dict]] = {
    "model.arch": ("eval/vits14_pretrain.yaml, eval/vitb14_pretrain.yaml, train/vitl14.yaml, train/vitg14.yaml: "
                   "student.arch (vit_giant2 = our vit_giant)",
                   {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant"}),
    "model.patch_size": ("eval/vit*14_pretrain.yaml, train/vit{l,g}14.yaml: student.patch_size", _all(14)),
    "model.ffn": (f"{DEF}: student.ffn_layer mlp; train/vit{{l,g}}14.yaml: swiglufused", _sb_lg("mlp", "swiglu")),
    "model.reg_tokens": (f"{DEF}: student.num_register_tokens", _all(0)),
    "model.init": ("dinov2/models/vision_transformer.py: init_weights_vit_timm (trunc_normal_ std 0.02 on every "
                   "Linear) and DinoVisionTransformer.init_weights (pos_embed trunc_normal_ std 0.02)",
                   _all("trunc_normal")),
    "model.init_values": (f"{DEF}: student.layerscale", _all(1e-5)),
    "model.drop_path_rate": (f"{DEF} 0.3; train/vit{{l,g}}14.yaml 0.4: student.drop_path_rate", _sb_lg(0.3, 0.4)),
    "model.embed_dim": ("preset (null)", _all(None)),
    "model.depth": ("preset (null)", _all(None)),
    "model.num_heads": ("preset (null)", _all(None)),
    "model.mlp_ratio": ("preset (null)", _all(None)),
    "head.prototypes": (f"{DEF} 65536; train/vit{{l,g}}14.yaml 131072: dino.head_n_prototypes",
                        _sb_lg(65536, 131072)),
    "head.hidden_dim": (f"{DEF}: dino.head_hidden_dim", _all(2048)),
    "head.bottleneck_dim": (f"{DEF} 256; train/vit{{l,g}}14.yaml 384: dino.head_bottleneck_dim", _sb_lg(256, 384)),
    "head.nlayers": (f"{DEF}: dino.head_nlayers", _all(3)),
    "head.ibot_separate_head": (f"{DEF} false; train/vit{{l,g}}14.yaml true: ibot.separate_head",
                                _sb_lg(False, True)),
    "head.ibot_prototypes": (f"{DEF} 65536; train/vit{{l,g}}14.yaml 131072: ibot.head_n_prototypes",
                             _sb_lg(65536, 131072)),
    "head.ibot_bottleneck_dim": (f"{DEF}: ibot.head_bottleneck_dim (not overridden by vit{{l,g}}14)", _all(256)),
    "head.freeze_last_layer_iters": (f"{DEF}: optim.freeze_last_layer_epochs 1 x 1250", _all(1250)),
    "crops.global_size": (f"{DEF}: crops.global_crops_size", _all(224)),
    "crops.local_size": ("eval/vit*14_pretrain.yaml, train/vit{l,g}14.yaml: crops.local_crops_size", _all(98)),
    "crops.n_local": (f"{DEF}: crops.local_crops_number", _all(8)),
    "crops.global_scale": (f"{DEF}: crops.global_crops_scale", _all([0.32, 1.0])),
    "crops.local_scale": (f"{DEF}: crops.local_crops_scale", _all([0.05, 0.32])),
    "crops.blur_probs": ("dinov2/data/augmentations.py: GaussianBlur(p=1.0 / 0.1 / 0.5) applies with 1 - p "
                         "(dinov2/data/transforms.py), effective 0.0 / 0.9 / 0.5", _all([0.0, 0.9, 0.5])),
    "crops.solarize_prob": ("dinov2/data/augmentations.py: RandomSolarize(threshold=128, p=0.2)", _all(0.2)),
    "crops.high_res_global_size": ("no high-resolution phase in the official configs", _all(0)),
    "crops.high_res_local_size": ("no high-resolution phase in the official configs", _all(0)),
    "crops.high_res_iters": ("no high-resolution phase in the official configs", _all(0)),
    "mask.sample_probability": (f"{DEF}: ibot.mask_sample_probability", _all(0.5)),
    "mask.ratio_min": (f"{DEF}: ibot.mask_ratio_min_max[0]", _all(0.1)),
    "mask.ratio_max": (f"{DEF}: ibot.mask_ratio_min_max[1]", _all(0.5)),
    "mask.min_block_patches": ("dinov2/data/masking.py: MaskingGenerator min_num_patches=4", _all(4)),
    "mask.min_aspect": ("dinov2/data/masking.py: MaskingGenerator min_aspect=0.3", _all(0.3)),
    "loss.dino_weight": (f"{DEF}: dino.loss_weight", _all(1.0)),
    "loss.ibot_weight": (f"{DEF}: ibot.loss_weight", _all(1.0)),
    "loss.koleo_weight": (f"{DEF}: dino.koleo_loss_weight", _all(0.1)),
    "loss.centering": (f"{DEF} centering; train/vit{{l,g}}14.yaml sinkhorn_knopp: train.centering",
                       _sb_lg("centering", "sinkhorn_knopp")),
    "loss.center_momentum": ("dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py: center_momentum=0.9", _all(0.9)),
    "loss.sinkhorn_iterations": ("dinov2/loss/dino_clstoken_loss.py: sinkhorn_knopp_teacher n_iterations=3",
                                 _all(3)),
    "loss.student_temp": ("dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py: student_temp=0.1", _all(0.1)),
    "loss.teacher_temp": (f"{DEF}: teacher.teacher_temp", _all(0.07)),
    "loss.warmup_teacher_temp": (f"{DEF}: teacher.warmup_teacher_temp", _all(0.04)),
    "loss.warmup_teacher_temp_iters": (f"{DEF}: teacher.warmup_teacher_temp_epochs 30 x 1250", _all(37500)),
    "optim.iterations": (f"{DEF} 100; train/vit{{l,g}}14.yaml 500: optim.epochs x 1250", _sb_lg(125000, 625000)),
    "optim.batch_size": (f"{DEF} 64; train/vitl14.yaml 32; train/vitg14.yaml 12: train.batch_size_per_gpu",
                         {"vits14": 64, "vitb14": 64, "vitl14": 32, "vitg14": 12}),
    "optim.base_lr": (f"{DEF} 0.004; train/vit{{l,g}}14.yaml 2.0e-04: optim.base_lr", _sb_lg(0.004, 2e-4)),
    "optim.min_lr": (f"{DEF}: optim.min_lr", _all(1e-6)),
    "optim.warmup_iters": (f"{DEF} 10; train/vit{{l,g}}14.yaml 80: optim.warmup_epochs x 1250",
                           _sb_lg(12500, 100000)),
    "optim.weight_decay": (f"{DEF}: optim.weight_decay", _all(0.04)),
    "optim.weight_decay_end": (f"{DEF} 0.4; train/vit{{l,g}}14.yaml 0.2: optim.weight_decay_end", _sb_lg(0.4, 0.2)),
    "optim.momentum_teacher": (f"{DEF} 0.992; train/vit{{l,g}}14.yaml 0.994: teacher.momentum_teacher",
                               _sb_lg(0.992, 0.994)),
    "optim.momentum_teacher_end": (f"{DEF}: teacher.final_momentum_teacher", _all(1.0)),
    "optim.layerwise_decay": (f"{DEF} 0.9; train/vit{{l,g}}14.yaml 1.0: optim.layerwise_decay", _sb_lg(0.9, 1.0)),
    "optim.patch_embed_lr_mult": (f"{DEF}: optim.patch_embed_lr_mult", _all(0.2)),
    "optim.clip_grad": (f"{DEF}: optim.clip_grad", _all(3.0)),
    "optim.beta1": (f"{DEF}: optim.adamw_beta1", _all(0.9)),
    "optim.beta2": (f"{DEF}: optim.adamw_beta2", _all(0.999)),
    "seed": (f"{DEF}: train.seed", _all(0)),
}

# dinov2/models/vision_transformer.py: vit_small / vit_base / vit_large / vit_giant2 (embed_dim, depth, heads)
BACKBONES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
RECIPE_SECTIONS = ("model", "head", "crops", "mask", "loss", "optim")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _equal(ours, official) -> bool:
    if isinstance(official, (bool, str)) or official is None:
        return type(ours) is type(official) and ours == official
    return ours == pytest.approx(official, rel=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_config_equals_official_recipe(name):
    cfg = load_config(resolve_config_path(name))
    wrong = {key: (_get(cfg, key), values[name], source) for key, (source, values) in RECIPE.items()
             if not _equal(_get(cfg, key), values[name])}
    assert not wrong, wrong
    arch = resolve_arch(cfg.model.arch, cfg.model.patch_size, ffn=cfg.model.ffn)
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["mlp_ratio"]) == (*BACKBONES[name], 4.0)


def test_table_covers_every_recipe_setting():
    from dataclasses import fields

    from train.config import TrainConfig

    cfg = TrainConfig()
    keys = {f"{s}.{f.name}" for s in RECIPE_SECTIONS for f in fields(getattr(cfg, s))}
    assert keys <= set(RECIPE), sorted(keys - set(RECIPE))
