"""k-NN, linear probe and the eval CLI on labelled folders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from train import cli
from train.eval import knn_accuracy, labelled_folder, linear_probe
from train.models import build_backbone, resolve_arch, save_backbone

from .conftest import make_images


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_is_softmax_weighted_not_majority():
    # test point at 0 deg; one class-0 neighbour very close, two class-1 neighbours further away
    train_f = torch.tensor([_unit(8), _unit(60), _unit(-60), _unit(180)])
    train_y = torch.tensor([0, 1, 1, 2])
    test_f, test_y = torch.tensor([_unit(0)]), torch.tensor([0])
    acc = knn_accuracy(train_f, train_y, test_f, test_y, ks=(3,), temperature=0.07)
    assert acc == {3: 1.0}
    # with a huge temperature the weights are ~equal, so the 2 class-1 votes win
    assert knn_accuracy(train_f, train_y, test_f, test_y, ks=(3,), temperature=1e6) == {3: 0.0}
    # k is clipped to the bank size and de-duplicated
    assert set(knn_accuracy(train_f, train_y, test_f, test_y, ks=(10, 20, 100, 200))) == {4}


def test_linear_probe_selects_on_heldout_and_scores_test():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    out = linear_probe(x[:240], y[:240], x[240:], y[240:], lrs=(1e-3, 1e-1), wds=(0.0,), steps=100)
    assert out["accuracy"] > 0.95 and out["lr"] in (1e-3, 1e-1) and 0 <= out["val_accuracy"] <= 1
    shuffled = linear_probe(x[:240], y[:240][torch.randperm(240, generator=g)], x[240:], y[240:],
                            lrs=(1e-2,), wds=(0.0,), steps=100)
    assert shuffled["accuracy"] < 0.7


def _write_split(root, n_per_class: int, seed: int) -> None:
    imgs = make_images(3 * n_per_class, size=32, seed=seed, n_classes=3)
    for i, arr in enumerate(imgs):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i}.png")


def test_eval_main_end_to_end(tmp_path, capsys):
    _write_split(tmp_path / "train", 8, 0)
    _write_split(tmp_path / "test", 4, 1)
    paths, labels, classes = labelled_folder(str(tmp_path / "train"))
    assert classes == ["class0", "class1", "class2"] and len(paths) == 24 and np.bincount(labels).tolist() == [8] * 3
    torch.manual_seed(0)
    arch = resolve_arch("vit_tiny", patch_size=4, img_size=16, embed_dim=24, num_heads=2, depth=1)
    ckpt = tmp_path / "teacher_backbone.pt"
    save_backbone(str(ckpt), build_backbone(arch), arch, image_size=16)
    out_json = tmp_path / "eval.json"
    rc = cli.eval_main([str(ckpt), str(tmp_path / "train"), str(tmp_path / "test"), "--probe-steps", "30",
                        "--output", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert set(res["knn"]) == {"10", "20", "24"} and res["n_train"] == 24 and res["n_test"] == 12
    assert all(0.0 <= v <= 1.0 for v in res["knn"].values())
    assert json.loads(capsys.readouterr().out.strip()) == res


def test_eval_accepts_training_output_dir(tiny_cfg, tmp_path):
    from train.eval import load_eval_model
    from train.loop import train

    cfg = tiny_cfg("ev", "optim.iterations=2")
    train(cfg)
    m_dir = load_eval_model(cfg.output_dir)
    m_ckpt = load_eval_model(f"{cfg.output_dir}/last.pt")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(m_dir(x), m_ckpt(x))
    with pytest.raises(FileNotFoundError):
        labelled_folder(str(tmp_path / "nothing_here")) if (tmp_path / "nothing_here").mkdir() is None else None
