"""k-means++ over shards (curate/kmeans_pp.py): the cost of cutting the seeding into shards, in this process
and as Ray actors (a local Ray), against the single-process loop (one shard) side by side.

Two cases, each run `--rounds` times in turn (these machines are noisy; medians reported):
- overhead: small shards and many steps (m 4096 x 32, k 1024, 2 shards): seconds per step that the shards
  and the actors' exchanges add (`curate plan` takes the Ray figure as its per-step latency): the actors
  running the loop themselves with two gloo collectives a step (`shards_ray`, curate/kmeans_pp_spmd.py),
  and the loop on the driver with two round trips to the actors a step (`shards_ray_driver_loop`);
- throughput: m 524,288 x 128, k 64, 2 shards: the actors run the distance work side by side, each on
  one of the 2 cores, where the single process runs it on 2 BLAS threads.
Every run's centres are checked: the Ray actors' equal the in-process shards' byte for byte. Then
`per_step`: seconds per step and fixed seconds of the actors running the loop (SPMD) and of the driver
loop, from seedings at k 512 and 2560 (m 8192 x 32, 2 shards).

    PYTHONPATH=. python bench/kmeans_pp.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

CASES = {"overhead": (4096, 32, 1024, 2048), "throughput": (524_288, 128, 64, 262_144)}  # m, d, k, shard rows


def timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    args = ap.parse_args()
    import ray

    from curate.kmeans import kmeans_plusplus
    from pipelines.stages.cluster import RayShards

    class DriverLoop(RayShards):  # the loop on the driver, two round trips to the actors a step (session 23)
        seed_all = None

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    report = {}
    try:
        for name, (m, d, k, rows) in CASES.items():
            x = np.random.default_rng(0).standard_normal((m, d)).astype(np.float32)
            runs = {"one_shard": [], "shards_local": [], "shards_ray": [], "shards_ray_driver_loop": []}
            for _ in range(args.rounds):
                t1, _ = timed(lambda: kmeans_plusplus(x, k, 0, shard_rows=m))
                t2, local = timed(lambda: kmeans_plusplus(x, k, 0, shard_rows=rows))
                t3, on_ray = timed(lambda: kmeans_plusplus(x, k, 0, shard_rows=rows, shards=RayShards))
                t4, looped = timed(lambda: kmeans_plusplus(x, k, 0, shard_rows=rows, shards=DriverLoop))
                if on_ray.tobytes() != local.tobytes() or looped.tobytes() != local.tobytes():
                    raise SystemExit(f"{name}: Ray actors and in-process shards picked different centres")
                for key, t in zip(runs, (t1, t2, t3, t4)):
                    runs[key].append(t)
            med = {key: float(np.median(v)) for key, v in runs.items()}
            report[name] = {
                "m": m, "d": d, "k": k, "shards": -(-m // rows), "seconds": {key: [round(t, 3) for t in v]
                                                                           for key, v in runs.items()},
                "ray_over_one_shard": round(med["shards_ray"] / med["one_shard"], 3),
                "local_shards_over_one_shard": round(med["shards_local"] / med["one_shard"], 3),
                "ray_s_per_step_over_local_shards": round((med["shards_ray"] - med["shards_local"]) / k, 6),
                "driver_loop_s_per_step_over_local_shards": round(
                    (med["shards_ray_driver_loop"] - med["shards_local"]) / k, 6),
                "driver_loop_over_spmd": round(med["shards_ray_driver_loop"] / med["shards_ray"], 3),
            }
        report["per_step"] = per_step(kmeans_plusplus, {"spmd": RayShards, "driver_loop": DriverLoop}, args.rounds)
    finally:
        ray.shutdown()
    print(json.dumps(report, indent=1))


def per_step(kmeans_plusplus, groups: dict, rounds: int, m: int = 8192, d: int = 32, ks=(512, 2560)) -> dict:
    """Seconds per step and fixed seconds (actors' start, imports, the group's rendezvous) of each way to run
    the actors, from the fastest of `rounds` seedings at two k (2 shards of m/2 rows); the plan's per-step
    latency (pp_ray_step_s) is the first's."""
    x = np.random.default_rng(0).standard_normal((m, d)).astype(np.float32)
    best = {(name, k): min(timed(lambda: kmeans_plusplus(x, k, 0, shard_rows=m // 2, shards=g))[0]
                           for _ in range(rounds)) for name, g in groups.items() for k in ks}
    out = {}
    for name in groups:
        step = (best[(name, ks[1])] - best[(name, ks[0])]) / (ks[1] - ks[0])
        out[name] = {"s_per_step": round(step, 6), "fixed_s": round(best[(name, ks[0])] - ks[0] * step, 2)}
    return out


if __name__ == "__main__":
    main()
