"""Student/teacher: no teacher gradients, exact EMA, last-layer freezing inside the loop step."""
from __future__ import annotations

import torch

from train.loop import _step, build_model
from train.optim import build_optimizer
from train.schedules import Schedules


def _batch(b: int = 4, n_local: int = 2, size: int = 24, patch: int = 4) -> dict:
    g = torch.randn(2 * b, 3, size, size)
    masks = torch.zeros(2 * b, (size // patch) ** 2, dtype=torch.bool)
    masks[0, :6] = True
    masks[3, 10:14] = True
    return {"iteration": 0, "global": g, "local": torch.randn(n_local * b, 3, 12, 12), "masks": masks}


def test_teacher_gets_no_gradients(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    assert all(not p.requires_grad for p in model.teacher.parameters())
    loss, terms = model.forward_loss(_batch(), teacher_temp=0.04)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert set(terms) == {"dino", "ibot", "koleo"} and all(v > 0 for v in terms.values())
    assert not model.teacher.training and model.student.training


def test_ema_update_exact(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    t_before = [t.clone() for t in model.ema_pairs()[0]]
    m = 0.9937
    model.update_teacher(m)
    t_after, s_params = model.ema_pairs()
    assert len(t_after) == len(t_before) > 10
    for tb, ta, s in zip(t_before, t_after, s_params):
        assert torch.equal(ta, torch.add(tb * m, s, alpha=1 - m))  # bit-exact, same float32 op order
        exact = m * tb.double() + (1 - m) * s.detach().double()
        assert torch.allclose(ta.double(), exact, rtol=0, atol=5e-7)
    g_t = model.teacher["dino_head"].last_layer.parametrizations.weight.original0
    assert any(t is g_t for t in t_after) and not torch.all(g_t == 1)  # g is part of the EMA


def test_last_layer_frozen_then_trained(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("r", "head.freeze_last_layer_iters=1")
    model = build_model(cfg).train()
    opt = build_optimizer(model.student, model.arch["depth"], 0.9, 0.2)
    sched = Schedules(10, 6, 0.05, 1e-6, 0, 0.04, 0.4, 0.9, 1.0, 0.04, 0.07, 2, 1)
    last = model.last_layer_parameters()[0]
    other = model.student["dino_head"].mlp[0].weight
    before, other_before = last.detach().clone(), other.detach().clone()
    _step(model, opt, _batch(6), sched.at(0), cfg, torch.device("cpu"))
    assert torch.equal(last, before) and not torch.equal(other, other_before)
    _step(model, opt, _batch(6), sched.at(1), cfg, torch.device("cpu"))
    assert not torch.equal(last, before)


def test_xavier_init_option_and_official_default(tiny_cfg):
    """`model.init: xavier` re-initialises the backbone (MAE / LightlySSL style) with the teacher an exact
    copy; the default stays the official init and draws the very same weights as before the option."""
    import math

    import pytest

    from train.models import build_backbone

    torch.manual_seed(0)
    official = build_model(tiny_cfg("a"))
    torch.manual_seed(0)
    ref = build_backbone(official.arch)  # the model's first draws: the backbone as built before the option
    assert all(torch.equal(a, b) for a, b in zip(official.student["backbone"].state_dict().values(),
                                                 ref.state_dict().values()))
    torch.manual_seed(0)
    xav = build_model(tiny_cfg("b", "model.init=xavier"))
    s, t = xav.student["backbone"], xav.teacher["backbone"]
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values()))
    fc1_off, fc1 = official.student["backbone"].vit.blocks[0].mlp.fc1, s.vit.blocks[0].mlp.fc1
    bound = math.sqrt(6.0 / (fc1.in_features + fc1.out_features))  # xavier-uniform bound
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound
    assert abs(float(fc1.weight.detach().std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert abs(float(fc1_off.weight.detach().std()) - 0.02) < 0.003  # official: truncated normal, std 0.02
    proj = s.vit.patch_embed.proj.weight
    pbound = math.sqrt(6.0 / (proj.shape[0] + proj[0].numel()))  # as a Linear over the flat patch
    assert proj.abs().max() <= pbound and proj.abs().max() > 0.9 * pbound
    # the heads keep their init: equal to the official model's (same seed, drawn before the re-init)
    assert torch.equal(xav.student["dino_head"].mlp[0].weight, official.student["dino_head"].mlp[0].weight)
    with pytest.raises(ValueError, match="model.init"):
        tiny_cfg("c", "model.init=kaiming")
