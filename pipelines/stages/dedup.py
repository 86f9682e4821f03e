"""dedup: copy detection over an embedding (k-NN graph, cosine > threshold, connected components);
writes `copy_of` (keeper id), `copy_group`, `copy_max_sim` and `groups.parquet`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import write_table_atomic
from pipelines.aligned import RowMap, embedding_ids
from pipelines.config import Config, fingerprint
from pipelines.embedding import resolve_embedding
from pipelines.framework import stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def index_spec(cfg: Config):
    """The index the copy graph and decontamination search (cfg.dedup.index, nprobe)."""
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


def run(cfg: Config, force: bool = False) -> StageResult:
    """Copy groups over an embedding: `copy_of` (keeper id), `copy_group`, `copy_max_sim`."""
    from curate.dedup import as_parts, copy_dedup, pool_index

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    inputs = {**upstream(cfg, "ingest"), "embedding": read_manifest(emb_dir)["key"]}
    config = {k: v for k, v in asdict(dc).items() if k not in ("calibrate_sample", "target_precision", "max_component")}
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "dedup")
    prev = begin("dedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    ids = embedding_ids(emb_dir)
    rows = RowMap(stage_dir(cfg, "ingest"), emb_dir)
    ingest = stage_dir(cfg, "ingest")
    width, height = (pc.fill_null(rows.column(ingest, c), 0).to_numpy().astype(np.int64) for c in ("width", "height"))
    pixels = (width * height)[rows.emb_rows]
    edges = None
    if cfg.executor == "ray":
        edges = _ray_edges(emb_dir, pool_index(as_parts(str(emb_dir)), index_spec(cfg)), dc, d, cfg.ray_address)
    res = copy_dedup(str(emb_dir), ids, pixels, k=dc.k, threshold=dc.threshold,
                     max_component=dc.max_component, index_spec=index_spec(cfg), edges=edges)
    rows.write(d, rows.emb_rows, {
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
