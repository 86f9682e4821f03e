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
reference's split mode: no pass ever holds all n_clusters centroids, so k can be 10M). Split mode's jobs are in
curate.kmeans_split.

Checkpoints (optional directory): centroids_l{L}_step{S}.npy (S = 0 after the fit, S = s after
resampling step s); level 1's labels and distances as a directory assign_l1_step{S}/ of one
labels-XXXXX.npy / dists-XXXXX.npy pair per chunk of chunk_size rows (written by the pass that read
the chunk, so no process holds all of them), higher levels' as assign_l{L}_step{S}.npy and dists_l{L}_step{S}.npy;
centroids_l{L}.npy (and assign_l{L}.npy for L >= 2) when level L is done, and state.json (the
run's settings and the last finished step) written last; all atomically (temp file + os.replace).
Every random draw is seeded by (seed, level, step), so a resumed run ends exactly like an
uninterrupted one. Resampling draws its per-cluster samples part by part
(`kmeans_parts.sample_per_cluster_parts`: the rows `sample_per_cluster` picks from whole arrays).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
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
from curate.kmeans_parts import Assignment, chunk_sizes, complement_rows, sample_per_cluster_parts, write_npy
from curate.kmeans_pp import PlusPlus
from curate.kmeans_split import apportion, gathered_path, split_fit  # noqa: F401 (apportion re-exported)


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
    """Per-level centroids and assignments: level 1's per point, part by part (in memory or a directory), and
    upper[l - 1] mapping each level-l centroid to its level-(l+1) cluster."""

    centroids: list[np.ndarray]
    level1: Assignment  # labels and squared distances of every point to its level-1 centroid, per part
    upper: list[np.ndarray]
    objectives: list[list[float]] = field(default_factory=list)  # per level: inertia of every assignment pass

    @property
    def assignments(self) -> list[np.ndarray]:
        """[level-1 label of every point (all parts), level-2 cluster of every level-1 centroid, ...]."""
        return [self.level1.arrays()[0], *self.upper]

    @property
    def sq_dists(self) -> np.ndarray:
        """float32 [n]: squared distance of each point to its level-1 centroid (all parts)."""
        return self.level1.arrays()[1]

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


# refit(data, rows): the points of a refit (rows of data) as vectors, and a StepFn over them (None: local passes)
RefitFn = Callable[[Vectors, np.ndarray], tuple[Vectors, StepFn | None]]


def resampling_step(
    data: Vectors, assignment: Assignment, spec: LevelSpec, seed: Seed, step: StepFn,
    chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None, out: Assignment | None = None,
    pp: PlusPlus | None = None, refit: RefitFn | None = None,
) -> tuple[np.ndarray, Assignment, float]:
    """One resampling step: sample per cluster (part by part), a fresh k-means on the union, reassign all points.

    `refit` gives the union's points and the passes over them (e.g. a file read by Ray tasks: the driver then holds
    the rows, not the points); by default they are taken into memory and passed over here. Returns the new
    centroids, the new assignment (`out`, or one in memory) and the inertia of the reassignment.
    """
    k = spec.n_clusters
    rng = _rng_of([*seed, 0]) if spec.sampling == "r" else None
    rows = sample_per_cluster_parts(assignment, k, spec.sample_size, spec.sampling, rng)
    if len(rows) < k:  # empty clusters left too few samples: top up with random other points
        rest = data.n - len(rows)  # the draw of rng.choice(setdiff1d(arange(n), rows)), without listing it
        picks = _rng_of([*seed, 1]).choice(rest, size=min(rest, k - len(rows)), replace=False)
        rows = np.sort(np.concatenate([rows, complement_rows(rows, picks)]))
    y, y_step = refit(data, rows) if refit is not None else (ArrayVectors(data.take(rows)), None)
    fit = kmeans(y, k, spec.n_iters, init=spec.init, seed=[*seed, 2], init_sample_size=spec.init_sample_size,
                 chunk_size=chunk_size, gpu=gpu, step_fn=y_step, pp=pp)
    out = out if out is not None else Assignment(assignment.sizes)
    full = step(fit.centroids, out)
    return fit.centroids, out, full.inertia


class Checkpoints:
    """Atomic per-(level, step) files in a directory, and the state.json that marks what is done.

    Level 1's labels and distances are a directory per step (assign_l1_step{S}/, one file pair per part,
    written by whichever process ran the part); other levels' are whole arrays."""

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

    def _part_dir(self, level: int, step: int) -> Path | None:
        return self.dir / f"assign_l{level}_step{step}" if self.dir is not None and level == 1 else None

    def scratch(self, level: int) -> Path | None:
        """A scratch directory for level 1's split mode (None: in memory)."""
        return self.dir / f"split_l{level}" if self.dir is not None and level == 1 else None

    def assignment(self, level: int, step: int, sizes: np.ndarray) -> Assignment:
        """Where the pass of (level, step) puts its labels: level 1's part directory, else memory."""
        return Assignment(sizes, self._part_dir(level, step))

    def load(self, level: int, step: int, sizes: np.ndarray) -> tuple[np.ndarray, Assignment, list[float]]:
        """Centroids, assignment and objectives saved at (level, step)."""
        c = self.mapped(level, step)
        part_dir = self._part_dir(level, step)
        legacy = self.dir / f"assign_l{level}_step{step}.npy"  # whole arrays, as checkpoints were before parts
        if part_dir is not None and not (legacy.exists() and not part_dir.exists()):
            out = Assignment(sizes, part_dir)
            if not out.complete():
                raise ValueError(f"{part_dir} lacks parts of a finished step")
        else:
            labels, dists = (np.load(self.dir / f"{p}_l{level}_step{step}.npy") for p in ("assign", "dists"))
            out = Assignment(sizes)
            for i, (lo, hi) in enumerate(zip(out.offsets[:-1], out.offsets[1:])):
                out.put(i, labels[lo:hi], dists[lo:hi])
        return c, out, list(self.state["objectives"][str(level)])

    def mapped(self, level: int, step: int) -> np.ndarray:
        """The centroids saved at (level, step), memory-mapped (level 1's 10M x 1024 are 41 GB)."""
        return np.load(self.dir / f"centroids_l{level}_step{step}.npy", mmap_mode="r")

    def save(self, level: int, step: int, centroids: np.ndarray, assignment: Assignment, objective: list[float],
             final: bool) -> None:
        """Write the step's arrays (level 1's parts are already in place), then the state; drop the previous
        step's per-point arrays."""
        self.state.update(level=level, step=step)
        self.state["objectives"][str(level)] = list(objective)
        if self.dir is None:
            return
        arrays = {"centroids": centroids}
        if assignment.dir is None:
            arrays["assign"], arrays["dists"] = assignment.arrays()
        for prefix, arr in arrays.items():
            self._write(f"{prefix}_l{level}_step{step}.npy", lambda fh, a=arr: write_npy(fh, a))
            if final and prefix != "dists":
                self._write(f"{prefix}_l{level}.npy", lambda fh, a=arr: write_npy(fh, a))
        self._write("state.json", lambda fh: fh.write(json.dumps(self.state, indent=1).encode()))
        for prefix in ("assign", "dists"):
            (self.dir / f"{prefix}_l{level}_step{step - 1}.npy").unlink(missing_ok=True)
        previous = self._part_dir(level, step - 1)
        if previous is not None and step > 0:
            shutil.rmtree(previous, ignore_errors=True)


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
    upper_step_fn: Callable[[int, np.ndarray], tuple[Vectors, StepFn]] | None = None,
    split_mapper: Callable | None = None,
    pp: PlusPlus | None = None,
    refit_fn: Callable[[int, int, Vectors, np.ndarray], tuple[Vectors, StepFn | None]] | None = None,
) -> TreeResult:
    """Fit the levels bottom-up, each with its resampling steps; resumes from checkpoint_dir at the last finished step.

    step_fn runs level 1's full-data passes (e.g. distributed); upper_step_fn(level, points) gives the points of
    a level >= 2 (the centroids below) as vectors with parts and a step function over them (e.g. the same Ray
    mechanism); split_mapper (a curate Mapper, e.g. Ray tasks) runs level 1's split-mode jobs (routing, the
    k-means inside each bucket of splits, the within labels) when there is a checkpoint_dir; on_checkpoint(level,
    step) follows each step; pp says how the k-means++ of the full fits and refits (not those inside the splits)
    cut their rows into shards and what runs them (e.g. Ray actors); refit_fn(level, step, data, rows) gives a
    resampling refit's points and passes (`RefitFn`; default in memory, local passes). With checkpoint_dir, level
    1's labels and distances live there part by part (the driver never holds them all).
    """
    vectors = as_vectors(vectors)
    run = {"n": vectors.n, "dim": vectors.dim, "seed": seed, "levels": [level_settings(s) for s in levels],
           "resampling": "refit"}
    ckpt = Checkpoints(checkpoint_dir, run)
    centroids: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    objectives: list[list[float]] = []
    level1: Assignment | None = None
    for level, spec in enumerate(levels, start=1):
        if level == 1:
            data = vectors
            step = step_fn if step_fn is not None else local_step_fn(data, chunk_size, gpu)
        elif upper_step_fn is not None:
            data, step = upper_step_fn(level, centroids[-1])
        else:
            data = ArrayVectors(centroids[-1])
            step = local_step_fn(data, chunk_size, gpu)
        sizes = chunk_sizes(data.n, chunk_size)
        last = ckpt.done(level)
        if last >= 0:
            start = min(last, spec.n_steps - 1)
            c, assignment, obj = ckpt.load(level, start, sizes)
            start += 1
        else:
            assignment = ckpt.assignment(level, 0, sizes)
            if spec.split:
                within = spec.split_assign == "within"
                c, obj = split_fit(data, spec, [seed, level], step, chunk_size, gpu, assignment if within else None,
                                   ckpt.scratch(level), split_mapper, pp)
                if within:
                    obj = obj + [float(sum(d.sum(dtype=np.float64) for _, _, _, d in assignment))]
                else:
                    obj = obj + [step(c, assignment).inertia]
            else:
                res = kmeans(data, spec.n_clusters, spec.n_iters, init=spec.init, seed=[seed, level, 0],
                             init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step,
                             out=assignment, pp=pp)
                c, obj = res.centroids, res.objective
            ckpt.save(level, 0, c, assignment, obj, spec.n_steps == 1)
            if ckpt.dir is not None:  # held from the checkpoint, not in memory (split mode's file beside it goes)
                c = ckpt.mapped(level, 0)
                if ckpt.scratch(level) is not None:
                    gathered_path(ckpt.scratch(level)).unlink(missing_ok=True)
            if on_checkpoint is not None:
                on_checkpoint(level, 0)
            start = 1
        for s in range(start, spec.n_steps):
            refit = None if refit_fn is None else partial(refit_fn, level, s)
            c, assignment, inertia = resampling_step(data, assignment, spec, [seed, level, 2, s], step, chunk_size,
                                                     gpu, ckpt.assignment(level, s, sizes), pp, refit)
            obj = obj + [inertia]
            ckpt.save(level, s, c, assignment, obj, s == spec.n_steps - 1)
            c = c if ckpt.dir is None else ckpt.mapped(level, s)
            if on_checkpoint is not None:
                on_checkpoint(level, s)
        centroids.append(c)
        objectives.append(obj)
        if level == 1:
            level1 = assignment
        else:
            upper.append(assignment.arrays()[0])
    return TreeResult(centroids, level1, upper, objectives)
