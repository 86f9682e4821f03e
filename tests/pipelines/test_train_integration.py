"""The shard contract end to end: curate -> shards -> `curate train` -> embed with the trained
teacher (`checkpoint:`) -> `curate eval`."""

import json

import numpy as np

from pipelines.synth import make_image
from pipelines.cli import main


def test_curated_shards_train_embed_and_eval(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(24):
        make_image(2000 + i, (64, 64)).save(raw / f"{i:02d}.png")
    (tmp_path / "c.yaml").write_text(f"workdir: {tmp_path / 'w'}\ningest:\n  sources: [{raw}]\n  workers: 1\n"
                                     "embed:\n  num_workers: 0\n  model: 'pixels:8'\nshards:\n  max_count: 10\n")
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    out = tmp_path / "run"
    assert main(["train", "tiny", f"data.path={tmp_path / 'w' / 'shards'}", f"output_dir={out}",
                 "optim.iterations=3", "optim.batch_size=6", "crops.n_local=2", "progress=false",
                 "data.num_workers=0", "checkpoint_every=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 3 and np.isfinite(summary["final_loss"])
    assert main(["embed", "--workdir", str(tmp_path / "w"), "--model", f"checkpoint:{out / 'teacher_backbone.pt'}",
                 "--name", "teacher", "--num-workers", "0"]) == 0
    vecs = np.load(tmp_path / "w" / "embed" / "teacher" / "part-00000.npy")
    assert vecs.shape == (24, 96) and np.allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1, atol=2e-3)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(2):
            d = tmp_path / "eval" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                make_image(5000 + 100 * c + i + (50 if split == "test" else 0), (48, 48)).save(d / f"{i}.png")
    capsys.readouterr()
    assert main(["eval", str(out / "teacher_backbone.pt"), str(tmp_path / "eval" / "train"),
                 str(tmp_path / "eval" / "test"), "--ks", "1,3", "--probe-steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["knn"]) == {"1", "3"} and all(0 <= v <= 1 for v in result["knn"].values())


def test_curate_train_with_a_pipeline_config_curates_trains_and_evaluates(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(20):
        make_image(7000 + i, (64, 64)).save(raw / f"{i:02d}.png")
    for split, n in (("train", 4), ("test", 2)):
        for c in range(2):
            d = tmp_path / "eval" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                make_image(8000 + 100 * c + i + (50 if split == "test" else 0), (48, 48)).save(d / f"{i}.png")
    (tmp_path / "p.yaml").write_text(
        f"workdir: {tmp_path / 'w'}\ningest:\n  sources: [{raw}]\n  workers: 1\nembed:\n  num_workers: 0\n"
        f"  model: 'pixels:8'\ndedup:\n  threshold: 1.0\ntrain:\n  config: tiny\n"
        f"  overrides: [optim.iterations=2, optim.batch_size=4, crops.n_local=1, progress=false, data.num_workers=0]\n"
        f"  eval_train: {tmp_path / 'eval' / 'train'}\n  eval_test: {tmp_path / 'eval' / 'test'}\n  ks: [1, 3]\n"
        f"  probe_steps: 5\n")
    assert main(["train", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "[train] done" in out and "iterations 2" in out and "[evaluate] done" in out and "knn@1" in out
    result = json.loads((tmp_path / "w" / "evaluate" / "eval.json").read_text())
    assert set(result["knn"]) == {"1", "3"}
    assert main(["train", str(tmp_path / "p.yaml")]) == 0  # resumable as a whole: nothing left to do
    out = capsys.readouterr().out
    assert "[ingest] already done" in out and "[train] already done" in out


def test_pipeline_train_stage_on_two_processes_resumes_and_exports(tmp_path, capsys):
    """`curate train PIPELINE --nproc 2` continues a 1-process run on 2 ranks (the global batch of
    the checkpoint), then `curate export` writes the teacher for timm (a one-block ViT-S/14)."""
    import torch

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(16):
        make_image(9000 + i, (64, 64)).save(raw / f"{i:02d}.png")
    common = ("optim.batch_size=4, crops.n_local=1, progress=false, data.num_workers=0, checkpoint_every=2, "
              "model.embed_dim=384, model.num_heads=6, model.depth=1, model.patch_size=14, head.prototypes=256, "
              "crops.global_size=28, crops.local_size=14, eval_size=28")
    text = (f"workdir: {tmp_path / 'w'}\ningest:\n  sources: [{raw}]\n  workers: 1\nembed:\n  num_workers: 0\n"
            f"  model: 'pixels:8'\ndedup:\n  threshold: 1.0\ntrain:\n  config: tiny\n"
            f"  overrides: [optim.iterations=ITERS, {common}]\n")
    (tmp_path / "p.yaml").write_text(text.replace("ITERS", "2"))
    assert main(["train", str(tmp_path / "p.yaml")]) == 0
    (tmp_path / "p.yaml").write_text(text.replace("ITERS", "4"))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "p.yaml"), "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "[train] done" in out and "iterations 4" in out and "trained_now 2" in out and "processes 2" in out
    metrics = [json.loads(line) for line in (tmp_path / "w" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics][-1] == 3 and all(np.isfinite(m["loss"]) for m in metrics)
    dest = tmp_path / "vit.pth"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "w" / "train"), "--format", "timm", "--out", str(dest)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["timm_model"] == "vit_small_patch14_dinov2"
    state = torch.load(dest, weights_only=True)
    assert state["cls_token"].shape[-1] == 384 and "blocks.0.attn.qkv.weight" in state
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(dest)]) == 2


def test_train_stage_never_resumes_or_deletes_a_run_it_did_not_make(tmp_path):
    import pytest

    from pipelines.config import load_config
    from pipelines.stages import train as train_stage

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "train.config=tiny", f"train.output_dir={foreign}"])
    with pytest.raises(ValueError, match="use --force to restart it"):
        train_stage.run(cfg)
    with pytest.raises(ValueError, match="refusing to delete"):
        train_stage.run(cfg, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
