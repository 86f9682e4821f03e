"""`embed.model: bootstrap`: our own small DINOv2 ViT trained on a sample of the pool, inside the
embed stage, resumable, then used as the embedder."""

from __future__ import annotations

import json

import numpy as np

from pipelines.config import load_config
from pipelines.run import run_pipeline
from pipelines.synth import encode, make_image

TRAIN = ["optim.iterations=4", "optim.batch_size=8", "checkpoint_every=2", "data.num_workers=0",
         "optim.warmup_iters=1", "loss.warmup_teacher_temp_iters=1", "head.freeze_last_layer_iters=0",
         "head.prototypes=64"]


def _cfg(tmp_path, sample=24):
    raw = tmp_path / "raw"
    if not raw.exists():
        raw.mkdir()
        for i in range(30):
            (raw / f"{i:03d}.png").write_bytes(encode(make_image(i, (64, 48)), "PNG"))
    return load_config(None, [f"workdir={tmp_path / 'w'}", f"ingest.sources=[{raw}]", "embed.model=bootstrap",
                              f"embed.bootstrap_sample={sample}", f"embed.bootstrap_overrides={json.dumps(TRAIN)}",
                              "embed.num_workers=0", "dedup.threshold=1.0"])


def test_bootstrap_trains_on_a_pool_sample_and_embeds_with_its_teacher(tmp_path):
    cfg = _cfg(tmp_path)
    results = {r.stage: r for r in run_pipeline(cfg, until="embed")}
    emb = tmp_path / "w" / "embed" / "bootstrap"
    manifest = json.loads((emb / "_MANIFEST.json").read_text())
    teacher = emb / "_bootstrap" / "train" / "teacher_backbone.pt"
    assert manifest["config"]["bootstrap_teacher"] == f"checkpoint:{teacher}" and teacher.exists()
    assert "trained tiny for 4 iterations on 24 pool images" in results["embed/bootstrap"].notes[0]
    vecs = np.concatenate([np.load(p) for p in sorted(emb.glob("part-*.npy"))])
    assert vecs.shape == (30, 96) and np.allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1, atol=1e-2)
    assert len({v.tobytes() for v in vecs}) >= 25  # not a constant: distinct images, (mostly) distinct features

    # a crash after training: the rerun embeds again without training again, with identical output
    before = {p.name: p.read_bytes() for p in emb.glob("part-*")}
    mtime = teacher.stat().st_mtime_ns
    (emb / "_MANIFEST.json").unlink()
    for p in emb.glob("part-*"):
        p.unlink()
    run_pipeline(cfg, until="embed")
    assert teacher.stat().st_mtime_ns == mtime
    assert {p.name: p.read_bytes() for p in emb.glob("part-*")} == before


def test_bootstrap_settings_are_part_of_the_key(tmp_path):
    import pytest

    from pipelines.manifest import StageConflict

    run_pipeline(_cfg(tmp_path), until="embed")
    with pytest.raises(StageConflict):
        run_pipeline(_cfg(tmp_path, sample=20), until="embed")
