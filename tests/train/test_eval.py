"""k-NN, linear probe and the eval CLI on labelled folders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from train import cli
from train.eval import extract_features, knn_accuracy, labelled_folder, load_eval_model
from train.linear import OFFICIAL_LRS, accuracy, linear_input, train_classifiers
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


def test_linear_input_is_the_official_concatenation():
    cls = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [N, 4 blocks (oldest first), D]
    pm = -torch.ones(2, 3)
    assert torch.equal(linear_input(cls, pm, 1, False), cls[:, 3])
    assert torch.equal(linear_input(cls, pm, 4, False), torch.cat([cls[:, 0], cls[:, 1], cls[:, 2], cls[:, 3]], 1))
    assert torch.equal(linear_input(cls, pm, 1, True), torch.cat([cls[:, 3], pm], 1))


def test_linear_grid_picks_the_informative_input_on_heldout():
    # class information only in the oldest of the last 4 blocks: only 4-block classifiers can use it
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    cls = torch.randn(600, 4, 8, generator=g)
    cls[:, 0] += 4 * torch.eye(3, 8)[y]
    pm = torch.randn(600, 8, generator=g)
    heads = train_classifiers((cls[:400], pm[:400], y[:400]), 3, lrs=(1e-3, 1e-1), steps=150, batch_size=64)
    assert len(heads) == 2 * 2 * 2 and {k[0] for k in heads} == {1, 4}
    val = {k: accuracy(h, k, (cls[400:500], pm[400:500]), y[400:500]) for k, h in heads.items()}
    best = max(val, key=val.get)
    assert best[0] == 4 and val[best] > 0.95
    assert accuracy(heads[best], best, (cls[500:], pm[500:]), y[500:]) > 0.95
    assert max(v for k, v in val.items() if k[0] == 1) < 0.6  # the last block alone knows nothing


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
                        "--probe-aug", "1", "--output", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert set(res["knn"]) == {"10", "20", "24"} and res["n_train"] == 24 and res["n_test"] == 12
    assert json.loads(capsys.readouterr().out.strip()) == res
    # the k-NN figures are exactly those of the checkpoint's features at its eval size (16)
    model = load_eval_model(str(ckpt))
    te_paths, te_y, _ = labelled_folder(str(tmp_path / "test"))
    tr_f, te_f = extract_features(model, paths), extract_features(model, te_paths)
    expected = knn_accuracy(tr_f, torch.from_numpy(labels), te_f, torch.from_numpy(te_y), ks=(10, 20, 100, 200))
    assert res["image_size"] == 16 and res["knn"] == {str(k): v for k, v in expected.items()}
    lin = res["linear"]
    assert lin["grid"] == 1 * 2 * 13 and lin["n_blocks"] == 1 and lin["lr"] in OFFICIAL_LRS  # depth 1: n = 1 only
    # scored on all 12 test images; selected on the 5 held-out train images (20% of 24)
    assert abs(lin["accuracy"] * 12 - round(lin["accuracy"] * 12)) < 1e-5
    assert abs(lin["val_accuracy"] * 5 - round(lin["val_accuracy"] * 5)) < 1e-5
    # another evaluation resolution gives other features (the size really is applied)
    rc = cli.eval_main([str(ckpt), str(tmp_path / "train"), str(tmp_path / "test"), "--probe-steps", "1",
                        "--probe-aug", "1", "--image-size", "24", "--output", str(out_json)])
    assert rc == 0 and json.loads(out_json.read_text())["image_size"] == 24
    model.image_size = 24
    assert not torch.allclose(extract_features(model, paths[:2]), tr_f[:2])


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
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(FileNotFoundError, match="no labelled images"):
        labelled_folder(str(tmp_path / "nothing_here"))
