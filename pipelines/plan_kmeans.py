"""`curate plan` for the cluster stage: each k-means level's driver memory, assignment tasks and time (k-means++
seedings on the driver or on one Ray actor per shard, Lloyd passes, split mode, resampling refits)."""

from __future__ import annotations

import math

from curate.kmeans import init_sample_rows
from curate.kmeans_pp import shard_bounds
from curate.kmeans_split import BUCKET_POINTS
from pipelines.config import Config, LevelConfig
from pipelines.plan_costs import Cluster, PlanRefused, cost, dense_rate, fmt_bytes, fmt_time

CHUNK_TEMPS = 3  # float32 chunk copies a k-means or k-NN pass holds at once (read, convert, search input)


def pp_seconds(n: int, k: int, d: int, cl: Cluster, cores: int | None = None) -> float:
    """k-means++ on the init sample: k steps, each scoring 2 + ln k candidates against the sample, in numpy
    on the driver's cores (no GPU), or on `cores`."""
    s = init_sample_rows(n, k)
    return 2.0 * s * d * k * (3 + math.log(k)) / ((cores or cl.cpus_per_node) * cost("pp_flops"))


def pp_shards(n: int, k: int, cfg: Config) -> int:
    """Shards of the k-means++ sample of a k-means with k clusters over n points (as curate.kmeans_pp cuts it)."""
    return len(shard_bounds(init_sample_rows(n, k), cfg.cluster.pp_shard_rows)) - 1


def pp_sharded(n: int, k: int, d: int, cl: Cluster, cfg: Config) -> float:
    """k-means++ of a full fit or refit: on the driver, or with executor ray and more than one shard of
    cluster.pp_shard_rows rows, on one actor per shard (the cluster's GPUs shared out, up to one each, when it
    has GPUs; else its cores, up to a node each), each step paying the actors' two collectives (pp_ray_step_s)."""
    shards = pp_shards(n, k, cfg)
    if cfg.executor != "ray" or shards == 1:
        return pp_seconds(n, k, d, cl)
    if cl.gpus_per_node:  # each actor on its share of the GPUs (at most one): torch on the GPU
        s = init_sample_rows(n, k)
        gpus = min(shards, cl.nodes * cl.gpus_per_node)
        return 2.0 * s * d * k * (3 + math.log(k)) / (gpus * cost("gpu_flops")) + k * cost("pp_ray_step_s")
    cores = shards * min(cl.cpus_per_node, cl.nodes * cl.cpus_per_node / shards)
    return pp_seconds(n, k, d, cl, cores) + k * cost("pp_ray_step_s")


def fit_seconds(n: int, k: int, d: int, passes: int, rate: float, cores: int) -> float:
    """Lloyd passes: the nearest-centroid search (dense FLOPs) plus reading and summing each record."""
    return passes * (2.0 * n * k * d / rate + n * d * cost("kmeans_rec_s") / cores)


