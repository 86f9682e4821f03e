"""Hierarchical k-means with resampling (Vo et al. 2024), with a split mode and resumable checkpoints.

Level 1 clusters the embeddings, level l clusters the centroids of level l-1. Each level runs
`resampling_steps` steps as the reference (facebookresearch/ssl-data-curation,
scripts/run_distributed_kmeans.py) does: step 0 is a k-means on all the level's points; every later
step draws `sample_size` points per cluster of the previous step ('c': the closest to its centroid,
'r': uniformly at random, seeded), runs a full k-means (fresh k-means++ init, `n_iters`) on the
union of the samples, then reassigns all the level's points. The first fit counts as a step, so
resampling_steps 0 or 1 means no resampling. Sampling a fixed number per cluster moves centroids
from dense regions to the whole support, which is what makes balanced sampling flatten concepts.

Split mode (a huge level): k-means with `split` clusters, then cluster j of n_j points gets
k_j sub-clusters, the largest-remainder apportionment of n_clusters proportional to n_j with
1 <= k_j <= n_j (`apportion`), and a k-means inside it; then all points are reassigned globally
(split_assign "global"), or each point keeps its sub-cluster inside its split ("within", the
reference's split mode: no pass ever holds all n_clusters centroids, so k can be 10M).

Checkpoints (optional directory): centroids_l{L}_step{S}.npy, assign_l{L}_step{S}.npy,
dists_l{L}_step{S}.npy (S = 0 after the fit, S = s after resampling step s), centroids_l{L}.npy and
assign_l{L}.npy when level L is done, and state.json (the run's settings and the last finished
step) written last; all atomically (temp file + os.replace). Every random draw is seeded by
(seed, level, step), so a resumed run ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from curate.kmeans import (
    DEFAULT_CHUNK,
    ArrayVectors,
    Seed,
    StepFn,
    Vectors,
    as_vectors,
    kmeans,
    local_step_fn,
)


@dataclass(frozen=True)
class LevelSpec:
    """Settings of one level of the tree."""

    n_clusters: int
    n_iters: int = 20
    resampling_steps: int = 0  # steps including the first fit (reference n_resampling_steps): 0 or 1 = none
    sample_size: int = 0  # points drawn per cluster at each resampling step
    sampling: str = "c"  # 'c': closest to the centroid, 'r': random
    init: str = "kmeans++"  # or 'random'
    split: int = 0  # > 0: k-means with `split` clusters first, then k-means inside each (see apportion)
    init_sample_size: int | None = None
    split_assign: str = "global"  # split mode: "global" reassigns every point, "within" keeps it in its split

    def __post_init__(self) -> None:
        if self.n_clusters < 1 or self.n_iters < 0 or self.resampling_steps < 0 or self.split < 0:
            raise ValueError(f"invalid level settings: {self}")
        if self.split_assign not in ("global", "within"):
            raise ValueError(f"split_assign must be 'global' or 'within', got {self.split_assign!r}")
        if self.split_assign == "within" and self.split and self.resampling_steps > 1:
            raise ValueError("split_assign 'within' cannot resample (a resampling step reassigns every point to all "
                             "n_clusters centroids); set resampling_steps to 1, as the reference does at a split level")
        if self.resampling_steps > 1 and (self.sample_size < 1 or self.sampling not in ("c", "r")):
            raise ValueError("resampling needs sample_size >= 1 and sampling 'c' or 'r'")

    @property
    def n_steps(self) -> int:
        """Steps of the level: the first fit plus resampling_steps - 1 resampling steps."""
        return max(1, self.resampling_steps)


@dataclass
class TreeResult:
    """Per-level centroids and assignments; assignments[0] is per point, assignments[l] per level-l centroid."""

    centroids: list[np.ndarray]
    assignments: list[np.ndarray]
    sq_dists: np.ndarray  # float32 [n]: squared distance of each point to its level-1 centroid
    objectives: list[list[float]] = field(default_factory=list)  # per level: inertia of every assignment pass

    def paths(self) -> np.ndarray:
        """int32 [n, L]: cluster_l1 .. cluster_lL of every point (column 0 is the finest level)."""
        return cluster_paths(self.assignments)


def level_settings(spec: LevelSpec) -> dict:
    """The level's settings as a dict; split_assign only when it is not the default, so that runs and keys
    made before it existed stay valid."""
    out = asdict(spec)
    if out["split_assign"] == "global":
        del out["split_assign"]
    return out


def cluster_paths(assignments: Sequence[np.ndarray]) -> np.ndarray:
    """Follow each point up the tree: cluster_l(l+1) = level-(l+1) cluster of its level-l centroid."""
    cols = [np.asarray(assignments[0], dtype=np.int32)]
    for a in assignments[1:]:
        cols.append(np.asarray(a, dtype=np.int32)[cols[-1]])
    return np.stack(cols, axis=1)


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` sub-clusters over clusters of `sizes`: largest remainder, 1 <= k_j <= size_j."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n, live = int(sizes.sum()), int((sizes > 0).sum())
    if not live <= total <= n:
        raise ValueError(f"cannot split into {total} clusters: {live} non-empty clusters, {n} points")
    ks = np.clip(total * sizes // n, (sizes > 0).astype(np.int64), sizes)
    while (diff := total - int(ks.sum())) != 0:
        gap = total * sizes - ks * n  # n * (exact quota - k_j), an integer
        if diff > 0:
            cand = np.flatnonzero(ks < sizes)
            pick = cand[np.argsort(-gap[cand], kind="stable")][:diff]
            ks[pick] += 1
        else:
            cand = np.flatnonzero(ks > 1)
            pick = cand[np.argsort(gap[cand], kind="stable")][:-diff]
            ks[pick] -= 1
    return ks


def _rng_of(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)


def sample_per_cluster(
    labels: np.ndarray, dists: np.ndarray, k: int, size: int, sampling: str, seed: Seed
) -> np.ndarray:
    """Sorted rows of up to `size` points per cluster: the closest ('c') or random ('r') ones."""
    if sampling == "c":
        key = dists
    elif sampling == "r":
        key = _rng_of(seed).random(len(labels))
    else:
        raise ValueError(f"unknown sampling {sampling!r} (c | r)")
    order = np.lexsort((key, labels))
    counts = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[labels[order]]
    return np.sort(order[rank < size])


def resampling_step(
    data: Vectors, labels: np.ndarray, dists: np.ndarray, spec: LevelSpec, seed: Seed, step: StepFn,
    chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One resampling step: sample per cluster, a fresh k-means on the union, reassign all points.

    Returns the new centroids, labels, squared distances and the inertia of the reassignment.
    """
    k = spec.n_clusters
    rows = sample_per_cluster(labels, dists, k, spec.sample_size, spec.sampling, [*seed, 0])
    if len(rows) < k:  # empty clusters left too few samples: top up with random other points
        rest = np.setdiff1d(np.arange(data.n), rows)
        extra = _rng_of([*seed, 1]).choice(rest, size=min(len(rest), k - len(rows)), replace=False)
        rows = np.sort(np.concatenate([rows, extra]))
    y = ArrayVectors(data.take(rows))
    fit = kmeans(y, k, spec.n_iters, init=spec.init, seed=[*seed, 2], init_sample_size=spec.init_sample_size,
                 chunk_size=chunk_size, gpu=gpu)
    full, labels, dists = step(fit.centroids)
    return fit.centroids, labels, dists, full.inertia


