"""ingest: check every input (folders, URL lists, tars), write records parts and raw shards."""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import asdict

from curate.download import DownloadSettings
from curate.parts import list_parts
from pipelines.config import Config, fingerprint
from pipelines.framework import check_settings, progress, source_fingerprint, stage_dir
from pipelines.manifest import StageResult, begin, finish


def run(cfg: Config, force: bool = False) -> StageResult:
    """Ingest every source of cfg.ingest.sources into records parts and raw shards."""
    from curate.ingest import IngestSettings, ingest, pending_parts, run_part, status_counts

    ic = cfg.ingest
    if not ic.sources:
        raise ValueError("no sources given (folders, URL lists or tars)")
    inputs = {"sources": [source_fingerprint(s) for s in ic.sources]}
    settings = IngestSettings(
        part_size=ic.part_size, workers=ic.workers,
        check=check_settings(cfg),
        download=DownloadSettings(**asdict(cfg.download)))
    config = {"ingest": asdict(ic), "download": asdict(cfg.download)}
    config["ingest"].pop("workers")  # parallelism settings do not change the records
    config["ingest"].pop("sources")  # where the inputs are is not what they are: `inputs` holds that
    config["download"].pop("concurrency")
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "ingest")
    prev = begin("ingest", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    print(f"ingest: planning {len(ic.sources)} source(s) ...", file=sys.stderr)
    if cfg.executor == "ray":  # one task per part (download, decode, hash, raw shard) on any node
        from pipelines.executors import ray_map

        n_parts = ray_plan(ic.sources, d, ic.part_size, cfg.ray_address)
        with progress(n_parts, "ingest", "part") as bar:
            bar.update(len(list_parts(d)))
            for _ in ray_map(run_part, [(str(d), i, settings) for i in pending_parts(d, n_parts)], cfg.ray_address):
                bar.update(1)
        pending_parts(d, n_parts)  # removes what a task lost with its node left half-written
        counts = status_counts(d)
    else:  # parts start while the plan is written (a new plan), or the unfinished parts of a saved one
        with progress(None, "ingest", "part") as bar:
            bar.update(len(list_parts(d)) if (d / "_plan").exists() else 0)
            counts = ingest(ic.sources, d, settings, on_part=lambda i, c: bar.update(1))
        n_parts = len(list_parts(d / "_plan"))
    n_in = sum(counts.values())
    dropped = {k: v for k, v in counts.items() if k != "ok"}
    result = StageResult("ingest", str(d), key, counts={
        "in": n_in, "out": counts.get("ok", 0), "dropped": dropped, "parts": n_parts}, seconds=time.time() - t0,
        outputs={"records": str(d), "raw_shards": str(d / "shards")})
    if n_in and not counts.get("ok"):
        result.notes.append(_all_dropped_hint(cfg, n_in, dropped))
    finish(result, config, inputs)
    return result


PLAN_RESTARTS = 3  # fresh plans after a name holder is lost with its node, before the error is raised


def ray_seen(address: str | None):
    """The planner's count of names split by key over one Ray actor per node (curate.names.PartitionedSeen):
    the driver holds nothing per name. Returns it and the actors (to kill when the plan is done)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from curate.names import PartitionedSeen, SeenNames
    from pipelines.executors import init_ray, ray_get

    init_ray(address)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    holder = ray.remote(SeenNames)
    actors = [holder.options(num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=True)).remote() for node in nodes] or [holder.options(num_cpus=0, max_restarts=0).remote()]
    return PartitionedSeen(len(actors), lambda keys: ray_get([a.take.remote(k) for a, k in zip(actors, keys)])), actors


def ray_plan(sources: list[str], stage_dir, part_size: int, address: str | None) -> int:
    """curate.ingest.plan with its names counted on the cluster's nodes (ray_seen); a holder lost with its
    node loses its counts, so the plan starts again (an unfinished plan leaves nothing behind)."""
    import ray
    from ray.exceptions import RayActorError

    from curate.ingest import plan

    for attempt in range(PLAN_RESTARTS + 1):
        seen, actors = ray_seen(address)
        try:
            return plan(sources, stage_dir, part_size, seen)
        except RayActorError:
            if attempt == PLAN_RESTARTS:
                raise
        finally:
            for a in actors:
                ray.kill(a)
    raise AssertionError("unreachable")


# The setting that decides each drop reason a user can change.
_SETTING_OF = {"too_small": "ingest.min_side", "too_many_pixels": "ingest.max_pixels",
               "too_large": "ingest.max_file_bytes", "noai": "download.respect_noai", "timeout": "download.timeout"}


def _all_dropped_hint(cfg: Config, n_in: int, dropped: dict) -> str:
    """One line naming the main reason and the setting that would keep the inputs."""
    reason, n = max(dropped.items(), key=lambda kv: kv[1])
    line = f"all {n_in:,} inputs dropped; {n:,} as {reason}"
    if reason in _SETTING_OF:
        key = _SETTING_OF[reason]
        value = functools.reduce(getattr, key.split("."), cfg)
        line += f"; {key} is {value}"
    return line
