"""cluster: hierarchical k-means over an embedding (local, or every level's Lloyd passes, resampling refits
included, as Ray tasks, each with a GPU when the cluster has them, and the k-means++ seedings of more than
`pp_shard_rows` points on one Ray actor per shard): `cluster_l1..lN` and `cluster_sq_dist` per record,
`centroids_lK.npy` per level.

The driver holds O(parts + clusters): the rows to cluster are found part by part (their positions in
`_rows/`), level 1's labels and distances live in the checkpoint directory one file pair per chunk of
`chunk_size` rows (written by the process that ran the chunk), resampling draws its samples part by
part, and each output part is written from its own rows (by a Ray task on ray). Passes read the same
chunks whichever executor runs them, so local and Ray write the same bytes."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.kmeans_parts import Assignment, PartVectors, save_npy_atomic
from curate.kmeans_pp_spmd import SpmdShard
from curate.kmeans_stats import StepStats
from curate.parts import list_parts, part_name, write_table_atomic
from pipelines.config import ClusterConfig, Config, fingerprint
from pipelines.embedding import resolve_embedding
from pipelines.framework import DROP_FILTERS, dropped_by, finished_filters, stage_dir, upstream
from pipelines.executors import ray_get, stage_mapper
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _part_rows(ingest_path: Path, emb_meta: Path,
               filters: list[tuple[str, Path]]) -> tuple[np.ndarray, np.ndarray, int]:
    """One part's rows to cluster: (positions in the embedding part, their positions in the ingest part, how many
    embedding rows the filters let through). A row is clustered when it embedded fine and was not dropped by
    copy dedup or decontamination (when those ran), so balancing picks only images that reach the shards; the
    stage's "in" counts what the filters let through (those that failed to embed drop here)."""
    ids = pq.read_table(ingest_path, columns=["id"]).column("id")
    emb = pq.read_table(emb_meta, columns=["id", "status"])
    where = pc.index_in(emb.column("id"), value_set=ids)
    if where.null_count:
        raise ValueError(f"{emb_meta} holds ids that are not in the ingest part {ingest_path.name}")
    emb_pos = where.to_numpy().astype(np.int64)
    keep = np.ones(len(ids), dtype=bool)
    for stage, part in filters:
        t = pq.read_table(part, columns=["id", DROP_FILTERS[stage][0]])
        if not t.column("id").equals(ids):
            raise ValueError(f"{part} is not row-aligned with the ingest part {ingest_path.name}")
        keep &= ~dropped_by(stage, t.column(DROP_FILTERS[stage][0])).to_numpy(zero_copy_only=False).astype(bool)
    kept = keep[emb_pos]
    ok = pc.equal(emb.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool)
    valid = np.flatnonzero(kept & ok)
    return valid, emb_pos[valid], int(kept.sum())


def _prepare(cfg: Config, emb_dir: Path, rows_dir: Path) -> tuple[PartVectors, list[Path], int]:
    """The vectors to cluster, part by part: each embedding part restricted to its valid rows (positions
    written to rows_dir/emb-XXXXX.npy, and their ingest positions to ing-XXXXX.npy); the ingest parts; and the
    stage's "in". One part at a time is read: nothing O(records) stays on the driver."""
    ingest = list_parts(stage_dir(cfg, "ingest"))
    metas, arrays = list_parts(emb_dir), list_parts(emb_dir, ".npy")
    if len(metas) != len(ingest) or len(arrays) != len(ingest):
        raise ValueError(f"{emb_dir} has {len(metas)} parts, the ingest stage {len(ingest)}")
    filters = [(stage, list_parts(stage_dir(cfg, stage))) for stage in finished_filters(cfg)]
    rows_dir.mkdir(parents=True, exist_ok=True)
    positions, sizes, n_in = [], [], 0
    for k, (ing, meta, arr) in enumerate(zip(ingest, metas, arrays)):
        valid, ing_pos, kept = _part_rows(ing, meta, [(stage, parts[k]) for stage, parts in filters])
        n_in += kept
        save_npy_atomic(rows_dir / f"ing-{k:05d}.npy", ing_pos)
        whole = len(valid) == _npy_rows(arr)
        if not whole:
            save_npy_atomic(rows_dir / f"emb-{k:05d}.npy", valid)
        positions.append(None if whole else rows_dir / f"emb-{k:05d}.npy")
        sizes.append(len(valid))
    return PartVectors(arrays, positions, sizes), ingest, n_in


def _npy_rows(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0])


