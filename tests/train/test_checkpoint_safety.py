"""Checkpoints hold only tensors and plain data; a pickled object in a file is refused, never executed."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

from train.checkpoint import CheckpointError, load_checkpoint, rng_state, set_rng_state


class _Payload:
    """Unpickling this calls Path.touch(marker): the stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _malicious(tmp_path, name: str) -> tuple[str, str]:
    marker = str(tmp_path / f"{name}.marker")
    path = str(tmp_path / f"{name}.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "iteration": 1, "rng": {},
                "format": "dinocurate-backbone-v1", "evil": _Payload(marker)}, path)
    return path, marker


def test_malicious_pickle_would_run_code_with_plain_unpickling(tmp_path):
    path, marker = _malicious(tmp_path, "control")
    torch.load(path, weights_only=False)  # the control: the payload really executes
    assert os.path.exists(marker)


def test_malicious_checkpoint_is_a_clear_error_and_never_runs(tmp_path):
    from train.eval import load_eval_model
    from train.models import load_backbone

    path, marker = _malicious(tmp_path, "evil")
    for loader in (load_checkpoint, load_eval_model, load_backbone):
        with pytest.raises(CheckpointError, match="not a dinocurate checkpoint.*pickled objects are refused"):
            loader(path)
        assert not os.path.exists(marker)
    os.rename(path, tmp_path / "last.pt")  # also through the output-dir lookup of the trainer
    with pytest.raises(CheckpointError):
        load_eval_model(str(tmp_path / "last.pt"))
    assert not os.path.exists(marker)


def test_foreign_or_truncated_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(str(junk))
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(3)}, plain)  # loads safely, but is not a training checkpoint
    with pytest.raises(CheckpointError, match="missing model/optimizer/rng"):
        load_checkpoint(str(plain))


def test_training_checkpoint_is_weights_only_and_restores_rng(tiny_cfg):
    import random

    import numpy as np

    from train.loop import train

    cfg = tiny_cfg("safe", "optim.iterations=2")
    train(cfg)
    state = torch.load(os.path.join(cfg.output_dir, "last.pt"), weights_only=True)  # no pickled objects
    assert state["iteration"] == 2 and "teacher.backbone.vit.cls_token" in state["model"]
    saved = rng_state()
    a = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
