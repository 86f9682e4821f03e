"""Executors: the Ray side. Stages run locally by default; with `executor: ray` the heavy part of a
stage runs on a Ray cluster (`ray_address`, or a local Ray when none) and the driver writes the
outputs, so the files are the same whichever executor ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def init_ray(address: str | None = None) -> None:
    """Connect to a Ray cluster (or start a local one) once per process."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)


class _EmbedWorker:
    """One Ray actor: loads the model once, then embeds whole parts."""

    def __init__(self, spec: str, settings_kwargs: dict) -> None:
        from curate.embed import EmbedSettings, resolve_device
        from pipelines.embedding import load_embedder

        self.settings = EmbedSettings(**settings_kwargs)
        self.embedder = load_embedder(spec, resolve_device(self.settings.device))

    def run(self, index: int, rows: list[dict], raw_root: str):
        from curate.embed import embed_rows

        e = self.embedder
        vecs, errs = embed_rows(rows, raw_root, e.model, e.transform, e.dim, self.settings)
        return index, vecs, errs


def ray_embed(spec: str, settings_kwargs: dict, jobs: Sequence[tuple[int, list[dict]]], raw_root: str,
              actors: int = 0, gpus_per_actor: float | None = None,
              address: str | None = None) -> Iterator[tuple[int, object, list[str]]]:
    """Embed parts over a pool of actors: one per GPU (num_gpus=1), or `actors` CPU actors.

    Yields (part index, float16 vectors, errors) as parts finish, in any order. A part whose actor
    dies (its node lost) goes back to the queue for the live actors; only when every actor is gone
    does the stage fail, with a clear error (a rerun resumes from the parts already written).
    """
    import ray
    from ray.exceptions import RayActorError

    init_ray(address)
    resources = ray.cluster_resources()
    n_gpus = int(resources.get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if n_gpus else 0.0
    if not actors:
        actors = max(1, int(n_gpus / gpus_per_actor) if gpus_per_actor else int(resources.get("CPU", 1)))
    kwargs = dict(settings_kwargs)
    if not gpus_per_actor:
        kwargs.update(device="cpu", num_workers=0, threads=1)
    remote = ray.remote(_EmbedWorker).options(num_cpus=1, num_gpus=gpus_per_actor)
    idle = [remote.remote(spec, kwargs) for _ in range(actors)]
    queue = list(jobs)
    running: dict = {}  # object ref -> (actor, job)
    while queue or running:
        while queue and idle:
            actor, job = idle.pop(), queue.pop(0)
            running[actor.run.remote(job[0], job[1], raw_root)] = (actor, job)
        if not running:
            raise RuntimeError(f"every embedding actor died with {len(queue)} part(s) left; rerun to resume")
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, job = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError:  # the actor (or its node) is gone: its part goes back to the queue
            queue.insert(0, job)
            continue
        idle.append(actor)
        yield result