def _chunk_pass(vectors: PartVectors, start: int, stop: int, part: int, centroids: np.ndarray,
                out_dir: str | None, keep: bool) -> StepStats | tuple[StepStats, np.ndarray, np.ndarray]:
    """A Lloyd pass over rows [start, stop) of the vectors, one chunk (a Ray task): its statistics; its labels
    and squared distances written to out_dir as part `part` of an Assignment directory when one is given, else
    returned with the statistics when `keep` (a level >= 2: O(clusters) labels)."""
    from curate.kmeans import part_step
    from curate.kmeans_parts import write_assignment_part

    stats, labels, dists = part_step(vectors.rows(start, stop), centroids, start, max(1, stop - start))
    if out_dir is not None:
        write_assignment_part(out_dir, part, labels, dists)
    return (stats, labels, dists) if keep and out_dir is None else stats


def pass_gpus(gpus_per_task: float | None) -> float:
    """GPUs a Lloyd-pass task asks Ray for: the setting, or 1 when the cluster has GPUs (a task that asks
    for none sees none: Ray hides them from it), else 0."""
    import ray

    if gpus_per_task is not None:
        return float(gpus_per_task)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _ray_step_fn(vectors: PartVectors, chunk: int, address: str | None, gpus_per_task: float | None = None):
    """A Lloyd pass as Ray tasks, one per chunk of rows (the chunks the local pass reads, so the same labels),
    each with `pass_gpus(gpus_per_task)` GPUs; the tasks write their chunks' labels and distances (when the pass
    keeps them) and return statistics, which the driver adds in chunk order as they arrive (the same sums as
    local), holding only those that arrive ahead of their turn."""
    import ray

    from curate.kmeans import StepAccumulator
    from curate.kmeans_parts import chunk_sizes
    from pipelines.executors import TASK_RETRIES, init_ray

    init_ray(address)
    remote = ray.remote(_chunk_pass).options(num_cpus=1, num_gpus=pass_gpus(gpus_per_task), max_retries=TASK_RETRIES,
                                             retry_exceptions=False)
    bounds = np.concatenate([[0], np.cumsum(chunk_sizes(vectors.n, chunk))]).astype(np.int64)
    shared = ray.put(vectors)

    def step(centroids: np.ndarray, out: Assignment | None = None) -> StepStats:
        ref = ray.put(centroids)
        target = None if out is None or out.dir is None else str(out.dir)
        keep = out is not None and out.dir is None  # labels come back to the driver (levels >= 2 only)
        refs = [remote.remote(shared, int(a), int(b), i, ref, target, keep)
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        position = {r: i for i, r in enumerate(refs)}
        total = StepAccumulator(len(centroids), centroids.shape[1])
        early, turn, waiting = {}, 0, refs
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            early[position[ready[0]]] = ray_get(ready[0])
            while turn in early:
                got = early.pop(turn)
                if keep:
                    got, labels, dists = got
                    out.put(turn, labels, dists)
                total.add_stats(got)
                turn += 1
        return total.result()

    return step


def _file_passes(path: Path, chunk: int, address: str | None, gpus_per_task: float | None):
    """The points of one .npy on storage every node sees, and Lloyd passes over them as Ray tasks."""
    vectors = PartVectors([path])
    return vectors, _ray_step_fn(vectors, chunk, address, gpus_per_task)


def _ray_upper_step_fn(rows_dir: Path, chunk: int, address: str | None, gpus_per_task: float | None = None):
    """Levels >= 2 on Ray: the level below's centroids saved as an .npy (in the stage's scratch directory, on
    storage every node sees), read chunk by chunk by the same tasks as level 1's passes."""

    def make(level: int, points: np.ndarray) -> tuple[PartVectors, object]:
        path = rows_dir / f"points_l{level}.npy"
        save_npy_atomic(path, np.ascontiguousarray(points, dtype=np.float32))
        return _file_passes(path, chunk, address, gpus_per_task)

    return make


def _ray_refit_fn(rows_dir: Path, chunk: int, address: str | None, gpus_per_task: float | None = None):
    """Resampling refits on Ray: the refit's points written block by block to an .npy in the stage's scratch
    directory (the previous refit's file removed), passed over by the same tasks as every other pass; the driver
    holds the rows and the k-means++ sample, not the points."""
    from curate.kmeans_parts import save_rows_npy

    def make(level: int, step: int, data, rows: np.ndarray) -> tuple[PartVectors, object]:
        for old in rows_dir.glob("refit_*.npy"):
            old.unlink()
        path = rows_dir / f"refit_l{level}_s{step}.npy"
        save_rows_npy(path, data.take, rows, data.dim)
        return _file_passes(path, chunk, address, gpus_per_task)

    return make


class RaySpmdShard(SpmdShard):
    """A k-means++ shard actor whose group meets at its Ray node's address."""

    def rendezvous(self, host: str | None = None) -> str:
        from ray.util import get_node_ip_address

        return super().rendezvous(host or get_node_ip_address())


class RayShards:
    """k-means++ shards as Ray actors, one per shard, spread over the nodes (curate.kmeans_pp.ShardGroup): each
    holds its rows and their D^2 for the whole seeding, on a GPU when the cluster has GPUs (its share of them,
    at most one), else running its BLAS on the CPUs it reserved. The actors run the loop themselves
    (`seed_all`: curate.kmeans_pp_spmd, two gloo collectives a step, no round trip to the driver; the per-step
    calls below are the driver loop's, which bench/kmeans_pp.py measures against it); a dead actor
    (its node lost) is a ShardLost, and the seeding starts again on fresh actors."""

    def __init__(self, parts, chunk_size: int) -> None:
        import ray
        from ray.exceptions import RayActorError

        from curate.kmeans_pp import ShardLost

        self._get_refs, self._errors = ray.get, (RayActorError, ShardLost)

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        per_node = max([int(n.get("Resources", {}).get("CPU", 1)) for n in nodes] or [1])
        total = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # the cluster's CPUs shared out (all shards run at once), rounded down to Ray's 1e-4 resource unit
        cpus = min(per_node, math.floor(total / len(parts) * 10_000) / 10_000)
        gpus = min(1.0, math.floor(ray.cluster_resources().get("GPU", 0) / len(parts) * 10_000) / 10_000)
        remote = ray.remote(RaySpmdShard).options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy="SPREAD",
                                                  max_restarts=0)
        self.actors = [remote.remote(p, chunk_size, max(1, int(cpus)), gpus > 0) for p in parts]

    def _get(self, refs):  # two calls a step: the imports stay in __init__
        actor_error, lost = self._errors
        try:
            return self._get_refs(refs)
        except actor_error as exc:
            raise lost(str(exc)) from exc

    def _wait(self, refs: list) -> list:
        """Results in order; a dead actor's error as soon as it is known (its peers wait on it in a collective)."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            self._get(done)
        return self._get(refs)

    def seed_all(self, bounds: np.ndarray, k: int, d: int, rng: np.random.Generator, trials: int) -> np.ndarray:
        """The whole seeding on the actors: rank 0 gives a rendezvous address, every actor joins the group,
        then every actor runs the loop (the centres come back from rank 0)."""
        address = self._get(self.actors[0].rendezvous.remote())
        self._wait([a.join.remote(r, len(self.actors), address) for r, a in enumerate(self.actors)])
        return self._wait([a.seed.remote(bounds, k, d, rng, trials) for a in self.actors])[0]

    def score(self, candidates: np.ndarray, keep: bool = False) -> list[np.ndarray]:
        return self._get([a.score.remote(candidates, keep) for a in self.actors])

    def advance(self, best: int, asks: dict) -> dict:
        return dict(enumerate(self._get([a.advance.remote(best, asks[i]) for i, a in enumerate(self.actors)])))

    def commit(self, centre: np.ndarray) -> list[float]:
        return self._get([a.commit.remote(centre) for a in self.actors])

    def resolve(self, asks: dict) -> dict:
        shards = list(asks)
        return dict(zip(shards, self._get([self.actors[s].resolve.remote(asks[s]) for s in shards])))

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        return self._get(self.actors[shard].rows.remote(rows))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def ray_plusplus(shard_rows: int, address: str | None):
    """k-means++ with its shards as Ray actors (RayShards) on the stage's cluster."""
    from curate.kmeans_pp import PlusPlus
    from pipelines.executors import init_ray

    init_ray(address)
    return PlusPlus(shard_rows, RayShards)


