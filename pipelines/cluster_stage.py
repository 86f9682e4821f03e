"""The cluster and balance stage runners: hierarchical k-means over an embedding (local or with
Lloyd passes spread over Ray), then balanced sampling over the tree and seed-set retrieval."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import list_parts, read_table
from pipelines.aligned import embedding_ids, write_by_id
from pipelines.config import Config, fingerprint
from pipelines.embed_stage import embedding_dir
from pipelines.manifest import StageResult, begin, finish, read_manifest
from pipelines.stages import _upstream, stage_dir


class _Subset:
    """The valid rows of a Vectors source (embed_error rows never join the clustering)."""

    def __init__(self, base, rows: np.ndarray) -> None:
        self.base, self.rows, self.n, self.dim = base, rows, len(rows), base.dim

    def chunks(self, size: int):
        for s in range(0, self.n, size):
            yield s, self.base.take(self.rows[s:s + size])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.base.take(self.rows[np.asarray(rows)])


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
                       "pass --embedding NAME or run `curate embed` first")


def _embedding(cfg: Config, name: str | None) -> tuple[Path, dict]:
    d = resolve_embedding(cfg, name)
    return d, read_manifest(d)


def _valid(cfg: Config, d: Path) -> np.ndarray:
    """Rows of the embedding to cluster: embedded fine, and not dropped by copy dedup or
    decontamination (when those ran), so balancing picks only images that reach the shards."""
    from pipelines.stages import DROP_FILTERS, finished_filters

    status = [s for p in list_parts(d) for s in pq.read_table(p, columns=["status"]).column("status").to_pylist()]
    keep = np.array(status, dtype=object) == "ok"
    ids = embedding_ids(d)
    for stage in finished_filters(cfg):
        col, rule = DROP_FILTERS[stage]
        t = read_table(stage_dir(cfg, stage), columns=["id", col]).to_pylist()
        dropped = {r["id"] for r in t if (r[col] is not None if rule == "not_null" else bool(r[col]))}
        keep &= np.array([x not in dropped for x in ids], dtype=bool)
    return np.flatnonzero(keep)


def _ray_step_fn(emb_dir: Path, valid: np.ndarray, chunk: int, address: str | None):
    """A Lloyd pass as Ray tasks, one per embedding part; the driver reduces (same sums as local)."""
    import ray

    from curate.index import EmbeddingParts
    from curate.kmeans import reduce_stats
    from pipelines.executors import init_ray

    init_ray(address)
    parts = EmbeddingParts(emb_dir)  # parts in numeric order, with their row offsets
    paths, offsets = [str(p) for p in parts.paths], np.asarray(parts.offsets)
    jobs = []
    for p, lo, hi in zip(paths, offsets[:-1], offsets[1:]):
        rows = valid[(valid >= lo) & (valid < hi)] - lo
        jobs.append((p, rows, int(np.searchsorted(valid, lo))))

    @ray.remote(num_cpus=1)
    def part_pass(path, rows, offset, centroids):
        from curate.kmeans import part_step

        x = np.load(path, mmap_mode="r")[rows]
        return part_step(x, centroids, offset, chunk)

    def step(centroids: np.ndarray):
        ref = ray.put(centroids)
        out = ray.get([part_pass.remote(p, r, o, ref) for p, r, o in jobs if len(r)])
        stats = reduce_stats(o[0] for o in out)
        return stats, np.concatenate([o[1] for o in out]), np.concatenate([o[2] for o in out])

    return step


def run_cluster(cfg: Config, force: bool = False) -> StageResult:
    """Hierarchical k-means: cluster_l1..lN of every embedded record, centroids per level."""
    from curate.kmeans import ArrayVectors
    from curate.kmeans_tree import LevelSpec, hierarchical_kmeans

    cc = cfg.cluster
    from pipelines.stages import finished_filters

    emb_dir, emb_manifest = _embedding(cfg, cc.embedding)
    inputs = {**_upstream(cfg, "ingest", *finished_filters(cfg)), "embedding": emb_manifest["key"]}
    config = {k: v for k, v in asdict(cc).items() if k != "chunk_size"}  # chunking does not change results
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "cluster")
    prev = begin("cluster", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    valid = _valid(cfg, emb_dir)
    base = ArrayVectors.from_dir(emb_dir)
    vectors = base if len(valid) == base.n else _Subset(base, valid)
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
    ids = np.array(embedding_ids(emb_dir), dtype=object)[valid].tolist()
    columns = {f"cluster_l{level}": (paths[:, level - 1], pa.int32()) for level in range(1, paths.shape[1] + 1)}
    columns["cluster_sq_dist"] = (tree.sq_dists.astype(np.float32), pa.float32())
    write_by_id(stage_dir(cfg, "ingest"), d, ids, columns)
    sizes = np.bincount(paths[:, 0], minlength=levels[0].n_clusters)
    result = StageResult("cluster", str(d), key, counts={
        "in": int(len(valid)), "out": int(len(valid)), "dropped": {},
        "levels": "/".join(str(lv.n_clusters) for lv in levels),
        "l1_sizes": f"min {int(sizes.min())} median {int(np.median(sizes))} max {int(sizes.max())}"},
        seconds=time.time() - t0, outputs={"clusters": str(d)})
    finish(result, asdict(cc), inputs)
    return result


def run_balance(cfg: Config, force: bool = False) -> StageResult:
    """Select `target` records balanced over the cluster tree, plus seed-set retrievals."""
    from curate.balance import balanced_sample

    bc = cfg.balance
    inputs = _upstream(cfg, "ingest", "cluster")
    key = fingerprint({"config": asdict(bc), "inputs": inputs})
    d = stage_dir(cfg, "balance")
    prev = begin("balance", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    t = read_table(stage_dir(cfg, "cluster"))
    level_cols = sorted((c for c in t.column_names if c.startswith("cluster_l")), key=lambda c: int(c[9:]))
    t = t.filter(pc.is_valid(t.column(level_cols[0])))
    ids = t.column("id").to_pylist()
    paths = np.stack([t.column(c).to_numpy() for c in level_cols], axis=1)
    counts = np.zeros(len(ids), dtype=np.int32)
    selected_by = np.array([""] * len(ids), dtype=object)
    report: dict = {"pool": len(ids)}
    if bc.target:
        res = balanced_sample(paths, bc.target, strategy=bc.strategy, multiplier=bc.multiplier, seed=bc.seed,
                              sq_dists=t.column("cluster_sq_dist").to_numpy())
        counts, selected_by = res.counts.astype(np.int32), res.selected_by.astype(object)
        report.update({k: v for k, v in res.report.items() if isinstance(v, (int, float, str))})
    seed_set = np.full(len(ids), None, dtype=object)
    seed_id = np.full(len(ids), None, dtype=object)
    seed_sim = np.full(len(ids), None, dtype=object)
    if bc.seeds:
        from pipelines.seeds import retrieve_seeds

        rows, sets, sids, sims, seed_report = retrieve_seeds(cfg, ids, paths[:, 0])
        seed_set[rows], seed_id[rows], seed_sim[rows] = sets, sids, [float(x) for x in sims]
        fresh = rows[counts[rows] == 0]
        counts[fresh] = 1
        selected_by[fresh] = [f"seed:{s}" for s in seed_set[fresh]]
        report["retrieval"] = seed_report
    selected = counts > 0
    write_by_id(stage_dir(cfg, "ingest"), d, ids, {
        "selected": (selected, pa.bool_()), "repeats": (counts, pa.int32()),
        "selected_by": ([s or None for s in selected_by], pa.string()),
        "seed_set": (seed_set.tolist(), pa.string()), "seed_id": (seed_id.tolist(), pa.string()),
        "seed_sim": (seed_sim.tolist(), pa.float32())})
    shortfall = max(0, bc.target - int(counts.sum())) if bc.target else 0
    result = StageResult("balance", str(d), key, counts={
        "in": len(ids), "out": int(selected.sum()), "dropped": {"not_selected": int((~selected).sum())},
        "target": bc.target, "shortfall": shortfall}, seconds=time.time() - t0, outputs={"selection": str(d)})
    finish(result, {**asdict(bc), "report": report}, inputs)
    return result