def split_fit(
    data: Vectors, spec: LevelSpec, seed: Seed, step: StepFn, chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None,
    within: list | None = None,
) -> tuple[np.ndarray, list[float]]:
    """k-means with spec.split clusters, then k-means with apportion(sizes) clusters inside each one.

    `within` (a list) receives the labels and squared distances of every point inside its own split."""
    coarse = kmeans(data, spec.split, spec.n_iters, init=spec.init, seed=[*seed, 0],
                    init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step)
    sizes = np.bincount(coarse.labels, minlength=spec.split)
    ks = apportion(sizes, spec.n_clusters)
    order = np.argsort(coarse.labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    if within is not None:
        labels, dists = np.empty(data.n, dtype=np.int32), np.empty(data.n, dtype=np.float32)
    first = 0
    for j in np.flatnonzero(ks):
        rows = order[bounds[j] : bounds[j + 1]]
        sub = kmeans(data.take(rows), int(ks[j]), spec.n_iters, init=spec.init, seed=[*seed, 1, int(j)],
                     init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu)
        parts.append(sub.centroids)
        if within is not None:
            labels[rows], dists[rows] = sub.labels + first, sub.sq_dists
        first += int(ks[j])
    if within is not None:
        within.extend([labels, dists])
    return np.concatenate(parts), coarse.objective


class Checkpoints:
    """Atomic per-(level, step) files in a directory, and the state.json that marks what is done."""

    def __init__(self, directory: str | os.PathLike | None, run: dict) -> None:
        self.dir = Path(directory) if directory is not None else None
        self.run = run
        self.state: dict = {"run": run, "level": 0, "step": -1, "objectives": {}}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "state.json"
            if path.exists():
                state = json.loads(path.read_text())
                if state["run"] != run:
                    raise ValueError(f"{self.dir} holds checkpoints of another run: {state['run']}")
                self.state = state

    def _write(self, name: str, write: Callable[[object], None]) -> None:
        path = self.dir / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def done(self, level: int) -> int:
        """Last finished step of `level` (-1: none)."""
        if self.state["level"] > level:
            return 10**9
        return self.state["step"] if self.state["level"] == level else -1

    def load(self, level: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
        """Centroids, labels, distances and objectives saved at (level, step)."""
        names = [f"centroids_l{level}_step{step}", f"assign_l{level}_step{step}", f"dists_l{level}_step{step}"]
        c, a, d = (np.load(self.dir / f"{n}.npy") for n in names)
        return c, a, d, list(self.state["objectives"][str(level)])

    def save(self, level: int, step: int, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], objective: list[float],
             final: bool) -> None:
        """Write the step's arrays, then the state; drop the previous step's per-point arrays."""
        self.state.update(level=level, step=step)
        self.state["objectives"][str(level)] = list(objective)
        if self.dir is None:
            return
        for prefix, arr in zip(("centroids", "assign", "dists"), arrays):
            self._write(f"{prefix}_l{level}_step{step}.npy", lambda fh, a=arr: np.save(fh, a))
            if final and prefix != "dists":
                self._write(f"{prefix}_l{level}.npy", lambda fh, a=arr: np.save(fh, a))
        self._write("state.json", lambda fh: fh.write(json.dumps(self.state, indent=1).encode()))
        for prefix in ("assign", "dists"):
            (self.dir / f"{prefix}_l{level}_step{step - 1}.npy").unlink(missing_ok=True)


def hierarchical_kmeans(
    vectors: Vectors | np.ndarray | str | os.PathLike,
    levels: Sequence[LevelSpec],
    *,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    gpu: bool | None = None,
    step_fn: StepFn | None = None,
    on_checkpoint: Callable[[int, int], None] | None = None,
) -> TreeResult:
    """Fit the levels bottom-up, each with its resampling steps; resumes from checkpoint_dir at the last finished step.

    step_fn runs level 1's full-data passes (e.g. distributed); on_checkpoint(level, step) follows each step.
    """
    vectors = as_vectors(vectors)
    run = {"n": vectors.n, "dim": vectors.dim, "seed": seed, "levels": [level_settings(s) for s in levels],
           "resampling": "refit"}
    ckpt = Checkpoints(checkpoint_dir, run)
    centroids: list[np.ndarray] = []
    assignments: list[np.ndarray] = []
    objectives: list[list[float]] = []
    level1_dists = np.zeros(0, np.float32)
    for level, spec in enumerate(levels, start=1):
        data = vectors if level == 1 else ArrayVectors(centroids[-1])
        step = step_fn if (level == 1 and step_fn is not None) else local_step_fn(data, chunk_size, gpu)
        last = ckpt.done(level)
        if last >= 0:
            start = min(last, spec.n_steps - 1)
            c, labels, dists, obj = ckpt.load(level, start)
            start += 1
        else:
            if spec.split:
                within: list | None = [] if spec.split_assign == "within" else None
                c, obj = split_fit(data, spec, [seed, level], step, chunk_size, gpu, within)
                if within is None:
                    stats, labels, dists = step(c)
                    obj = obj + [stats.inertia]
                else:
                    labels, dists = within
                    obj = obj + [float(dists.sum(dtype=np.float64))]
            else:
                res = kmeans(data, spec.n_clusters, spec.n_iters, init=spec.init, seed=[seed, level, 0],
                             init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step)
                c, labels, dists, obj = res.centroids, res.labels, res.sq_dists, res.objective
            ckpt.save(level, 0, (c, labels, dists), obj, spec.n_steps == 1)
            if on_checkpoint is not None:
                on_checkpoint(level, 0)
            start = 1
        for s in range(start, spec.n_steps):
            c, labels, dists, inertia = resampling_step(data, labels, dists, spec, [seed, level, 2, s], step,
                                                        chunk_size, gpu)
            obj = obj + [inertia]
            ckpt.save(level, s, (c, labels, dists), obj, s == spec.n_steps - 1)
            if on_checkpoint is not None:
                on_checkpoint(level, s)
        centroids.append(c)
        assignments.append(labels)
        objectives.append(obj)
        if level == 1:
            level1_dists = dists
    return TreeResult(centroids, assignments, level1_dists, objectives)
