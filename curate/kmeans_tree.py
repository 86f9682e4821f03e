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
from curate.kmeans_parts import Assignment, chunk_sizes, complement_rows, sample_per_cluster_parts, save_npy_atomic


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
    data: Vectors, assignment: Assignment, spec: LevelSpec, seed: Seed, step: StepFn,
    chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None, out: Assignment | None = None,
) -> tuple[np.ndarray, Assignment, float]:
    """One resampling step: sample per cluster (part by part), a fresh k-means on the union, reassign all points.

    Returns the new centroids, the new assignment (`out`, or one in memory) and the inertia of the reassignment.
    """
    k = spec.n_clusters
    rng = _rng_of([*seed, 0]) if spec.sampling == "r" else None
    rows = sample_per_cluster_parts(assignment, k, spec.sample_size, spec.sampling, rng)
    if len(rows) < k:  # empty clusters left too few samples: top up with random other points
        rest = data.n - len(rows)  # the draw of rng.choice(setdiff1d(arange(n), rows)), without listing it
        picks = _rng_of([*seed, 1]).choice(rest, size=min(rest, k - len(rows)), replace=False)
        rows = np.sort(np.concatenate([rows, complement_rows(rows, picks)]))
    y = ArrayVectors(data.take(rows))
    fit = kmeans(y, k, spec.n_iters, init=spec.init, seed=[*seed, 2], init_sample_size=spec.init_sample_size,
                 chunk_size=chunk_size, gpu=gpu)
    out = out if out is not None else Assignment(assignment.sizes)
    full = step(fit.centroids, out)
    return fit.centroids, out, full.inertia


ROUTE_CHUNKS = 64  # chunks of coarse labels one routing job reads
BUCKET_POINTS = (1 << 16, 1 << 23)  # a bucket of consecutive splits holds ~n/64 points, within these bounds


def split_buckets(split_sizes: np.ndarray, bucket_points: int) -> np.ndarray:
    """Edges of buckets of consecutive splits, each of at most `bucket_points` points (or one split)."""
    edges, total = [0], 0
    for j, size in enumerate(np.asarray(split_sizes, dtype=np.int64).tolist()):
        if total and total + size > bucket_points:
            edges.append(j)
            total = 0
        total += size
    edges.append(len(split_sizes))
    return np.asarray(edges, dtype=np.int64)


def route_chunks(assign_dir: str | None, sizes: np.ndarray, edges: np.ndarray, first_chunk: int, last_chunk: int,
                 out_dir: str | None, job: int, labels_of: Sequence[np.ndarray] | None = None) -> list | None:
    """One routing job of split mode: the points of chunks [first_chunk, last_chunk) of the coarse assignment
    (a directory, or `labels_of` in memory) sent to their bucket of splits, as (global rows, split) in row
    order; written as route-{job}-{bucket}.npy files in out_dir (a task's output), else returned per bucket."""
    coarse = Assignment(sizes, assign_dir) if assign_dir is not None else None
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows, labels = [], []
    for i in range(first_chunk, last_chunk):
        lab = labels_of[i] if labels_of is not None else coarse.get(i)[0]
        rows.append(np.arange(len(lab), dtype=np.int64) + offsets[i])
        labels.append(np.asarray(lab, dtype=np.int64))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    bucket = np.searchsorted(edges, labels, side="right") - 1
    order = np.argsort(bucket, kind="stable")  # rows stay ascending inside each bucket
    cuts = np.searchsorted(bucket[order], np.arange(len(edges)))
    out = []
    for b in range(len(edges) - 1):
        take = order[cuts[b] : cuts[b + 1]]
        pair = np.stack([rows[take], labels[take]])
        if out_dir is None:
            out.append(pair)
        elif len(take):
            save_npy_atomic(Path(out_dir) / f"route-{job:05d}-{b:05d}.npy", pair)
    return out if out_dir is None else None


