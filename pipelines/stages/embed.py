"""embed: every kept record through a vision model, float16 parts aligned with the ingest parts; the
main embedding plus `extra_embeds` (DINOv2 used a copy descriptor for dedup and a semantic model for
clustering)."""

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
    if precision == "auto":  # resolved, so a run resumed on another kind of device cannot mix parts
        precision = "bf16" if resolve_device(ec.device).type == "cuda" else "fp32"
    key = fingerprint({"model": _model_fingerprint(ec.model), "precision": precision, "inputs": inputs})
    d = embedding_dir(cfg)
    prev = begin(f"embed/{d.name}", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    jobs = embed_jobs(cfg)
    todo = [(k, rows) for k, rows in jobs if not part_done(d, k)]
    settings = EmbedSettings(batch_size=ec.batch_size, num_workers=ec.num_workers, device=ec.device,
                             precision=ec.precision, threads=ec.threads)
    raw_root = str(stage_dir(cfg, "ingest"))
    with progress(sum(len(r) for _, r in jobs), f"embed {d.name}", "img") as bar:
        bar.update(sum(len(r) for _, r in jobs) - sum(len(r) for _, r in todo))
        if cfg.executor == "ray" and todo:
            from pipelines.executors import ray_embed

            ids = dict((k, [r["id"] for r in rows]) for k, rows in todo)
            for k, vecs, errs in ray_embed(ec.model, asdict(settings), todo, raw_root, ec.ray_actors,
                                           ec.ray_gpus_per_actor, cfg.ray_address):
                write_part(d, k, ids[k], vecs, errs)
                bar.update(len(errs))
        elif todo:
            emb = load_embedder(ec.model, resolve_device(ec.device))
            embed_parts(todo, raw_root, d, emb.model, emb.transform, emb.dim, settings,
                        on_part=lambda k, n: bar.update(n))
    statuses = pq.ParquetDataset([str(p) for p in list_parts(d)]).read(columns=["status"]).column("status")
    n_ok = pc.sum(pc.equal(statuses, "ok")).as_py() or 0
    dim = _dim(d)
    result = StageResult(f"embed/{d.name}", str(d), key, counts={
        "in": len(statuses), "out": n_ok, "dropped": {"embed_error": len(statuses) - n_ok} if len(statuses) > n_ok else {},
        "dim": dim}, seconds=time.time() - t0, outputs={"embeddings": str(d)})
    finish(result, asdict(ec), inputs)
    return result


def run(cfg: Config, force: bool = False) -> list[StageResult]:
    """The main embedding, then each of cfg.extra_embeds (name them and point dedup/cluster at them)."""
    from dataclasses import replace

    return [run_one(c, force) for c in [cfg, *(replace(cfg, embed=e) for e in cfg.extra_embeds)]]


def _dim(d: Path) -> int:
    import numpy as np

    parts = sorted(d.glob("part-*.npy"))
    return int(np.load(parts[0], mmap_mode="r").shape[1]) if parts else 0
