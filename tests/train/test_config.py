"""Structured configs: bundled YAMLs load, every setting is commented, typos are errors."""
from __future__ import annotations

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError

from train.cli import CONFIG_DIR, resolve_config_path
from train.config import load_config

NAMES = ("tiny", "vits14", "vitb14", "vitl14", "vitg14", "small_cpu")


@pytest.mark.parametrize("name", NAMES)
def test_bundled_configs_load_and_are_documented(name):
    cfg = load_config(resolve_config_path(name))
    assert cfg.loss.koleo_weight == 0.1
    if name == "small_cpu":  # the small-budget preset departs from the official recipe on purpose
        assert cfg.crops.blur_probs == [0.0, 0.0, 0.0] and cfg.model.init == "xavier" and cfg.loss.ibot_weight == 0
        assert cfg.crops.global_size == cfg.eval_size == 28 and cfg.model.patch_size == 7
    else:  # the official code's effective blur and init
        assert cfg.crops.blur_probs == [0.0, 0.9, 0.5] and cfg.model.init == "trunc_normal"
    lines = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
    settings = [ln for ln in lines if ":" in ln and not ln.lstrip().startswith("#")]
    leafs = [ln for ln in settings if not ln.rstrip().endswith(":")]
    undocumented = [ln for ln in leafs if "#" not in ln]
    assert not undocumented, undocumented


def test_arch_choices():
    assert load_config(resolve_config_path("vitg14")).model.arch == "vit_giant"
    assert load_config(resolve_config_path("vitl14")).model.ffn == "swiglu"  # official train/vitl14.yaml
    tiny = load_config(resolve_config_path("tiny"))
    assert tiny.model.patch_size in (4, 8) and 64 <= tiny.model.embed_dim <= 192 and 32 <= tiny.crops.global_size <= 64


def test_overrides_and_errors():
    cfg = load_config(resolve_config_path("tiny"), ["optim.batch_size=7", "crops.blur_probs=[0.0,0.9,0.5]"])
    assert cfg.optim.batch_size == 7 and cfg.crops.blur_probs == [0.0, 0.9, 0.5]
    with pytest.raises(ConfigKeyError):
        load_config(resolve_config_path("tiny"), ["optim.batchsize=7"])
    with pytest.raises(ValidationError):
        load_config(resolve_config_path("tiny"), ["optim.batch_size=lots"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_config(resolve_config_path("vits14"), ["crops.global_size=200"])
    with pytest.raises(ValueError, match=r"crops.local_size=96 must be a positive multiple of the patch size 14"):
        load_config(resolve_config_path("vits14"), ["crops.local_size=96"])
    with pytest.raises(ValueError, match="crops.high_res_local_size=100"):
        load_config(resolve_config_path("vits14"), ["crops.high_res_global_size=518", "crops.high_res_iters=5",
                                                     "crops.high_res_local_size=100"])
    with pytest.raises(ValueError, match="eval_size=230"):
        load_config(resolve_config_path("vits14"), ["eval_size=230"])
