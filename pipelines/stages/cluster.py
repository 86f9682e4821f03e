"""cluster: hierarchical k-means over an embedding (local, or Lloyd passes spread over Ray):
`cluster_l1..lN` and `cluster_sq_dist` per record, `centroids_lK.npy` per level."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.aligned import RowMap, embedding_status
from pipelines.config import Config, fingerprint
from pipelines.embedding import resolve_embedding
from pipelines.framework import DROP_FILTERS, dropped_by, finished_filters, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _valid(cfg: Config, emb_dir: Path, rows: RowMap) -> tuple[np.ndarray, int]:
    """Rows of the embedding to cluster: embedded fine, and not dropped by copy dedup or
    decontamination (when those ran), so balancing picks only images that reach the shards; and how
    many rows the filters let through (the stage's "in": those that failed to embed drop here)."""
    keep = np.ones(len(rows.emb_rows), dtype=bool)
    for stage in finished_filters(cfg):
        dropped = dropped_by(stage, rows.column(stage_dir(cfg, stage), DROP_FILTERS[stage][0]))
        keep &= ~dropped.to_numpy(zero_copy_only=False).astype(bool)[rows.emb_rows]
    return np.flatnonzero(keep & embedding_status(emb_dir)), int(keep.sum())


def _ray_step_fn(emb_dir: Path, valid: np.ndarray, chunk: int, address: str | None):
    """A Lloyd pass as Ray tasks, one per embedding part; the driver adds the parts' statistics in part
    order as they arrive (the same sums as local), holding only those that arrive ahead of their turn."""
    import ray

    from curate.index import EmbeddingParts
    from curate.kmeans import StepAccumulator
    from pipelines.executors import init_ray

    init_ray(address)
    parts = EmbeddingParts(emb_dir)  # parts in numeric order, with their row offsets
    paths, offsets = [str(p) for p in parts.paths], np.asarray(parts.offsets)
    jobs = []
    for p, lo, hi in zip(paths, offsets[:-1], offsets[1:]):
        a, b = np.searchsorted(valid, [lo, hi])
        if b > a:  # the part's valid rows go to the object store once, not with every pass
            jobs.append((p, ray.put(valid[a:b] - lo), int(a)))

    @ray.remote(num_cpus=1)
    def part_pass(path, rows, offset, centroids):
        from curate.kmeans import part_step

        x = np.load(path, mmap_mode="r")[rows]
        return part_step(x, centroids, offset, chunk)

    def step(centroids: np.ndarray):
        ref = ray.put(centroids)
        refs = [part_pass.remote(p, r, o, ref) for p, r, o in jobs]
        position = {r: i for i, r in enumerate(refs)}
        total = StepAccumulator(len(centroids), centroids.shape[1])
        labels, dists, early, turn, waiting = [None] * len(refs), [None] * len(refs), {}, 0, refs
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            i = position[ready[0]]
            early[i], labels[i], dists[i] = ray.get(ready[0])
            while turn in early:
                total.add_stats(early.pop(turn))
                turn += 1
        return total.result(), np.concatenate(labels), np.concatenate(dists)

    return step


def run(cfg: Config, force: bool = False) -> StageResult:
    """Hierarchical k-means: cluster_l1..lN of every embedded record, centroids per level."""
    from curate.kmeans_tree import LevelSpec, hierarchical_kmeans
    from curate.vectors import EmbeddingParts

    cc = cfg.cluster
    emb_dir = resolve_embedding(cfg, cc.embedding)
    inputs = {**upstream(cfg, "ingest", *finished_filters(cfg)), "embedding": read_manifest(emb_dir)["key"]}
    config = {k: v for k, v in asdict(cc).items() if k != "chunk_size"}  # chunking does not change results
    for lv in config["levels"]:  # the default split_assign stays out of the key (keys made before it stay valid)
        if lv.get("split_assign") == "global":
            del lv["split_assign"]
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "cluster")
    prev = begin("cluster", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    rows = RowMap(stage_dir(cfg, "ingest"), emb_dir)
    valid, n_in = _valid(cfg, emb_dir, rows)
    base = EmbeddingParts(emb_dir)
    vectors = base if len(valid) == base.n else base.subset(valid)
    levels = [LevelSpec(**asdict(lv)) for lv in cc.levels]
    if len(valid) < levels[0].n_clusters:
        raise ValueError(f"{len(valid)} embedded images cannot make {levels[0].n_clusters} level-1 clusters; "
                         "lower cluster.levels")
    step_fn = _ray_step_fn(emb_dir, valid, cc.chunk_size, cfg.ray_address) if cfg.executor == "ray" else None
    tree = hierarchical_kmeans(vectors, levels, seed=cc.seed, checkpoint_dir=d / "_ckpt",
                               chunk_size=cc.chunk_size, step_fn=step_fn)
    for level, c in enumerate(tree.centroids, start=1):
        np.save(d / f"centroids_l{level}.npy", c)
    paths = tree.paths()
    columns = {f"cluster_l{level}": (paths[:, level - 1], pa.int32()) for level in range(1, paths.shape[1] + 1)}
    columns["cluster_sq_dist"] = (tree.sq_dists.astype(np.float32), pa.float32())
    rows.write(d, rows.emb_rows[valid], columns)
    sizes = np.bincount(paths[:, 0], minlength=levels[0].n_clusters)
    result = StageResult("cluster", str(d), key, counts={
        "in": n_in, "out": int(len(valid)), "dropped": {"embed_error": n_in - len(valid)} if n_in > len(valid) else {},
        "levels": "/".join(str(lv.n_clusters) for lv in levels),
        "l1_sizes": f"min {int(sizes.min())} median {int(np.median(sizes))} max {int(sizes.max())}"},
        seconds=time.time() - t0, outputs={"clusters": str(d)})
    finish(result, asdict(cc), inputs)
    return result
