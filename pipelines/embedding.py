"""Embedders as pipelines/ sees them: the library registry plus our own trainer's checkpoints.

`curate/` never imports `train/`, so the `checkpoint:` spec kind is registered here, and every
runner (and the Ray actors) loads models through `load_embedder` below. Also: where an embedding
lives, which finished one a stage uses, and embedding a reference set (evaluation or seed images)
with the model of a pool embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.config import Config
from pipelines.framework import check_settings, source_fingerprint, stage_dir
from pipelines.manifest import read_manifest


def _trainer_checkpoint(args: list[str]):
    """`checkpoint:<teacher_backbone.pt>`: a teacher backbone saved by our trainer (train/)."""
    from curate.embedders import eval_transform
    from train.models import load_backbone

    model = load_backbone(args[0])
    return model, eval_transform(model.image_size, model.mean, model.std)


def load_embedder(spec: str, device="cpu"):
    """curate.embedders.load_embedder with the trainer's `checkpoint:` kind registered."""
    from curate import embedders

    embedders.register_kind("checkpoint", _trainer_checkpoint, "checkpoint:<teacher_backbone.pt>")
    return embedders.load_embedder(spec, device)


def embedding_dir(cfg: Config, name: str | None = None) -> Path:
    """`<workdir>/embed/<name>`; the name defaults to a slug of the model spec."""
    name = name or cfg.embed.name
    if not name:  # curate.embedders imports torch (~450 MB resident): only when the slug is needed
        from curate.embedders import slug

        name = slug(cfg.embed.model)
    return stage_dir(cfg, "embed") / name


def resolve_embedding(cfg: Config, name: str | None) -> Path:
    """The finished embedding to use: the named one, else the configured model's, else the only one."""
    d = embedding_dir(cfg, name)
    if read_manifest(d) is not None:
        return d
    if name:
        raise RuntimeError(f"embedding {name!r} has not finished in {cfg.workdir}; run `curate embed --name {name}`")
    done = sorted(p for p in stage_dir(cfg, "embed").glob("*") if read_manifest(p) is not None)
    if len(done) == 1:
        return done[0]
    names = ", ".join(p.name for p in done) or "none"
    raise RuntimeError(f"no embedding chosen in {cfg.workdir} (finished: {names}); "
                       "name one (dedup and cluster: --embedding NAME; in a config or with --set: dedup.embedding, "
                       "cluster.embedding) or run `curate embed` first")


def embed_reference_set(cfg: Config, emb_dir: Path, name: str, source: str, out: Path) -> tuple[np.ndarray, list[str]]:
    """Ingest a reference set (evaluation or seed images) into out/ingest and embed its ok images with
    the model of the embedding in `emb_dir`; cached (ids first, vectors last as the marker), keyed by
    model and source."""
    import shutil

    from curate.embed import EmbedSettings, embed_rows, resolve_device
    from curate.ingest import IngestSettings, ingest
    from curate.parts import atomic_path, read_table, write_json_atomic

    model = read_manifest(emb_dir)["config"]["model"]
    check = check_settings(cfg)
    stamp = {"model": model, "source": source_fingerprint(source), "check": asdict(check)}
    vec_path, ids_path = out / "vectors.npy", out / "ids.json"
    if vec_path.exists() and ids_path.exists():
        cached = json.loads(ids_path.read_text())
        if cached.get("stamp") == stamp:
            return np.load(vec_path), cached["ids"]
    if out.exists():
        shutil.rmtree(out)
    settings = IngestSettings(workers=1, check=check)
    ingest([source], out / "ingest", settings)
    rows = [r for r in read_table(out / "ingest").to_pylist() if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"seed/eval set {name!r} ({source}) holds no usable image")
    ec = cfg.embed
    emb = load_embedder(model, resolve_device(ec.device))
    vecs, errors = embed_rows(rows, out / "ingest", emb.model, emb.transform, emb.dim,
                              EmbedSettings(batch_size=ec.batch_size, num_workers=0, device=ec.device,
                                            precision=ec.precision, threads=ec.threads))
    keep = [i for i, e in enumerate(errors) if not e]
    vecs, ids = vecs[keep], [rows[i]["id"] for i in keep]
    write_json_atomic(ids_path, {"stamp": stamp, "ids": ids})
    with atomic_path(vec_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vecs)
    return vecs, ids