def fit_bucket(data: Vectors, spec: LevelSpec, seed: Seed, chunk_size: int, gpu: bool | None, ks: np.ndarray,
               first: np.ndarray, within: bool, out_dir: str | None, bucket: int, lo: int, hi: int,
               routed: Sequence[np.ndarray] | None = None, n_jobs: int = 0) -> tuple[dict, tuple | None]:
    """The k-means inside each split j in [lo, hi) of one bucket (k = ks[j], seeded by (seed, 1, j), on the
    split's points in row order): {split: centroids}, and with `within` the bucket's (rows, labels, squared
    distances) in row order, written as within-{rows,labels,dists}-{bucket}.npy in out_dir (a task's output)
    or returned."""
    parts = routed if routed is not None else [
        np.load(f) for f in (Path(out_dir) / f"route-{m:05d}-{bucket:05d}.npy" for m in range(n_jobs)) if f.exists()]
    pairs = np.concatenate([p for p in parts if p.shape[1]], axis=1) if parts else np.zeros((2, 0), np.int64)
    rows, labels = pairs[0], pairs[1]
    order = np.argsort(labels, kind="stable")  # each split's rows ascending, as they came
    cuts = np.searchsorted(labels[order], np.arange(lo, hi + 1))
    centroids, sub_labels, sub_dists = {}, np.zeros(len(rows), np.int32), np.zeros(len(rows), np.float32)
    for j in range(lo, hi):
        if not ks[j]:
            continue
        at = order[cuts[j - lo] : cuts[j - lo + 1]]
        sub = kmeans(data.take(rows[at]), int(ks[j]), spec.n_iters, init=spec.init, seed=[*seed, 1, int(j)],
                     init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu)
        centroids[j] = sub.centroids
        if within:
            sub_labels[at], sub_dists[at] = (sub.labels + int(first[j])).astype(np.int32), sub.sq_dists
    if not within:
        return centroids, None
    by_row = np.argsort(rows, kind="stable")
    triple = (rows[by_row], sub_labels[by_row], sub_dists[by_row])
    if out_dir is None:
        return centroids, triple
    d = Path(out_dir)
    save_npy_atomic(d / f"within-rows-{bucket:05d}.npy", triple[0])
    save_npy_atomic(d / f"within-labels-{bucket:05d}.npy", triple[1])
    save_npy_atomic(d / f"within-dists-{bucket:05d}.npy", triple[2])
    return centroids, None