def write_part(upper: list[np.ndarray], k1: int, layout: np.ndarray, assign_dir: str, ingest_path: str, out_path: str,
               ing_positions: str, start: int, stop: int) -> np.ndarray:
    """The stage's output part aligned with one ingest part, whose clustered rows are rows [start, stop) of the
    level-1 Assignment (directory, chunk layout): id, cluster_l1..lL and cluster_sq_dist of those rows, null
    elsewhere; returns the part's level-1 cluster sizes (int64 [k1])."""
    from curate.kmeans_tree import cluster_paths

    labels, dists = Assignment(layout, assign_dir).range(start, stop)
    ids = pq.read_table(ingest_path, columns=["id"]).column("id")
    m = len(ids)
    pos = np.load(ing_positions)
    mask = np.ones(m, dtype=bool)
    mask[pos] = False
    paths = cluster_paths([labels, *upper])
    columns = {}
    for level in range(paths.shape[1]):
        v = np.zeros(m, dtype=np.int32)
        v[pos] = paths[:, level]
        columns[f"cluster_l{level + 1}"] = pa.array(v, mask=mask, type=pa.int32())
    v = np.zeros(m, dtype=np.float32)
    v[pos] = dists
    columns["cluster_sq_dist"] = pa.array(v, mask=mask, type=pa.float32())
    write_table_atomic(pa.table({"id": ids, **columns}), out_path)
    return np.bincount(labels, minlength=k1).astype(np.int64)