def level_plan(i: int, lv: LevelConfig, n: int, d: int, cfg: Config, cl: Cluster) -> tuple[float, float, float, list]:
    """(driver bytes, bytes per pass task, seconds, notes) of one k-means level over n points of dim d."""
    key = f"cluster.levels[{i}]"
    # with executor ray every Lloyd pass is Ray tasks over the cluster (level 1 over the parts, higher levels over
    # the level below's centroids, refits over their points, each from a file): one per GPU when there are GPUs
    k, passes, spread = lv.n_clusters, lv.n_iters + 1, cfg.executor == "ray"
    if k > n:
        raise PlanRefused(f"{key}.n_clusters: {k:,} clusters from {n:,} points")
    drate, dsrc = dense_rate(cl, False)
    g = cfg.cluster.ray_gpus_per_task
    on_gpus = spread and cl.gpus_per_node > 0 and (g is None or g > 0)
    if on_gpus:  # pass tasks at a time per node: each asks for g GPUs (default 1)
        tasks = max(1, min(cl.cpus_per_node, int(cl.gpus_per_node / (g or 1.0))))
        prate, psrc = dense_rate(cl, True)
    elif spread:
        tasks = cl.cpus_per_node
        prate, psrc = cl.nodes * cl.cpus_per_node * cost("cpu_flops"), f"{cl.nodes * cl.cpus_per_node} core(s)"
    else:
        tasks, prate, psrc = 1, drate, dsrc
    pcores = tasks * cl.nodes if spread else cl.cpus_per_node  # a task reads and sums its chunk on one core
    chunk = cfg.cluster.chunk_size * d * 4 * CHUNK_TEMPS

    def task_bytes(kk: int) -> float:  # one assignment pass worker: sums (float64), index and chunks
        return cost("base_rss") + kk * d * (8 + 4) + chunk

    # above level 1 the points are the centroids below, memory-mapped from their checkpoint: labels and distances
    per_point = cost("cluster_bytes") if i == 0 else 8
    first_k = lv.split or k  # the k-means++ sample is sized by the first fit's k
    sample = init_sample_rows(n, first_k) * (d * 4 + 16)
    if lv.resampling_steps > 1:  # a refit's points (up to sample_size per cluster; on ray in a file, the driver
        m = min(n, k * max(lv.sample_size, 1))  # holds their rows) and their k-means++ sample
        sample = max(sample, m * (8 if spread else d * 4) + init_sample_rows(m, k) * (d * 4 + 16))
    # split mode gathers the sub-clusters' centroids from the buckets' files on disk, one bucket at a time
    held = 2 * (lv.split * d * 4 + k * d * 4 * min(1.0, BUCKET_POINTS[1] / n)) if lv.split else 2 * k * d * 4
    driver = cost("base_rss") + n * per_point + held + sample
    seconds, notes, task_k = 0.0, [], k  # the centroids a pass task searches
    if lv.split:
        sub = math.ceil(k / lv.split)
        seconds += pp_sharded(n, lv.split, d, cl, cfg) + fit_seconds(n, lv.split, d, passes, prate, pcores)
        # a k-means in each split (k-means++ included): one job per bucket of splits, Ray tasks on every core
        # of the cluster with executor ray (CPU), else on the driver
        cores = cl.cpus_per_node * cl.nodes if spread else cl.cpus_per_node
        srate = cores * cost("cpu_flops") if spread else drate
        seconds += (lv.split * pp_seconds(math.ceil(n / lv.split), sub, d, cl, cores)
                    + fit_seconds(n, sub, d, passes, srate, cores))
        task_k = lv.split
        if getattr(lv, "split_assign", "global") == "global":
            seconds += fit_seconds(n, k, d, 1, prate, pcores)
            task_k = k
            notes.append(f"l{i + 1}: split {lv.split:,} then ~{sub} per split, then every point against all {k:,}")
        else:
            notes.append(f"l{i + 1}: split {lv.split:,} then ~{sub} per split (points stay in their split)")
    else:
        seconds += pp_sharded(n, k, d, cl, cfg) + fit_seconds(n, k, d, passes, prate, pcores)
    for _ in range(1, max(1, lv.resampling_steps)):
        m = min(n, k * max(lv.sample_size, 1))
        seconds += pp_sharded(m, k, d, cl, cfg) + fit_seconds(m, k, d, passes, prate, pcores)
        seconds += fit_seconds(n, k, d, 1, prate, pcores)
    task = task_bytes(task_k)
    node = max(driver, tasks * task + k * d * 4)
    if not spread:
        driver += task
        node = driver
    if node > cl.mem or driver > cl.mem:
        what = "each of the node's assignment tasks" if spread and node > driver else "the driver"
        need = f"{fmt_bytes(task)} x {tasks} tasks" if spread and node > driver else fmt_bytes(driver)
        fix = (f"set {key}.split_assign: within (the reference's split mode: points stay in their split)"
               if lv.split else f"lower {key}.n_clusters or use split mode ({key}.split)")
        raise PlanRefused(f"{key}.n_clusters: k={k:,} x d={d} needs {need} ({what}: float64 sums, "
                          f"centroid index), over {cl.mem_per_node_gb:g} GB per node; {fix}")
    per_gpu = math.ceil(tasks / cl.gpus_per_node) if on_gpus else 0  # each holds its index and a chunk there
    if per_gpu * (task_k * d * 4 + chunk / CHUNK_TEMPS) > cost("gpu_mem"):
        raise PlanRefused(f"cluster.ray_gpus_per_task: {per_gpu} Lloyd-pass task(s) per GPU at {key} need "
                          f"{fmt_bytes(per_gpu * (task_k * d * 4 + chunk / CHUNK_TEMPS))} per GPU (centroid index "
                          f"and a chunk each), over {fmt_bytes(cost('gpu_mem'))}; raise cluster.ray_gpus_per_task "
                          f"(fewer tasks per GPU) or lower {key}.n_clusters")
    where = (f"every Lloyd pass as Ray tasks ({psrc})" + (", the fits inside the splits on every core" if lv.split
                                                           else "")
             if spread else f"all fits on the driver ({dsrc})")
    shards = pp_shards(n, first_k, cfg)
    pp = (f"k-means++ on {shards} Ray actors{' on GPUs' if cl.gpus_per_node else ''} running its loop among them "
          "(cluster.pp_shard_rows)"
          if cfg.executor == "ray" and shards > 1 else f"k-means++ in numpy on the driver's {cl.cpus_per_node} cores")
    notes.append(f"l{i + 1}: {fmt_time(seconds)}; {where}, {pp}")
    return driver, node, seconds, notes
