"""Seed sets for retrieval: each is ingested and embedded with the pool's model (cached under
`balance/seeds/<name>/`), then `curate.balance.retrieve` picks pool images near them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from curate.ingest import IngestSettings, ingest
from curate.parts import read_table
from pipelines.aligned import embedding_ids
from pipelines.config import Config
from pipelines.manifest import read_manifest
from pipelines.cluster_stage import resolve_embedding
from pipelines.stages import stage_dir


def embed_folder_set(cfg: Config, emb_dir: Path, name: str, source: str, out: Path) -> tuple[np.ndarray, list[str]]:
    """Ingest `source` into out/ingest and embed its ok images with the model of the embedding in
    `emb_dir`; cached (ids written first, vectors last as the marker), keyed by model and source."""
    from curate.embed import EmbedSettings, embed_rows, resolve_device
    from curate.images import CheckSettings
    from curate.parts import atomic_path, write_json_atomic
    from pipelines.embedding import load_embedder
    from pipelines.stages import _source_fingerprint

    model = read_manifest(emb_dir)["config"]["model"]
    stamp = {"model": model, "source": _source_fingerprint(source)}
    vec_path, ids_path = out / "vectors.npy", out / "ids.json"
    if vec_path.exists() and ids_path.exists():
        cached = json.loads(ids_path.read_text())
        if cached.get("stamp") == stamp:
            return np.load(vec_path), cached["ids"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ic = cfg.ingest
    settings = IngestSettings(workers=1, check=CheckSettings(min_side=ic.min_side, max_pixels=ic.max_pixels,
                                                              max_bytes=ic.max_file_bytes))
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


def retrieve_seeds(cfg: Config, pool_ids: list[str], pool_l1: np.ndarray):
    """Retrieved pool rows (indexes into pool_ids) with their seed set, seed id and similarity."""
    from curate.balance import retrieve
    from curate.index import build_index
    from curate.kmeans import ArrayVectors

    bc = cfg.balance
    emb_dir = resolve_embedding(cfg, cfg.cluster.embedding)
    all_ids = embedding_ids(emb_dir)
    row_of = {x: i for i, x in enumerate(all_ids)}
    rows = np.array([row_of[x] for x in pool_ids], dtype=np.int64)
    pool = ArrayVectors.from_dir(emb_dir).take(rows)
    index = build_index(pool, log=lambda m: None)
    sets, ids = {}, {}
    for s in bc.seeds:
        sets[s.name], ids[s.name] = embed_folder_set(cfg, emb_dir, s.name, s.source,
                                                     stage_dir(cfg, "balance") / "seeds" / s.name)
    res = retrieve(sets, knn=index.knn, pool=pool, pool_labels=pool_l1,
                   pool_centroids=np.load(stage_dir(cfg, "cluster") / "centroids_l1.npy"),
                   cluster_max_seeds=bc.seed_cluster_max, n_per_seed={s.name: s.n_per_seed for s in bc.seeds},
                   min_seeds=bc.seed_min_per_cluster, per_cluster=bc.seed_per_cluster,
                   max_per_set={s.name: s.max_images for s in bc.seeds}, seed=bc.seed, seed_ids=ids)
    return res.rows, res.seed_set, res.seed_id, res.sim, res.report