def run(cfg: Config, force: bool = False) -> StageResult:
    """Hierarchical k-means: cluster_l1..lN of every embedded record, centroids per level."""
    from curate.kmeans_pp import PlusPlus
    from curate.kmeans_tree import LevelSpec, hierarchical_kmeans

    cc = cfg.cluster
    emb_dir = resolve_embedding(cfg, cc.embedding)
    inputs = {**upstream(cfg, "ingest", *finished_filters(cfg)), "embedding": read_manifest(emb_dir)["key"]}
    config = asdict(cc)
    del config["ray_gpus_per_task"]  # where the passes run, not what they compute
    # the chunk layout is that of level 1's checkpointed labels, and faiss may break a near-tie differently
    # in another query batch: a changed chunk_size redoes the stage (the default stays out of the key, so
    # keys made before it was keyed stay valid)
    for name in ("chunk_size", "pp_shard_rows"):  # so do k-means++ shards, which decide its draws
        if config[name] == getattr(ClusterConfig, name):
            del config[name]
    for lv in config["levels"]:  # the default split_assign stays out of the key (keys made before it stay valid)
        if lv.get("split_assign") == "global":
            del lv["split_assign"]
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "cluster")
    prev = begin("cluster", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    rows_dir = d / "_rows"
    vectors, ingest, n_in = _prepare(cfg, emb_dir, rows_dir)
    levels = [LevelSpec(**asdict(lv)) for lv in cc.levels]
    if vectors.n < levels[0].n_clusters:
        raise ValueError(f"{vectors.n} embedded images cannot make {levels[0].n_clusters} level-1 clusters; "
                         "lower cluster.levels")
    on_ray = cfg.executor == "ray"
    mapper = stage_mapper(cfg.executor, cfg.ray_address)  # split mode's jobs and the part writes: Ray tasks on ray
    gpus = cc.ray_gpus_per_task
    step_fn = _ray_step_fn(vectors, cc.chunk_size, cfg.ray_address, gpus) if on_ray else None
    upper = _ray_upper_step_fn(rows_dir, cc.chunk_size, cfg.ray_address, gpus) if on_ray else None
    refit = _ray_refit_fn(rows_dir, cc.chunk_size, cfg.ray_address, gpus) if on_ray else None
    pp = ray_plusplus(cc.pp_shard_rows, cfg.ray_address) if on_ray else PlusPlus(cc.pp_shard_rows)
    tree = hierarchical_kmeans(vectors, levels, seed=cc.seed, checkpoint_dir=d / "_ckpt",
                               chunk_size=cc.chunk_size, step_fn=step_fn, upper_step_fn=upper,
                               split_mapper=mapper, pp=pp, refit_fn=refit)
    for level, c in enumerate(tree.centroids, start=1):  # memory-mapped from the checkpoints: copied by blocks
        save_npy_atomic(d / f"centroids_l{level}.npy", c)
    k1 = levels[0].n_clusters
    shared = (tree.upper, k1, tree.level1.sizes, str(tree.level1.dir))
    jobs = [(str(ing), str(d / part_name(k)), str(rows_dir / f"ing-{k:05d}.npy"), int(vectors.offsets[k]),
             int(vectors.offsets[k + 1])) for k, ing in enumerate(ingest)]
    from curate.parts import local_map

    sizes = np.zeros(k1, dtype=np.int64)  # one write per part: a Ray task on ray
    for _, part_sizes in (mapper or local_map)(write_part, jobs, shared):
        sizes += part_sizes
    shutil.rmtree(rows_dir, ignore_errors=True)
    result = StageResult("cluster", str(d), key, counts={
        "in": n_in, "out": vectors.n, "dropped": {"embed_error": n_in - vectors.n} if n_in > vectors.n else {},
        "levels": "/".join(str(lv.n_clusters) for lv in levels),
        "l1_sizes": f"min {int(sizes.min())} median {int(np.median(sizes))} max {int(sizes.max())}"},
        seconds=time.time() - t0, outputs={"clusters": str(d)})
    finish(result, asdict(cc), inputs)
    return result