def within_chunk(out_dir: str | None, n_buckets: int, i: int, start: int, size: int, assign_dir: str | None,
                 sizes: np.ndarray, triples: Sequence[tuple] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Chunk i's labels and distances inside its splits, gathered from every bucket's rows (binary search in
    each bucket's sorted rows); written to the Assignment directory (a task's output) or returned."""
    labels, dists = np.zeros(size, dtype=np.int32), np.zeros(size, dtype=np.float32)
    for b in range(n_buckets):
        if triples is not None:
            rows, lab, dist = triples[b]
        else:
            path = Path(out_dir) / f"within-rows-{b:05d}.npy"
            if not path.exists():  # an empty bucket
                continue
            rows = np.load(path, mmap_mode="r")
            lab = np.load(Path(out_dir) / f"within-labels-{b:05d}.npy", mmap_mode="r")
            dist = np.load(Path(out_dir) / f"within-dists-{b:05d}.npy", mmap_mode="r")
        lo, hi = np.searchsorted(rows, [start, start + size])
        where = np.asarray(rows[lo:hi]) - start
        labels[where], dists[where] = lab[lo:hi], dist[lo:hi]
    if assign_dir is None:
        return labels, dists
    Assignment(sizes, assign_dir).put(i, labels, dists)
    return None


def split_fit(
    data: Vectors, spec: LevelSpec, seed: Seed, step: StepFn, chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None,
    within: Assignment | None = None, scratch: str | os.PathLike | None = None, mapper=None,
) -> tuple[np.ndarray, list[float]]:
    """k-means with spec.split clusters, then k-means with apportion(sizes) clusters inside each one.

    `within` (an Assignment) receives the labels and squared distances of every point inside its own split.
    The splits' points are routed to buckets of consecutive splits (one pass over the coarse labels, in jobs
    of ROUTE_CHUNKS chunks), each bucket's k-means run by one job, and the within labels gathered back per
    chunk; with `scratch` (a directory) all of it goes through files there (removed at the end), so the jobs
    can be `mapper`'s tasks (e.g. Ray: the driver then holds O(splits + clusters)); without it, in memory."""
    from curate.dedup import map_in_order

    sizes = chunk_sizes(data.n, chunk_size)
    tmp = Path(scratch) if scratch is not None else None
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    coarse_out = Assignment(sizes, tmp / "coarse" if tmp is not None else None)
    coarse = kmeans(data, spec.split, spec.n_iters, init=spec.init, seed=[*seed, 0],
                    init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step,
                    out=coarse_out)
    split_sizes = coarse_out.counts(spec.split)
    ks = apportion(split_sizes, spec.n_clusters)
    first = np.concatenate([[0], np.cumsum(ks)]).astype(np.int64)  # each split's first sub-cluster
    edges = split_buckets(split_sizes, int(np.clip(data.n // 64, *BUCKET_POINTS)))
    n_buckets, mapper = len(edges) - 1, mapper if tmp is not None else None  # in memory: here
    route_jobs = [(int(c), int(min(c + ROUTE_CHUNKS, len(sizes)))) for c in range(0, len(sizes), ROUTE_CHUNKS)]
    want_within = within is not None
    if tmp is None:  # in memory: the same jobs, their outputs passed along
        labels_of = [coarse_out.get(i)[0] for i in range(len(sizes))]
        routed = [route_chunks(None, sizes, edges, a, b, None, m, labels_of) for m, (a, b) in enumerate(route_jobs)]
        fits = [fit_bucket(data, spec, seed, chunk_size, gpu, ks, first, want_within, None, b, int(edges[b]),
                           int(edges[b + 1]), [r[b] for r in routed]) for b in range(n_buckets)]
    else:
        routes = tmp / "routes"
        routes.mkdir(parents=True, exist_ok=True)
        map_in_order(mapper, route_chunks, [(str(coarse_out.dir), sizes, edges, a, b, str(routes), m)
                                            for m, (a, b) in enumerate(route_jobs)])
        fits = map_in_order(mapper, fit_bucket, [(want_within, str(routes), b, int(edges[b]), int(edges[b + 1]), None,
                                                  len(route_jobs)) for b in range(n_buckets)],
                            (data, spec, seed, chunk_size, gpu, ks, first))
    centroids = {j: c for fit, _ in fits for j, c in fit.items()}
    if want_within:
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if tmp is None or within.dir is None:
            triples = [t for _, t in fits] if tmp is None else None
            for i in range(len(sizes)):
                within.put(i, *within_chunk(str(tmp / "routes") if tmp is not None else None, n_buckets, i,
                                            int(offsets[i]), int(sizes[i]), None, sizes, triples))
        else:
            map_in_order(mapper, within_chunk, [(str(tmp / "routes"), n_buckets, i, int(offsets[i]), int(sizes[i]),
                                                 str(within.dir), sizes) for i in range(len(sizes))])
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return np.concatenate([centroids[j] for j in sorted(centroids)]), coarse.objective


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
        c = np.load(self.dir / f"centroids_l{level}_step{step}.npy")
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
            self._write(f"{prefix}_l{level}_step{step}.npy", lambda fh, a=arr: np.save(fh, a))
            if final and prefix != "dists":
                self._write(f"{prefix}_l{level}.npy", lambda fh, a=arr: np.save(fh, a))
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
) -> TreeResult:
    """Fit the levels bottom-up, each with its resampling steps; resumes from checkpoint_dir at the last finished step.

    step_fn runs level 1's full-data passes (e.g. distributed); upper_step_fn(level, points) gives the points of
    a level >= 2 (the centroids below) as vectors with parts and a step function over them (e.g. the same Ray
    mechanism); split_mapper (a curate Mapper, e.g. Ray tasks) runs level 1's split-mode jobs (routing, the
    k-means inside each bucket of splits, the within labels) when there is a checkpoint_dir; on_checkpoint(level,
    step) follows each step. With checkpoint_dir, level 1's labels and
    distances live there part by part (the driver never holds them all).
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
                                   ckpt.scratch(level), split_mapper)
                if within:
                    obj = obj + [float(sum(d.sum(dtype=np.float64) for _, _, _, d in assignment))]
                else:
                    obj = obj + [step(c, assignment).inertia]
            else:
                res = kmeans(data, spec.n_clusters, spec.n_iters, init=spec.init, seed=[seed, level, 0],
                             init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step,
                             out=assignment)
                c, obj = res.centroids, res.objective
            ckpt.save(level, 0, c, assignment, obj, spec.n_steps == 1)
            if on_checkpoint is not None:
                on_checkpoint(level, 0)
            start = 1
        for s in range(start, spec.n_steps):
            c, assignment, inertia = resampling_step(data, assignment, spec, [seed, level, 2, s], step, chunk_size,
                                                     gpu, ckpt.assignment(level, s, sizes))
            obj = obj + [inertia]
            ckpt.save(level, s, c, assignment, obj, s == spec.n_steps - 1)
            if on_checkpoint is not None:
                on_checkpoint(level, s)
        centroids.append(c)
        objectives.append(obj)
        if level == 1:
            level1 = assignment
        else:
            upper.append(assignment.arrays()[0])
    return TreeResult(centroids, level1, upper, objectives)
