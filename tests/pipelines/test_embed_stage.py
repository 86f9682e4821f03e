"""The embed stage: alignment with records, invariance to batching and workers, resume, bad samples."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.parts import read_table
from pipelines.synth import encode, make_image
from pipelines.config import load_config
from pipelines.embedding import embedding_dir
from pipelines.stages.embed import embed_jobs
from pipelines.stages.embed import run_one as run_embed
from pipelines.stages.hashdedup import run as run_hashdedup
from pipelines.stages.ingest import run as run_ingest


@pytest.fixture
def workdir(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(30):
        data = encode(make_image(700 + i, (80 + i, 72)), "JPEG" if i % 2 else "PNG")
        (raw / f"{i:03d}.img").write_bytes(data)
        if i % 10 == 0:
            (raw / f"{i:03d}-copy.img").write_bytes(data)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "ingest.part_size=9", "ingest.workers=1"])
    cfg.ingest.sources = [str(raw)]
    run_ingest(cfg)
    run_hashdedup(cfg)
    # a sample that slipped through ingest: its raw bytes get corrupted afterwards
    rec = read_table(tmp_path / "w" / "ingest").to_pylist()[4]
    with open(tmp_path / "w" / "ingest" / rec["raw_shard"], "r+b") as fh:
        fh.seek(rec["raw_offset"])
        fh.write(b"\x00" * 32)
    return cfg, rec["id"]


def _load(d):
    ids, status, vecs = [], [], []
    for p in sorted(d.glob("part-*.parquet")):
        t = pq.read_table(p)
        ids += t.column("id").to_pylist()
        status += t.column("status").to_pylist()
        vecs.append(np.load(p.with_suffix(".npy")))
    return ids, status, np.concatenate(vecs).astype(np.float32)


def test_embeddings_align_with_kept_records_and_bad_samples_are_recorded(workdir):
    cfg, bad_id = workdir
    cfg.embed.model, cfg.embed.num_workers = "pixels:8", 0
    res = run_embed(cfg)
    assert res.counts["in"] == 30 and res.counts["out"] == 29 and res.counts["dropped"] == {"embed_error": 1}
    ids, status, vecs = _load(embedding_dir(cfg))
    want = [r["id"] for _, rows in embed_jobs(cfg) for r in rows]
    assert ids == want and len(ids) == 30  # 33 files, 3 exact copies skipped
    for part in sorted(embedding_dir(cfg).glob("part-*.npy")):
        assert np.load(part).dtype == np.float16
    norms = np.linalg.norm(vecs, axis=1)
    bad = ids.index(bad_id)
    assert status[bad] == "embed_error" and norms[bad] == 0
    assert np.allclose(np.delete(norms, bad), 1.0, atol=2e-3)
    assert run_embed(cfg).skipped


def test_same_vectors_whatever_batch_size_and_workers(workdir):
    cfg, _ = workdir
    out = {}
    for name, bs, nw in (("a", 1, 0), ("b", 7, 2), ("c", 64, 1)):
        cfg.embed.model, cfg.embed.name, cfg.embed.batch_size, cfg.embed.num_workers = "pixels:12", name, bs, nw
        run_embed(cfg)
        out[name] = _load(embedding_dir(cfg))
    assert out["a"][0] == out["b"][0] == out["c"][0]
    assert np.abs(out["a"][2] - out["b"][2]).max() <= 1e-3 and np.abs(out["a"][2] - out["c"][2]).max() <= 1e-3


def test_timm_vit_is_batch_invariant_within_float16(workdir, tmp_path):
    import timm
    import torch

    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), tmp_path / "w.pth")
    cfg, _ = workdir
    cfg.embed.model, cfg.embed.num_workers = f"timm:test_vit:{tmp_path / 'w.pth'}", 0
    res = {}
    for bs in (1, 16):
        cfg.embed.name, cfg.embed.batch_size = f"vit{bs}", bs
        run_embed(cfg)
        res[bs] = _load(embedding_dir(cfg))
    assert res[1][0] == res[16][0]
    assert np.abs(res[1][2] - res[16][2]).max() <= 2e-3


def test_resume_recomputes_only_missing_parts_and_stays_aligned(workdir):
    cfg, _ = workdir
    cfg.embed.model, cfg.embed.num_workers = "pixels:8", 0
    run_embed(cfg)
    d = embedding_dir(cfg)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.glob("part-*")}
    (d / "_MANIFEST.json").unlink()  # as if killed before the end
    (d / "part-00002.parquet").unlink()  # part 2 unfinished: its .npy may exist without the marker
    (d / ".part-00003.npy.tmp-0000").write_bytes(b"partial")
    run_embed(cfg)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.glob("part-*")}
    assert {n: v[1] for n, v in after.items()} == {n: v[1] for n, v in before.items()}
    changed = sorted(n for n in after if after[n][0] != before[n][0])
    assert changed == ["part-00002.npy", "part-00002.parquet"]
    ids, _, vecs = _load(d)
    assert ids == [r["id"] for _, rows in embed_jobs(cfg) for r in rows] and len(vecs) == len(ids)


def test_a_sample_that_failed_to_embed_is_dropped_downstream_with_its_reason(workdir):
    """No copy or evaluation check saw it: it is dropped at cluster (embed_error, counts reconcile)
    and never reaches the curated shards, with or without a balanced selection."""
    from pipelines.config import LevelConfig
    from pipelines.run import run_stage

    cfg, bad_id = workdir
    cfg.embed.model, cfg.embed.num_workers = "pixels:8", 0
    cfg.dedup.verify, cfg.dedup.threshold = "none", 0.999
    cfg.cluster.levels = [LevelConfig(3, n_iters=3)]
    run_embed(cfg)
    (dedup,) = run_stage("dedup", cfg)
    (cluster,) = run_stage("cluster", cfg)
    assert cluster.counts["dropped"] == {"embed_error": 1}
    assert cluster.counts["in"] == dedup.counts["out"] and cluster.counts["out"] == cluster.counts["in"] - 1
    (shards,) = run_stage("shards", cfg)
    index = pq.read_table(cfg.workdir + "/shards/index.parquet").column("id").to_pylist()
    assert bad_id not in index and shards.counts["out"] == dedup.counts["out"] - 1
