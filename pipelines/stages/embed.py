"""embed: every kept record through a vision model, float16 parts aligned with the ingest parts; the
main embedding plus `extra_embeds` (DINOv2 used a copy descriptor for dedup and a semantic model for
clustering). `bootstrap[:<trainer config>]` first trains our own small DINOv2 ViT on a sample of the
pool (for pools where no pretrained model can be loaded) and embeds with its teacher."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import list_parts, read_aligned
from pipelines.config import Config, fingerprint
from pipelines.embedding import embedding_dir
from pipelines.framework import progress, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish

ROW_COLUMNS = ["id", "raw_shard", "raw_offset", "nbytes"]


def _model_fingerprint(spec: str) -> dict:
    """The spec, plus size and mtime of any weights file it names (new weights -> new embeddings)."""
    from curate.embedders import split_spec

    out: dict = {"spec": spec}
    for arg in split_spec(spec)[1]:
        if os.path.isfile(arg):
            st = os.stat(arg)
            out[arg] = [st.st_size, st.st_mtime_ns]
    return out


def embed_jobs(cfg: Config) -> list[tuple[int, list[dict]]]:
    """Per ingest part: the rows to embed (ok records that are not hash duplicates)."""
    dirs = [stage_dir(cfg, "ingest"), stage_dir(cfg, "hashdedup")]
    jobs = []
    for k in range(len(list_parts(dirs[0]))):
        t = read_aligned(dirs, k, {str(dirs[0]): ROW_COLUMNS + ["status"], str(dirs[1]): ["dup_of"]})
        keep = pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of")))
        jobs.append((k, t.filter(keep).select(ROW_COLUMNS).to_pylist()))
    return jobs


def run_one(cfg: Config, force: bool = False) -> StageResult:
    """Embed every kept record with cfg.embed.model into float16 parts aligned with id parts."""
    from curate.embed import EmbedSettings, embed_parts, part_done, resolve_device, write_part
    from pipelines.embedding import load_embedder

    ec = cfg.embed
    inputs = upstream(cfg, "ingest", "hashdedup")
    precision = ec.precision
    if precision == "auto":  # resolved on the driver, so a run resumed on another kind of device cannot mix parts
        precision = "bf16" if resolve_device(ec.device).type == "cuda" else "fp32"
    bootstrap = ec.model.split(":")[0] == "bootstrap"
    model = {"bootstrap": [ec.model, ec.bootstrap_sample, list(ec.bootstrap_overrides)]} if bootstrap else \
        _model_fingerprint(ec.model)
    key = fingerprint({"model": model, "precision": precision, "inputs": inputs})
    d = embedding_dir(cfg)
    prev = begin(f"embed/{d.name}", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    spec = ec.model
    notes = []
    if bootstrap:
        spec, note = _bootstrap(cfg, d / "_bootstrap")
        notes.append(note)
    jobs = embed_jobs(cfg)
    todo = [(k, rows) for k, rows in jobs if not part_done(d, k)]
    # the precision of the key, so Ray actors on other hardware than the driver cannot write parts of
    # another precision under it (with GPU actors and a CPU driver, set embed.precision=bf16)
    settings = EmbedSettings(batch_size=ec.batch_size, num_workers=ec.num_workers, device=ec.device,
                             precision=precision, threads=ec.threads)
    raw_root = str(stage_dir(cfg, "ingest"))
    with progress(sum(len(r) for _, r in jobs), f"embed {d.name}", "img") as bar:
        bar.update(sum(len(r) for _, r in jobs) - sum(len(r) for _, r in todo))
        if cfg.executor == "ray" and todo:
            from pipelines.executors import ray_embed

            ids = dict((k, [r["id"] for r in rows]) for k, rows in todo)
            for k, vecs, errs in ray_embed(spec, asdict(settings), todo, raw_root, ec.ray_actors,
                                           ec.ray_gpus_per_actor, cfg.ray_address):
                write_part(d, k, ids[k], vecs, errs)
                bar.update(len(errs))
        elif todo:
            emb = load_embedder(spec, resolve_device(ec.device))
            embed_parts(todo, raw_root, d, emb.model, emb.transform, emb.dim, settings,
                        on_part=lambda k, n: bar.update(n))
    statuses = pq.ParquetDataset([str(p) for p in list_parts(d)]).read(columns=["status"]).column("status")
    n_ok = pc.sum(pc.equal(statuses, "ok")).as_py() or 0
    dim = _dim(d)
    result = StageResult(f"embed/{d.name}", str(d), key, counts={
        "in": len(statuses), "out": n_ok, "dropped": {"embed_error": len(statuses) - n_ok} if len(statuses) > n_ok else {},
        "dim": dim}, seconds=time.time() - t0, outputs={"embeddings": str(d)}, notes=notes)
    finish(result, {**asdict(ec), **({"bootstrap_teacher": spec} if bootstrap else {})}, inputs)
    return result


BOOTSTRAP_CONFIG = "tiny"  # the trainer preset a bare `bootstrap` spec trains


def _bootstrap(cfg: Config, work: Path) -> tuple[str, str]:
    """Train (or resume training) a small DINOv2 ViT on a seeded sample of the kept records; returns the
    `checkpoint:` spec of its teacher and a note for the summary. Every step resumes: the sample's
    shards are written shard by shard, the trainer resumes from its last checkpoint."""
    import numpy as np
    import pyarrow as pa

    from curate.shards import ShardSettings, write_shards
    from train.cli import resolve_config_path
    from train.config import load_config as load_train_config
    from train.loop import train

    ec = cfg.embed
    args = [a for a in ec.model.split(":")[1:] if a]
    shards, out = work / "shards", work / "train"
    if not (shards / "index.parquet").exists():
        dirs = [stage_dir(cfg, "ingest"), stage_dir(cfg, "hashdedup")]
        kept = []
        for k in range(len(list_parts(dirs[0]))):
            t = read_aligned(dirs, k)
            kept.append(t.filter(pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of")))))
        records = pa.concat_tables(kept, promote_options="permissive")
        if records.num_rows == 0:
            raise ValueError("bootstrap: the pool has no kept image to train on")
        rng = np.random.default_rng(0)
        take = np.sort(rng.choice(records.num_rows, min(ec.bootstrap_sample, records.num_rows), replace=False))
        write_shards(records.take(pa.array(take)), stage_dir(cfg, "ingest"), shards, ShardSettings(shuffle_seed=0))
    tcfg = load_train_config(resolve_config_path(args[0] if args else BOOTSTRAP_CONFIG),
                             [f"data.path={shards}", f"output_dir={out}", "progress=false",
                              *ec.bootstrap_overrides])
    summary = train(tcfg)
    note = (f"bootstrap: trained {args[0] if args else BOOTSTRAP_CONFIG} for {summary['iterations']} iterations "
            f"on {pq.read_metadata(shards / 'index.parquet').num_rows:,} pool images; teacher {out / 'teacher_backbone.pt'}")
    return f"checkpoint:{out / 'teacher_backbone.pt'}", note


def run(cfg: Config, force: bool = False) -> list[StageResult]:
    """The main embedding, then each of cfg.extra_embeds (name them and point dedup/cluster at them)."""
    from dataclasses import replace

    return [run_one(c, force) for c in [cfg, *(replace(cfg, embed=e) for e in cfg.extra_embeds)]]


def _dim(d: Path) -> int:
    import numpy as np

    parts = sorted(d.glob("part-*.npy"))
    return int(np.load(parts[0], mmap_mode="r").shape[1]) if parts else 0
