"""Executors: the Ray side. Stages run locally by default; with `executor: ray` the stages run their
heavy work as Ray tasks (or actors) over parts on a cluster (`ray_address`, or a local Ray when none). The
workdir must be on storage every node sees. Tasks call the same library functions the local path
calls and write with the same atomic writers, so the files are the same whichever executor ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

# A task lost with its node (or its worker process) is rerun by Ray this many times; the work
# functions are idempotent (a finished output is skipped, every write is atomic), so a rerun is safe.
TASK_RETRIES = 4


def init_ray(address: str | None = None) -> None:
    """Connect to a Ray cluster (or start a local one) once per process."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)


def ray_map(fn: Callable[..., Any], jobs: Sequence[tuple], address: str | None = None, num_cpus: float = 1,
            retries: int = TASK_RETRIES, shared: tuple = ()) -> Iterator[tuple[int, Any]]:
    """Run `fn(*shared, *job)` for every job as a Ray task; yields (job index, result) as tasks finish.

    `shared` arguments are put in the object store once (each node fetches them once), not per task.

    `fn` must be a module-level function (workers import it). At most two tasks per CPU of the cluster
    are out at a time. A task whose node or worker dies is retried by Ray (`retries` times); an
    exception raised by `fn` itself is not retried and ends the stage with that error (parts already
    written are kept, so a rerun resumes)."""
    import ray

    init_ray(address)
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=retries, retry_exceptions=False)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    refs = [ray.put(x) for x in shared]
    todo = iter(enumerate(jobs))
    pending: dict = {}
    try:
        while True:
            for i, job in todo:
                pending[remote.remote(*refs, *job)] = i
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            yield i, ray_get(done[0])
    finally:
        for ref in pending:  # an error (or an abandoned generator) stops the stage's other tasks
            ray.cancel(ref)



def ray_mapper(address: str | None = None) -> Callable[..., Iterator[tuple[int, Any]]]:
    """A curate Mapper (mapper(fn, jobs, shared)) that runs the jobs as Ray tasks (ray_map)."""
    def mapper(fn: Callable[..., Any], jobs: Sequence[tuple], shared: tuple = ()) -> Iterator[tuple[int, Any]]:
        return ray_map(fn, jobs, address, shared=shared)
    return mapper


def stage_mapper(executor: str, address: str | None = None) -> Callable[..., Iterator[tuple[int, Any]]] | None:
    """The Mapper a stage passes to curate: Ray tasks with executor ray; None (local calls, the same
    function on the same jobs) otherwise."""
    return ray_mapper(address) if executor == "ray" else None


def ray_get(ref: Any) -> Any:
    """ray.get, raising a task's own error as itself (its message stays one clear line, e.g. a full disk)."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from exc
        raise


def ray_shuffle(map_fn: Callable[..., list], map_jobs: Sequence[tuple], reduce_fn: Callable[..., Any],
                reduce_jobs: Sequence[tuple], address: str | None = None,
                retries: int = TASK_RETRIES) -> Iterator[tuple[int, Any]]:
    """Map/reduce over Ray tasks: `map_fn(*job)` returns one value per reducer; reducer r runs
    `reduce_fn(*reduce_jobs[r], *[value r of every map])`. Yields (r, result) as reducers finish.

    Map values stay in the object store (the driver holds only references); a value lost with its
    node is rebuilt by Ray rerunning its map task, and a lost task is retried (`retries` times)."""
    import ray

    init_ray(address)
    n_out = len(reduce_jobs)
    if not n_out:
        return
    mapper = ray.remote(map_fn).options(num_cpus=1, num_returns=n_out, max_retries=retries, retry_exceptions=False)
    reducer = ray.remote(reduce_fn).options(num_cpus=1, max_retries=retries, retry_exceptions=False)
    outs = [mapper.remote(*job) for job in map_jobs]
    outs = [o if isinstance(o, list) else [o] for o in outs]  # num_returns=1 gives one reference
    pending = {reducer.remote(*job, *[o[r] for o in outs]): r for r, job in enumerate(reduce_jobs)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(done[0])
            yield r, ray_get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


class _EmbedWorker:
    """One Ray actor: loads the model once, then embeds whole parts."""

    def __init__(self, spec: str, settings_kwargs: dict) -> None:
        from curate.embed import EmbedSettings, resolve_device
        from pipelines.embedding import load_embedder

        self.settings = EmbedSettings(**settings_kwargs)
        self.embedder = load_embedder(spec, resolve_device(self.settings.device))

    def ready(self) -> bool:
        """Answers once the model is loaded (parts go only to actors that started)."""
        return True

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
    pool = [remote.remote(spec, kwargs) for _ in range(actors)]
    starting = {actor.ready.remote(): actor for actor in pool}  # an actor whose node is gone never starts
    idle: list = []
    queue = list(jobs)
    running: dict = {}  # object ref -> (actor, job)
    last_error = ""
    while queue or running:
        while queue and idle:
            actor, job = idle.pop(), queue.pop(0)
            running[actor.run.remote(job[0], job[1], raw_root)] = (actor, job)
        if not running and not starting:
            raise RuntimeError(f"every embedding actor died with {len(queue)} part(s) left; rerun to resume"
                               + (f" (last error: {last_error})" if last_error else ""))
        [ref], _ = ray.wait([*running, *starting], num_returns=1)
        if ref in starting:
            actor = starting.pop(ref)
            try:
                ray.get(ref)
                idle.append(actor)
            except RayActorError as exc:
                last_error = str(exc).strip().splitlines()[-1][:300]
            continue
        actor, job = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as exc:  # the actor (or its node) is gone: its part goes back to the queue
            last_error = str(exc).strip().splitlines()[-1][:300]
            queue.insert(0, job)
            continue
        idle.append(actor)
        yield result
