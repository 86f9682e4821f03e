"""Balanced sampling over the cluster tree (top-down, Vo et al. 2024) and retrieval from seed sets
(DINOv2's sample-based and cluster-based retrieval augmentation).

Balancing: the root quota is the target; each node splits its quota over its children with an
integer cap (`water_fill`): x = the largest integer with sum(min(x, size_child)) <= quota, each
child gets min(x, size_child), and the remaining quota - sum goes one each to children larger
than x, in a seeded random order. Down to the level-1 clusters, where records are picked
closest-to-centroid first ('c') or at random ('r': a hash of the seed and the record's global ingest
row, so any part computes its records' keys alone; ties go to the lower row). The target is met exactly when the pool
allows it; otherwise everything is selected and the shortfall is reported.

Repeats (multiplier m >= 1): every record may be chosen up to m times (child sizes count m
times); a leaf with quota q over s records repeats every record q // s times and q % s of them
(in strategy order) once more, so repeats are as even as possible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from curate.kmeans import Vectors, as_vectors, assign_chunk

KnnFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def water_fill(sizes: np.ndarray, quota: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """(alloc, cap): alloc_i = min(cap, size_i), plus one for some children with size_i > cap, so that
    sum(alloc) = min(quota, sum(sizes)); the extras go in rng order, else to the largest first.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    quota = min(int(quota), total)
    if quota >= total:
        return sizes.copy(), int(sizes.max(initial=0))
    ss = np.sort(sizes)
    m = len(ss)
    cs = np.concatenate([[0], np.cumsum(ss)])
    reach = cs[:-1] + (m - np.arange(m)) * ss  # sum(min(ss_j, size)) over all children
    j = int(np.searchsorted(reach, quota, side="right"))
    cap = int((quota - cs[j]) // (m - j))
    alloc = np.minimum(sizes, cap)
    extra = quota - int(alloc.sum())
    if extra:
        eligible = np.flatnonzero(sizes > cap)
        order = rng.permutation(eligible) if rng is not None else eligible[np.argsort(-sizes[eligible], kind="stable")]
        alloc[order[:extra]] += 1
    return alloc, cap


@dataclass
class BalanceResult:
    """Repeat count per record (0/1 without a multiplier), and where each selection came from."""

    counts: np.ndarray  # int32 [n]
    by_code: np.ndarray  # int32 [n]: index into by_labels of selected records, -1 otherwise
    by_labels: np.ndarray  # str [labels]: "l3:5/l2:17/l1:230", one per tree path with a selection
    report: dict = field(default_factory=dict)

    @property
    def selected(self) -> np.ndarray:
        """bool [n]: selected at least once."""
        return self.counts > 0

    @property
    def selected_by(self) -> np.ndarray:
        """str [n] (object): the tree path a selected record was chosen through, "" otherwise (a Python
        string per record: writers take by_code and by_labels instead)."""
        out = np.full(len(self.by_code), "", dtype=object)
        sel = self.by_code >= 0
        out[sel] = self.by_labels[self.by_code[sel]]
        return out


def _leaf_nodes(leaf_paths: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per level (0 = finest), over unique leaf paths [m, L]: the node of each leaf and the parent node of
    each node; nodes are numbered in the lexicographic order of their path prefixes, top level first."""
    m, levels = leaf_paths.shape
    node: list[np.ndarray] = [np.zeros(0, np.int64)] * levels
    parent: list[np.ndarray] = [np.zeros(0, np.int64)] * levels
    up = np.zeros(m, dtype=np.int64)  # the root
    for lv in range(levels - 1, -1, -1):
        col = leaf_paths[:, lv].astype(np.int64)
        col = col - col.min(initial=0)
        key = up * (int(col.max(initial=0)) + 1) + col
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        node[lv] = inverse.reshape(-1).astype(np.int64)
        parent[lv] = up[first]
        up = node[lv]
    return node, parent


def unique_leaves(paths: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leaf paths [m, L] in lexicographic order top level first, records per leaf, leaf of each row)."""
    paths = np.asarray(paths)
    paths = paths.reshape(len(paths), -1) if paths.ndim == 1 else paths
    if not len(paths):
        return np.zeros((0, paths.shape[1]), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = paths[:, ::-1].astype(np.int64)  # top level first: lexicographic order = tree order
    lo = top.min(axis=0)
    span = top.max(axis=0) - lo + 1
    if float(np.prod(span.astype(np.float64))) < 2.0**62:  # one int64 code per path: a 1-d unique
        code = np.zeros(len(top), np.int64)
        for c in range(top.shape[1]):
            code = code * span[c] + (top[:, c] - lo[c])
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        leaves = top[first]
    else:
        leaves, inverse = np.unique(top, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(inverse, weights=weights, minlength=len(leaves)).astype(np.int64)
    return np.ascontiguousarray(leaves[:, ::-1]), sizes, inverse


def tree_quotas(leaf_paths: np.ndarray, leaf_sizes: np.ndarray, target: int, multiplier: int = 1,
                seed: int = 0) -> tuple[np.ndarray, dict]:
    """Quota of every leaf (water_fill top-down over the tree the leaf paths [m, L] make, column 0 =
    cluster_l1, rows in `unique_leaves` order) and the report; O(leaves), no per-record state."""
    leaf_paths = np.asarray(leaf_paths)
    leaf_sizes = np.asarray(leaf_sizes, dtype=np.int64)
    levels = leaf_paths.shape[1]
    n = int(leaf_sizes.sum())
    rng = np.random.default_rng(seed)
    node, parent = _leaf_nodes(leaf_paths)
    quota = np.array([min(target, n * multiplier)], dtype=np.int64)  # the root
    report: dict = {"target": int(target), "pool": n, "multiplier": multiplier, "root_cap": None,
                    "root_cap_plus_one": 0,
                    "nodes_per_level": {f"l{lv + 1}": len(parent[lv]) for lv in range(levels)}}
    for lv in range(levels - 1, -1, -1):
        sizes = np.bincount(node[lv], weights=leaf_sizes, minlength=len(parent[lv])).astype(np.int64) * multiplier
        order = np.argsort(parent[lv], kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(parent[lv], minlength=len(quota)))])
        child_quota = np.zeros(len(parent[lv]), dtype=np.int64)
        for p in np.flatnonzero(quota):
            kids = order[bounds[p] : bounds[p + 1]]
            child_quota[kids], cap = water_fill(sizes[kids], int(quota[p]), rng)
            if lv == levels - 1:
                report["root_cap"] = cap
                report["root_cap_plus_one"] = int((child_quota[kids] > np.minimum(sizes[kids], cap)).sum())
        quota = child_quota
    return quota, report


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (splitmix64's finaliser), wrapping uint64 arithmetic."""
    with np.errstate(over="ignore"):
        z = x + _MIX[0]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        return z ^ (z >> np.uint64(31))


def order_keys(strategy: str, rows: np.ndarray, sq_dists: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """uint64 keys whose order (then the row, for ties) is the pick order inside a leaf: 'c' = the
    distance to the level-1 centroid (float order), 'r' = a hash of (seed, row), the same whichever
    part or process computes it."""
    if strategy == "c":
        f = np.asarray(sq_dists, dtype=np.float64) + 0.0  # -0.0 -> +0.0
        u = f.view(np.uint64)
        return np.where(u >> np.uint64(63), ~u, u | np.uint64(1 << 63))
    s = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _splitmix64(np.asarray(rows, dtype=np.int64).astype(np.uint64) ^ s)


def leaf_labels(leaf_paths: np.ndarray) -> np.ndarray:
    """The selected_by label of each leaf: "l3:5/l2:17/l1:230" (top level first)."""
    levels = leaf_paths.shape[1]
    label = np.full(len(leaf_paths), "", dtype=object)
    for lv in range(levels - 1, -1, -1):
        label = label + f"l{lv + 1}:" + leaf_paths[:, lv].astype(str).astype(object) + ("/" if lv else "")
    return label


def balanced_sample(
    paths: np.ndarray,
    target: int,
    *,
    strategy: str = "r",
    sq_dists: np.ndarray | None = None,
    multiplier: int = 1,
    seed: int = 0,
    rows: np.ndarray | None = None,
) -> BalanceResult:
    """Select `target` records top-down over the tree given by paths [n, L] (column 0 = cluster_l1), in
    memory (curate/balance_parts.py does the same over parts with O(clusters) state).

    strategy 'c' needs sq_dists (to the level-1 centroid); multiplier > 1 allows repeats (module doc).
    rows: each record's stable identity (its global ingest row; default 0..n-1): the 'r' key and ties.
    """
    paths = np.asarray(paths)
    paths = paths.reshape(len(paths), -1) if paths.ndim == 1 else paths
    n, levels = paths.shape
    check_settings(strategy, sq_dists is not None, multiplier, target)
    if n == 0:
        return BalanceResult(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, object),
                             {"target": int(target), "pool": 0, "selected": 0, "shortfall": int(target)})
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    leaves, size, leaf = unique_leaves(paths)
    quota, report = tree_quotas(leaves, size, target, multiplier, seed)
    report = with_strategy(report, strategy)
    key = order_keys(strategy, rows, sq_dists, seed)
    order = np.lexsort((rows, key, leaf))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.concatenate([[0], np.cumsum(size)[:-1]])[leaf[order]]
    counts = (quota[leaf] // size[leaf] + (rank < quota[leaf] % size[leaf])).astype(np.int32)
    # the path a record was chosen through is its leaf's: one label per leaf with a selection
    chosen = counts > 0
    picked = np.flatnonzero(quota > 0)
    code_of = np.full(len(quota), -1, dtype=np.int32)
    code_of[picked] = np.arange(len(picked), dtype=np.int32)
    by_code = np.where(chosen, code_of[leaf], -1).astype(np.int32)
    total = int(counts.sum())
    report.update(selected=total, unique=int(chosen.sum()), shortfall=int(target) - total)
    return BalanceResult(counts, by_code, leaf_labels(leaves[picked]), report)


def with_strategy(report: dict, strategy: str) -> dict:
    """The tree report with the strategy after the multiplier (the order the manifest has always had)."""
    head = {k: report[k] for k in ("target", "pool", "multiplier")}
    return {**head, "strategy": strategy, **{k: v for k, v in report.items() if k not in head}}


def check_settings(strategy: str, have_dists: bool, multiplier: int, target: int) -> None:
    """Refuse settings balanced sampling cannot run with (a clear ValueError)."""
    if strategy not in ("r", "c"):
        raise ValueError(f"unknown strategy {strategy!r} (r | c)")
    if strategy == "c" and not have_dists:
        raise ValueError("strategy 'c' needs sq_dists (distance of each record to its level-1 centroid)")
    if multiplier < 1 or target < 0:
        raise ValueError("multiplier must be >= 1 and target >= 0")


def explained_variance(points: np.ndarray, labels: np.ndarray) -> float:
    """1 - within-cluster / total sum of squares of `points` grouped by `labels` (float64): the structure a level finds."""
    x = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    if total == 0:
        return 0.0
    k = int(labels.max(initial=-1)) + 1
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    within = float((x * x).sum() - ((sums * sums).sum(axis=1) / np.maximum(counts, 1)).sum())
    return 1.0 - max(within, 0.0) / total


def structured_levels(centroids: Sequence[np.ndarray], assignments: Sequence[np.ndarray] | None = None,
                      min_explained: float = 0.7) -> int:
    """Tree levels worth balancing over: level 1, then each next level while its grouping of the level
    below's centroids explains >= min_explained of their variance. Above the concepts, an arbitrary
    grouping splits the quota unevenly and can select less evenly than random (bench/balance.py).
    assignments[l] maps level-l centroids to level l+1 (TreeResult.assignments); None: nearest centroid.
    """
    if assignments is None:
        assignments = [np.zeros(0)] + [assign_chunk(np.asarray(lo, np.float32), np.asarray(up, np.float32))[0]
                                       for lo, up in zip(centroids[:-1], centroids[1:])]
    depth = 1
    for lower, labels in zip(centroids[:-1], assignments[1:]):
        if explained_variance(lower, labels) < min_explained:
            break
        depth += 1
    return depth


@dataclass
class RetrievalResult:
    """Retrieved pool rows (ascending), each with the seed set, seed id and similarity that won it."""

    rows: np.ndarray  # int64
    seed_set: np.ndarray  # str
    seed_id: np.ndarray  # object: the id of the seed image
    sim: np.ndarray  # float32
    report: dict = field(default_factory=dict)


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rows, sims, set index, seed index


def _merge(cands: list[Candidates], names: Sequence[str], ids: Sequence[Sequence], report: dict) -> RetrievalResult:
    """Keep each pool row once: the candidate of highest similarity (ties: set order, then seed order)."""
    rows, sims, sets, seeds = (np.concatenate([c[i] for c in cands]) if cands else np.zeros(0) for i in range(4))
    rows, sets, seeds = rows.astype(np.int64), sets.astype(np.int64), seeds.astype(np.int64)
    order = np.lexsort((seeds, sets, -sims.astype(np.float64), rows))
    keep = order[np.concatenate([[True], rows[order][1:] != rows[order][:-1]])] if len(order) else order
    seed_id = np.array([ids[s][q] for s, q in zip(sets[keep], seeds[keep])], dtype=object)
    report["retrieved"] = int(len(keep))
    report["collisions"] = int(len(rows) - len(keep))
    for i, name in enumerate(names):
        report["sets"][name]["kept"] = int((sets[keep] == i).sum())
    return RetrievalResult(rows[keep], np.array(names, dtype=object)[sets[keep]], seed_id,
                           sims[keep].astype(np.float32), report)


def _as_sets(seed_sets: Mapping[str, np.ndarray], seed_ids: Mapping[str, Sequence] | None) -> tuple[list, list, list]:
    names = list(seed_sets)
    arrays = [np.ascontiguousarray(seed_sets[s], dtype=np.float32) for s in names]
    ids = [list(seed_ids[s]) if seed_ids and s in seed_ids else list(range(len(a))) for s, a in zip(names, arrays)]
    return names, arrays, ids


def _nearest_candidates(knn: KnnFn, q: np.ndarray, n: int, set_index: int) -> Candidates:
    """Candidates of the n nearest pool rows of every seed of one set (padding ids < 0 dropped)."""
    sims, found = knn(q, n)
    seeds = np.repeat(np.arange(len(q)), sims.shape[1])
    ok = found.reshape(-1) >= 0
    return found.reshape(-1)[ok], sims.reshape(-1)[ok], np.full(int(ok.sum()), set_index), seeds[ok]


def retrieve_nearest(
    knn: KnnFn,
    seed_sets: Mapping[str, np.ndarray],
    n_per_seed: int | Mapping[str, int] = 4,
    seed_ids: Mapping[str, Sequence] | None = None,
) -> RetrievalResult:
    """Sample-based retrieval: the n_per_seed nearest pool rows of every seed image, each row once."""
    names, arrays, ids = _as_sets(seed_sets, seed_ids)
    report: dict = {"mode": "sample", "sets": {}}
    cands = []
    for i, (name, q) in enumerate(zip(names, arrays)):
        n = n_per_seed[name] if isinstance(n_per_seed, Mapping) else n_per_seed
        c = _nearest_candidates(knn, q, n, i)
        cands.append(c)
        report["sets"][name] = {"mode": "sample", "seeds": len(q), "n_per_seed": n, "found": int(len(np.unique(c[0])))}
    return _merge(cands, names, ids, report)


def _cluster_candidates(
    q: np.ndarray, pool: Vectors, members: Callable[[int], np.ndarray], centroids: np.ndarray, set_index: int,
    min_seeds: int, per_cluster: int, max_per_set: int | None, strategy: str, rng: np.random.Generator,
) -> tuple[Candidates, dict]:
    """Up to per_cluster rows from each pool cluster holding more than min_seeds seeds of one set."""
    seed_labels, _ = assign_chunk(q, centroids)
    hits = np.bincount(seed_labels, minlength=len(centroids))
    clusters = np.flatnonzero(hits > min_seeds)
    avail = np.array([min(per_cluster, len(members(c))) for c in clusters], dtype=np.int64)
    alloc = water_fill(avail, max_per_set, rng)[0] if max_per_set is not None else avail
    out: list[list[np.ndarray]] = [[], [], [], []]
    for c, a in zip(clusters, alloc):
        rows = members(c)
        which = np.flatnonzero(seed_labels == c)
        sim_all = pool.take(rows) @ q[which].T
        best, sim = which[np.argmax(sim_all, axis=1)], sim_all.max(axis=1)
        pick = np.lexsort((rows, -sim))[:a] if strategy == "c" else np.sort(rng.choice(len(rows), a, replace=False))
        for lst, v in zip(out, (rows[pick], sim[pick], np.full(len(pick), set_index), best[pick])):
            lst.append(v)
    cands = tuple(np.concatenate(v) if v else np.zeros(0) for v in out)
    capped = max_per_set is not None and int(avail.sum()) > max_per_set
    return cands, {"clusters": int(len(clusters)), "capped": capped}


def retrieve(
    seed_sets: Mapping[str, np.ndarray],
    *,
    knn: KnnFn | None = None,
    pool: Vectors | np.ndarray | str | os.PathLike | None = None,
    pool_labels: np.ndarray | None = None,
    pool_centroids: np.ndarray | None = None,
    cluster_max_seeds: int = 10_000,
    n_per_seed: int | Mapping[str, int] = 4,
    min_seeds: int = 3,
    per_cluster: int = 1000,
    max_per_set: int | None | Mapping[str, int | None] = None,
    strategy: str = "c",
    seed: int = 0,
    seed_ids: Mapping[str, Sequence] | None = None,
) -> RetrievalResult:
    """Per seed set: cluster-based if it has <= cluster_max_seeds images (and pool clusters are given),
    else sample-based; each pool row kept once. Cluster-based: every pool cluster with > min_seeds
    seeds gives up to per_cluster rows ('c': most similar to them, 'r': random), <= max_per_set per set.
    n_per_seed and max_per_set may be per-set mappings.
    """
    if strategy not in ("c", "r"):
        raise ValueError(f"unknown strategy {strategy!r} (c | r)")
    names, arrays, ids = _as_sets(seed_sets, seed_ids)
    clustered = pool is not None and pool_labels is not None and pool_centroids is not None
    if clustered:
        vec = as_vectors(pool)
        labels = np.asarray(pool_labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=len(pool_centroids)))])

        def members(c: int) -> np.ndarray:
            return order[bounds[c] : bounds[c + 1]]

        centroids = np.asarray(pool_centroids, dtype=np.float32)
    report: dict = {"mode": "mixed", "sets": {}}
    cands = []
    for i, (name, q) in enumerate(zip(names, arrays)):
        n_set = n_per_seed[name] if isinstance(n_per_seed, Mapping) else n_per_seed
        cap = max_per_set.get(name) if isinstance(max_per_set, Mapping) else max_per_set
        if clustered and len(q) <= cluster_max_seeds:
            c, info = _cluster_candidates(q, vec, members, centroids, i, min_seeds, per_cluster, cap,
                                          strategy, np.random.default_rng([seed, i]))
            report["sets"][name] = {"mode": "cluster", "seeds": len(q), **info}
        elif knn is not None:
            c = _nearest_candidates(knn, q, n_set, i)
            report["sets"][name] = {"mode": "sample", "seeds": len(q), "n_per_seed": n_set}
        else:
            raise ValueError(f"seed set {name!r} needs knn (sample mode) or pool clusters (cluster mode)")
        report["sets"][name]["found"] = int(len(np.unique(c[0])))
        cands.append(c)
    return _merge(cands, names, ids, report)


def retrieve_by_clusters(
    seed_sets: Mapping[str, np.ndarray],
    pool: Vectors | np.ndarray | str | os.PathLike,
    pool_labels: np.ndarray,
    pool_centroids: np.ndarray,
    **options: object,
) -> RetrievalResult:
    """Cluster-based retrieval for every seed set whatever its size (options as in `retrieve`)."""
    return retrieve(seed_sets, pool=pool, pool_labels=pool_labels, pool_centroids=pool_centroids,
                    cluster_max_seeds=np.iinfo(np.int64).max, **options)
