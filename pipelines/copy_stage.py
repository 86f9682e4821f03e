"""The dedup (embedding copy detection), decontaminate and calibration runners."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.parts import read_table, write_json_atomic, write_table_atomic
from pipelines.aligned import embedding_ids, write_by_id
from pipelines.cluster_stage import resolve_embedding
from pipelines.config import Config, fingerprint
from pipelines.manifest import StageResult, begin, finish, read_manifest
from pipelines.stages import _upstream, finished_filters, stage_dir


def _pixels(cfg: Config, ids: list[str]) -> np.ndarray:
    t = read_table(stage_dir(cfg, "ingest"), columns=["id", "width", "height"]).to_pylist()
    px = {r["id"]: (r["width"] or 0) * (r["height"] or 0) for r in t}
    return np.array([px.get(x, 0) for x in ids], dtype=np.int64)


def _index_spec(cfg: Config):
    from curate.index import IndexSpec

    return IndexSpec(kind=cfg.dedup.index, nprobe=cfg.dedup.nprobe)


def _ray_edges(emb_dir: Path, index, dc, work: Path, address: str | None):
    """k-NN graph queries spread over Ray tasks (each loads the saved index); edges merged."""
    import ray

    from curate.dedup import merge_edges
    from curate.index import EmbeddingParts
    from pipelines.executors import init_ray

    init_ray(address)
    path = work / "_index.faiss"
    index.save(path)
    n = EmbeddingParts(emb_dir).n
    tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    bounds = np.linspace(0, n, tasks + 1).astype(int)

    @ray.remote(num_cpus=1)
    def edges(lo: int, hi: int):
        from curate.dedup import knn_edges
        from curate.index import VectorIndex

        return knn_edges(str(emb_dir), dc.k, dc.threshold, index=VectorIndex.load(path), query_rows=(lo, hi))

    out = ray.get([edges.remote(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo])
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
    return merge_edges(*out)


def run_dedup(cfg: Config, force: bool = False) -> StageResult:
    """Copy groups over an embedding: `copy_of` (keeper id), `copy_group`, `copy_max_sim`."""
    from curate.dedup import copy_dedup, pool_index

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    inputs = {**_upstream(cfg, "ingest"), "embedding": read_manifest(emb_dir)["key"]}
    config = {k: v for k, v in asdict(dc).items() if k not in ("calibrate_sample", "target_precision", "max_component")}
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "dedup")
    prev = begin("dedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    ids = embedding_ids(emb_dir)
    edges = None
    if cfg.executor == "ray":
        edges = _ray_edges(emb_dir, pool_index(_as_parts(emb_dir), _index_spec(cfg)), dc, d, cfg.ray_address)
    res = copy_dedup(str(emb_dir), ids, _pixels(cfg, ids), k=dc.k, threshold=dc.threshold,
                     max_component=dc.max_component, index_spec=_index_spec(cfg), edges=edges)
    write_by_id(stage_dir(cfg, "ingest"), d, ids, {
        "copy_of": (res.dup_of, pa.string()), "copy_group": (res.group, pa.int64()),
        "copy_max_sim": (res.max_sim, pa.float32())})
    write_table_atomic(res.groups, d / "groups.parquet")
    st = res.stats
    counts = {"in": st["n"], "out": st["kept"], "dropped": {"copy_duplicate": st["dropped"]} if st["dropped"] else {},
              "groups": st["groups"], "pairs": st["pairs"], "largest_component": st["largest_component"]}
    if res.warning:
        counts["warning"] = res.warning
    result = StageResult("dedup", str(d), key, counts=counts, seconds=time.time() - t0,
                         outputs={"records": str(d), "groups": str(d / "groups.parquet")})
    finish(result, {**config, "stats": st}, inputs)
    return result


def _as_parts(emb_dir: Path):
    from curate.dedup import as_parts

    return as_parts(str(emb_dir))


def _ok_rows(emb_dir: Path) -> np.ndarray:
    from curate.dedup import valid_rows

    return np.flatnonzero(valid_rows(_as_parts(emb_dir)))


def run_decontaminate(cfg: Config, force: bool = False) -> StageResult:
    """Drop pool images that copy an evaluation image (cosine > threshold) and their component."""
    from curate.dedup import decontaminate
    from pipelines.seeds import embed_folder_set

    xc = cfg.decontaminate
    if not xc.eval_sets:
        raise ValueError("no evaluation sets: give --eval-set NAME=SOURCE (or decontaminate.eval_sets)")
    emb_dir = resolve_embedding(cfg, cfg.dedup.embedding)
    with_groups = "dedup" in finished_filters(cfg)  # copy dedup enabled and done
    inputs = {**_upstream(cfg, "ingest", *(["dedup"] if with_groups else [])), "embedding": read_manifest(emb_dir)["key"]}
    key = fingerprint({"config": asdict(xc), "inputs": inputs})
    d = stage_dir(cfg, "decontaminate")
    prev = begin("decontaminate", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    ids = embedding_ids(emb_dir)
    pool_groups = None  # without copy dedup every image is its own component
    if with_groups:
        groups = {r["id"]: r["copy_group"] for r in read_table(stage_dir(cfg, "dedup"), ["id", "copy_group"]).to_pylist()}
        pool_groups = np.array([groups.get(x) if groups.get(x) is not None else -1 for x in ids], dtype=np.int64)
    eval_sets = {s.name: embed_folder_set(cfg, emb_dir, s.name, s.source, d / "eval_sets" / s.name)
                 for s in xc.eval_sets}
    res = decontaminate(str(emb_dir), ids, pool_groups, eval_sets, threshold=xc.threshold, index_spec=_index_spec(cfg))
    removed_by: dict[str, str] = {}
    for name, table in res.removed.items():
        for r in table.to_pylist():
            removed_by.setdefault(r["pool_id"], name)
        write_table_atomic(res.pairs[name], d / f"matches-{name}.parquet")
    write_by_id(stage_dir(cfg, "ingest"), d, ids, {
        "contaminated": (~res.keep, pa.bool_()), "contam_reason": (res.reason, pa.string()),
        "contam_set": ([removed_by.get(x) for x in ids], pa.string())})
    # counted over the records that survived copy dedup, so the funnel chains stage to stage
    alive = np.ones(len(ids), dtype=bool)
    if with_groups:
        copy_of = {r["id"]: r["copy_of"] for r in read_table(stage_dir(cfg, "dedup"), ["id", "copy_of"]).to_pylist()}
        alive = np.array([copy_of.get(x) is None for x in ids], dtype=bool)
    removed = alive & ~res.keep
    reasons = {f"contaminated_{r}": int(sum(1 for x, a in zip(res.reason, removed) if a and x == r))
               for r in ("direct", "component")}
    result = StageResult("decontaminate", str(d), key, counts={
        "in": int(alive.sum()), "out": int(alive.sum() - removed.sum()), "dropped": {k: v for k, v in reasons.items() if v}},
        seconds=time.time() - t0, outputs={"records": str(d), "matches": str(d / "matches-<set>.parquet")})
    finish(result, {**asdict(xc), "stats": res.stats}, inputs)
    return result


def run_calibration(cfg: Config) -> dict:
    """Edited copies of a pool sample -> precision/recall per threshold and a recommended threshold."""
    from PIL import Image, ImageOps

    from curate.calibrate import evaluate_embedder, make_calibration_set
    from curate.embed import _autocast, resolve_device
    from curate.images import to_rgb
    from curate.tars import TarReader
    from pipelines.embedding import load_embedder

    import io
    import torch

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    model = read_manifest(emb_dir)["config"]["model"]
    ids = np.array(embedding_ids(emb_dir), dtype=object)[_ok_rows(emb_dir)]
    rng = np.random.default_rng(0)
    chosen = set(rng.choice(ids, min(dc.calibrate_sample, len(ids)), replace=False).tolist())
    rows = [r for r in read_table(stage_dir(cfg, "ingest")).to_pylist() if r["id"] in chosen]
    with TarReader(stage_dir(cfg, "ingest")) as reader:
        originals = []
        for r in rows:
            with Image.open(io.BytesIO(reader.read(r["raw_shard"], r["raw_offset"], r["nbytes"]))) as img:
                originals.append(to_rgb(ImageOps.exif_transpose(img)).copy())
    copies = make_calibration_set(originals, seed=0)
    device = resolve_device(cfg.embed.device)
    emb = load_embedder(model, device)

    def embed(images: list) -> np.ndarray:
        out = []
        with torch.inference_mode(), _autocast(device, cfg.embed.precision):
            for s in range(0, len(images), cfg.embed.batch_size):
                x = torch.stack([emb.transform(im) for im in images[s:s + cfg.embed.batch_size]]).to(device)
                out.append(torch.nn.functional.normalize(emb.model(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    report = evaluate_embedder(embed, originals, copies, target_precision=dc.target_precision)
    summary = report.summary()
    out = stage_dir(cfg, "dedup_calibration")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{emb_dir.name}.json", summary)
    write_table_atomic(report.table.to_arrow(), out / f"{emb_dir.name}.parquet")
    return {"model": model, "path": str(out / f"{emb_dir.name}.json"), **summary}
