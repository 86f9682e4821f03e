"""Embedding copy detection as in DINOv2 (LVD-142M): a k-NN graph over the embeddings, edges with
cosine above a threshold, connected components, one keeper per component; and evaluation-set
decontamination, which drops every pool image that copies an evaluation image plus its component.

Edges are strict: a pair is linked when its cosine is > threshold, never when it is equal (the
convention of faiss range search). Every similarity that decides or is reported is recomputed in
float64 from the stored vectors, so results do not depend on chunking, query splitting or order
(up to exact ties for a row's k-th nearest neighbour).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.copy_safety import CopyDedupRefused, SafetyLimits, check_safety  # noqa: F401 (re-exported)
from curate.groups import id_ranks, pick_keepers
from curate.index import EmbeddingParts, IndexSpec, VectorIndex, build_index

DEFAULT_K = 64  # neighbours per image in the k-NN graph (DINOv2)
DEFAULT_THRESHOLD = 0.6  # copy-dedup cosine (DINOv2)
DECONTAM_THRESHOLD = 0.45  # stricter (lower) cosine against evaluation sets (DINOv2)
DEFAULT_MAX_COMPONENT = 1000  # a larger component usually means a threshold that chains images
QUERY_CHUNK = 8192  # queries per index search
PAIR_BATCH = 32768  # pairs whose similarity is recomputed at once
SLACK = 1e-3  # candidates are fetched this far below the threshold, then decided exactly

Vectors = EmbeddingParts | str | os.PathLike | np.ndarray | Sequence[np.ndarray]
# mapper(fn, jobs, shared) yields (job index, fn(*shared, *job)) for every job, in any order
Mapper = Callable[[Callable, Sequence[tuple], tuple], Iterable[tuple[int, object]]]


def local_map(fn: Callable, jobs: Sequence[tuple], shared: tuple = ()) -> Iterator[tuple[int, object]]:
    """The local Mapper: the jobs one after the other in this process."""
    for i, job in enumerate(jobs):
        yield i, fn(*shared, *job)


def map_in_order(mapper: Mapper | None, fn: Callable, jobs: Sequence[tuple], shared: tuple = ()) -> list:
    """Every job's result in job order, whatever order `mapper` (None: local_map) yields them in."""
    out: list = [None] * len(jobs)
    for k, res in (mapper or local_map)(fn, jobs, shared):
        out[k] = res
    return out


class LargeComponentWarning(UserWarning):
    """The largest duplicate component is larger than max_component (a threshold that chains)."""


def as_parts(vectors: Vectors) -> EmbeddingParts:
    """EmbeddingParts for a parts directory, an array or a list of arrays (unchanged if it is one)."""
    return vectors if isinstance(vectors, EmbeddingParts) else EmbeddingParts(vectors)


def _valid_mask(vecs: np.ndarray, table: Path | None) -> np.ndarray:
    """Rows of one part that may form edges: non-zero vectors with status "ok" in `table` (its Parquet)."""
    ok = np.zeros(len(vecs), dtype=bool)
    for s in range(0, len(vecs), 65536):
        block = np.asarray(vecs[s : s + 65536], dtype=np.float32)
        ok[s : s + len(block)] = np.einsum("ij,ij->i", block, block) > 0
    if table is not None and table.is_file() and "status" in pq.read_schema(table).names:
        status = pq.read_table(table, columns=["status"]).column("status").to_pylist()
        if len(status) != len(vecs):
            raise ValueError(f"{table} has {len(status)} rows but its embedding part has {len(vecs)}")
        ok &= np.array([s == "ok" for s in status], dtype=bool)
    return ok


def part_valid(parts: EmbeddingParts, p: int) -> np.ndarray:
    """Rows of part p that may form edges (see valid_rows)."""
    return _valid_mask(parts.part(p), Path(parts.paths[p]).with_suffix(".parquet") if parts.paths else None)


def valid_rows(parts: EmbeddingParts, valid: np.ndarray | None = None) -> np.ndarray:
    """Rows that may form edges: non-zero vectors, status "ok" in the parts' Parquet, and `valid`."""
    ok = np.concatenate([part_valid(parts, p) for p in range(len(parts.sizes))]) if len(parts.sizes) else \
        np.zeros(0, dtype=bool)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (parts.n,):
            raise ValueError(f"valid must have shape ({parts.n},), got {valid.shape}")
        ok &= valid
    return ok


def gather(parts: EmbeddingParts, rows: np.ndarray) -> np.ndarray:
    """float64 copies of the given global rows (any order, repeats allowed)."""
    return parts.take(rows, np.float64)


def pair_sims(a: EmbeddingParts, rows_a: np.ndarray, b: EmbeddingParts, rows_b: np.ndarray) -> np.ndarray:
    """Cosine of row pairs (a[rows_a[t]], b[rows_b[t]]) in float64, the same whatever the batching."""
    out = np.empty(len(rows_a), dtype=np.float64)
    for s in range(0, len(rows_a), PAIR_BATCH):
        x, y = gather(a, rows_a[s : s + PAIR_BATCH]), gather(b, rows_b[s : s + PAIR_BATCH])
        out[s : s + PAIR_BATCH] = (x * y).sum(axis=1)
    return out


def pool_index(parts: EmbeddingParts, index_spec: IndexSpec | None = None) -> VectorIndex:
    """Index over all rows: exact flat for small n, the index module's auto choice (IVF) above."""
    return build_index(parts, index_spec or IndexSpec(), log=lambda _: None)


def knn_edges(
    vectors: Vectors,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    index_spec: IndexSpec | None = None,
    chunk: int = QUERY_CHUNK,
    valid: np.ndarray | None = None,
    query_rows: tuple[int, int] | None = None,
    index: VectorIndex | None = None,
    checked: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs among each valid row's k nearest neighbours with cosine > threshold (strict).

    Returns (i int64, j int64, sim float32) with i < j, unique, sorted by (i, j). query_rows=(a, b)
    searches only those rows, so workers (each with the same index) can split the queries:
    merge_edges of their results equals one full run. Invalid rows (embed_error, zero) form no edges.
    `checked` is valid_rows(parts, valid) already computed (a worker then does not reread every part).
    """
    parts = as_parts(vectors)
    start, stop = query_rows if query_rows is not None else (0, parts.n)
    if not 0 <= start <= stop <= parts.n:
        raise ValueError(f"query_rows {query_rows} is not a row range of 0..{parts.n}")
    ok = valid_rows(parts, valid) if checked is None else np.asarray(checked, dtype=bool)
    if ok.shape != (parts.n,):
        raise ValueError(f"checked must have shape ({parts.n},), got {ok.shape}")
    return _edges(parts, ok, k, threshold, index or pool_index(parts, index_spec), chunk, start, stop)


def _edges(parts: EmbeddingParts, ok: np.ndarray, k: int, threshold: float, index: VectorIndex,
           chunk: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """knn_edges on resolved inputs: index candidates at threshold - SLACK, decided in float64."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if k < 1 or chunk < 1:
        raise ValueError("k and chunk must be at least 1")
    width = min(k + 1, parts.n)
    keys = []
    for q0 in range(start, stop, chunk):
        rows = np.flatnonzero(ok[q0 : min(q0 + chunk, stop)]) + q0
        if not len(rows):
            continue
        sims, nbrs = index.knn(parts.rows(q0, min(q0 + chunk, stop))[rows - q0], width)
        other = (nbrs != rows[:, None]) & (nbrs >= 0)
        take = other & (np.cumsum(other, axis=1) <= k) & (sims > threshold - SLACK)
        take &= ok[np.where(nbrs >= 0, nbrs, 0)]
        qi, nj = np.broadcast_to(rows[:, None], nbrs.shape)[take], nbrs[take]
        keys.append(np.minimum(qi, nj) * parts.n + np.maximum(qi, nj))
    keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    i, j = keys // max(parts.n, 1), keys % max(parts.n, 1)
    sim = pair_sims(parts, i, parts, j)
    linked = sim > threshold
    return i[linked], j[linked], sim[linked].astype(np.float32)


def merge_edges(*edges: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of knn_edges results (e.g. one per query range): unique (i, j), sorted, as one run gives."""
    i = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    j = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    sim = np.concatenate([e[2] for e in edges]) if edges else np.zeros(0, dtype=np.float32)
    _, first = np.unique(np.stack([i, j]), axis=1, return_index=True)
    return i[first], j[first], sim[first]


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber component labels 0, 1, ... in the order of each component's smallest row."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _find(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Roots of `nodes`, halving every path walked (each visited node skips to its grandparent)."""
    cur = np.array(nodes, dtype=np.int64)
    pos = np.arange(len(cur))
    roots = np.empty(len(cur), dtype=np.int64)
    while len(cur):
        up = parent[cur]
        done = up == cur
        roots[pos[done]] = cur[done]
        cur, up, pos = cur[~done], up[~done], pos[~done]
        grand = parent[up]
        parent[cur] = grand
        cur = grand
    return roots


def union_find(n: int, edge_chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component labels (canonical) of n nodes from edges streamed in chunks: only n ints in memory.

    Roots are hooked under the smaller root (np.minimum.at), so parent[x] <= x always holds, no
    cycle can form, and every root is its component's smallest row.
    """
    parent = np.arange(n, dtype=np.int64)
    for i, j in edge_chunks:
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        while len(i):
            ri, rj = _find(parent, i), _find(parent, j)
            differ = ri != rj
            i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
            np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
    return canonical_labels(_find(parent, np.arange(n, dtype=np.int64)))


def components(n: int, i: np.ndarray, j: np.ndarray, method: str = "scipy", chunk: int = 1 << 22) -> np.ndarray:
    """Connected-component label per node, numbered by smallest row (the same for both methods).

    method "scipy": csgraph.connected_components on a sparse matrix; "union_find": streamed over
    edge chunks of `chunk` pairs, for graphs whose edge matrix does not fit in memory.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if method == "union_find":
        return union_find(n, ((i[s : s + chunk], j[s : s + chunk]) for s in range(0, len(i), chunk)))
    if method != "scipy":
        raise ValueError(f"method must be 'scipy' or 'union_find', got {method!r}")
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    return canonical_labels(connected_components(graph, directed=False)[1])


@dataclass
class CopyGraph:
    """Copy groups over the records that have an edge, and nothing per other record: what a stage
    needs at any pool size (O(edges) memory). Every node is in a group of >= 2 records; every record
    that is not a node is kept, in no group (-1), with no similarity (NaN)."""

    n: int  # records in the pool
    nodes: np.ndarray  # int64 rows with at least one edge, sorted
    node_ids: np.ndarray  # str id of each node
    keeper: np.ndarray  # int64 per node: the position (in nodes) of its group's keeper
    group: np.ndarray  # int64 per node: its group, numbered by each group's smallest id
    max_sim: np.ndarray  # float32 per node: highest similarity to another group member
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]
    groups: pa.Table  # group, keeper, members, size, max_sim
    stats: dict = field(default_factory=dict)
    warning: str | None = None

    @property
    def keep(self) -> np.ndarray:
        """Per node: whether it is its group's keeper."""
        return self.keeper == np.arange(len(self.nodes))

    def dropped(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the records removed and their keepers' ids."""
        drop = ~self.keep
        return self.nodes[drop], self.node_ids[self.keeper[drop]]


def group_edges(
    n: int,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    node_info: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    valid: int | None = None,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    max_component: int = DEFAULT_MAX_COMPONENT,
    method: str = "scipy",
    limits: SafetyLimits | None = SafetyLimits(),
    decision: str | None = None,
    index_kind: str = "given edges",
) -> CopyGraph:
    """Connected components of the edges (i, j, sim) among n records and one keeper per component,
    holding only the records that have an edge: `node_info(rows)` gives those rows' ids (str) and
    pixel counts. The keeper has the most pixels, then the smallest id; groups are numbered by their
    smallest id (as copy_dedup, which is this over all records). Warns past max_component, raises
    CopyDedupRefused past `limits` (None allows any result)."""
    i, j, sim = (np.asarray(edges[0], dtype=np.int64), np.asarray(edges[1], dtype=np.int64),
                 np.asarray(edges[2], dtype=np.float32))
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edges name rows outside 0..{n - 1}")
    nodes = np.unique(np.concatenate([i, j]))
    ci, cj = np.searchsorted(nodes, i), np.searchsorted(nodes, j)
    node_ids, pixels = node_info(nodes)
    node_ids, pixels = np.asarray(node_ids, dtype=str), np.asarray(pixels, dtype=np.int64).reshape(-1)
    if len(node_ids) != len(nodes) or len(pixels) != len(nodes):
        raise ValueError(f"node_info gave {len(node_ids)} ids and {len(pixels)} pixel counts for {len(nodes)} rows")
    node_ids, rank = id_ranks(node_ids)
    labels = components(len(nodes), ci, cj, method)
    picked = pick_keepers(labels, pixels, rank)
    sizes, multi = picked.sizes, picked.multi  # every component here has >= 2 records: multi is all of them
    max_sim = np.full(len(nodes), -np.inf, dtype=np.float32)
    np.maximum.at(max_sim, ci, sim)
    np.maximum.at(max_sim, cj, sim)
    group_max = np.full(len(multi), -np.inf, dtype=np.float32)
    np.maximum.at(group_max, picked.group[ci], sim)  # both ends of an edge are in the same group
    members = np.lexsort((rank, picked.group))
    offsets = np.concatenate([[0], np.cumsum(sizes[multi])]).astype(np.int32)
    groups = pa.table({
        "group": pa.array(np.arange(len(multi), dtype=np.int64)),
        "keeper": pa.array(node_ids[picked.keeper_of[multi]].tolist(), type=pa.string()),
        "members": pa.ListArray.from_arrays(pa.array(offsets), pa.array(node_ids[members].tolist(), type=pa.string())),
        "size": pa.array(sizes[multi].astype(np.int64)),
        "max_sim": pa.array(group_max),
    })
    largest = int(sizes.max()) if len(nodes) else int(n > 0)
    dropped = int(len(nodes) - picked.keep.sum())
    valid = n if valid is None else int(valid)
    hist_sizes, hist_counts = np.unique(sizes[multi], return_counts=True)
    stats = {
        "n": n, "valid": valid, "invalid": n - valid, "pairs": int(len(i)),
        "groups": int(len(multi)), "in_groups": int(len(nodes)), "dropped": dropped,
        "kept": n - dropped, "largest_component": largest, "k": k, "threshold": threshold,
        "decision": decision or f"cosine > {threshold}", "index_kind": index_kind,
        "component_sizes": {int(s): int(c) for s, c in zip(hist_sizes, hist_counts)},
    }
    warning = None
    if largest > max_component:
        warning = (f"largest duplicate component has {largest} records (> max_component={max_component}): "
                   f"threshold {threshold} probably chains distinct images; calibrate it (curate.calibrate)")
        warnings.warn(warning, LargeComponentWarning, stacklevel=2)
    if limits is not None:
        check_safety(stats, limits)
    return CopyGraph(n, nodes, node_ids, picked.keeper, picked.group, max_sim, (i, j, sim), groups, stats, warning)


@dataclass
class CopyDedupResult:
    """Per-record outcome of copy_dedup, aligned with the input rows, plus groups and stats."""

    ids: np.ndarray
    keep: np.ndarray  # False for every component member but its keeper
    dup_of: list[str | None]  # keeper id for dropped records, None otherwise
    group: np.ndarray  # int64 group number of a component of >= 2 records, -1 otherwise
    max_sim: np.ndarray  # float32 highest similarity to another group member (NaN: none)
    valid: np.ndarray  # rows that took part (others are kept, never grouped)
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]
    groups: pa.Table  # group, keeper, members, size, max_sim
    stats: dict = field(default_factory=dict)
    warning: str | None = None

    def records(self) -> pa.Table:
        """Row-aligned record columns (id, keep, dup_of, dup_group, dup_max_sim) for a Parquet part."""
        return pa.table({"id": pa.array(self.ids.tolist(), type=pa.string()), "keep": pa.array(self.keep),
                         "dup_of": pa.array(self.dup_of, type=pa.string()), "dup_group": pa.array(self.group),
                         "dup_max_sim": pa.array(self.max_sim, from_pandas=True)})


def _id_rank(ids: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """id_ranks, checking there is one id per vector."""
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} vectors")
    return id_ranks(ids)


def copy_dedup(
    vectors: Vectors,
    ids: Sequence[str],
    pixels: np.ndarray | None = None,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    max_component: int = DEFAULT_MAX_COMPONENT,
    index_spec: IndexSpec | None = None,
    chunk: int = QUERY_CHUNK,
    valid: np.ndarray | None = None,
    method: str = "scipy",
    index: VectorIndex | None = None,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    limits: SafetyLimits | None = SafetyLimits(),
    decision: str | None = None,
) -> CopyDedupResult:
    """Group embedding copies (k-NN graph, cosine > threshold, components) and keep one per group.

    The keeper has the most pixels, then the smallest id (string order); groups are numbered by
    their smallest id, so the result does not depend on the input order. Warns (and records it)
    when the largest component exceeds max_component: transitive chains of a too-low threshold.
    `edges` (from knn_edges runs merged with merge_edges, e.g. on several workers, or verified
    pairs from curate.verify) skips the search. Raises CopyDedupRefused when the result passes
    `limits` (check_safety); limits=None allows any result. `decision` names what made the given
    edges (e.g. "local verification") in stats and messages; by default the cosine threshold.
    This is group_edges with every record's outcome spelled out (O(records) memory).
    """
    parts = as_parts(vectors)
    n = parts.n
    id_arr, _ = _id_rank(ids, n)
    pix = np.zeros(n, dtype=np.int64) if pixels is None else np.asarray(pixels, dtype=np.int64).reshape(-1)
    if len(pix) != n:
        raise ValueError(f"got {len(pix)} pixel counts for {n} vectors")
    ok = valid_rows(parts, valid)
    if edges is None:
        index = index or pool_index(parts, index_spec)
        edges = _edges(parts, ok, k, threshold, index, chunk, 0, n)
    graph = group_edges(n, edges, lambda rows: (id_arr[rows], pix[rows]), valid=int(ok.sum()), k=k,
                        threshold=threshold, max_component=max_component, method=method, limits=limits,
                        decision=decision, index_kind=index.kind if index is not None else "given edges")
    keep = np.ones(n, dtype=bool)
    keep[graph.nodes] = graph.keep
    group = np.full(n, -1, dtype=np.int64)
    group[graph.nodes] = graph.group
    max_sim = np.full(n, np.nan, dtype=np.float32)
    max_sim[graph.nodes] = graph.max_sim
    dup_of = np.full(n, None, dtype=object)  # a Python string only for the dropped records
    rows, keepers = graph.dropped()
    dup_of[rows] = keepers
    return CopyDedupResult(id_arr, keep, dup_of.tolist(), group, max_sim, ok, graph.edges, graph.groups, graph.stats,
                           graph.warning)


@dataclass
class DecontamResult:
    """Pool records that copy an evaluation image, directly or through their duplicate component."""

    keep: np.ndarray  # False for removed pool rows
    reason: list[str | None]  # "direct" (matches an evaluation image), "component" or None
    pairs: dict[str, pa.Table]  # per evaluation set: pool_id, eval_id, sim (sim > threshold)
    removed: dict[str, pa.Table]  # per evaluation set: pool_id, reason
    stats: dict = field(default_factory=dict)


def eval_index(ev: EmbeddingParts, index_spec: IndexSpec | None = None) -> tuple[bytes, dict, np.ndarray]:
    """An evaluation set's index over its valid rows, serialised to ship to part tasks
    (faiss.serialize_index), its resolved spec, and the evaluation row of each index id. Flat (exact)
    unless the set is large enough for the index module's auto choice (or index_spec says otherwise)."""
    import faiss

    rows = np.flatnonzero(valid_rows(ev))
    if not len(rows):
        return b"", {}, rows
    index = build_index(ev.take(rows, np.float32), index_spec or IndexSpec(), log=lambda _: None)
    return faiss.serialize_index(index.cpu_index()).tobytes(), index.spec.to_dict(), rows


def eval_part_pairs(blob: bytes, spec: dict, ev_rows: np.ndarray, threshold: float, k: int | None,
                    source: str | np.ndarray, start: int, valid: np.ndarray | None,
                    chunk: int = QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool rows, eval rows, float32 sims) of one pool part (a part file or an array whose first row is
    pool row `start`) against an evaluation index (eval_index): every valid row's pairs above
    threshold - SLACK, or with k each evaluation row's k best pairs in this part (sim descending, then
    pool row). Reads this part only; runs as a Ray task or a local call."""
    import faiss

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if not blob:
        return empty
    on_disk = not isinstance(source, np.ndarray)
    vecs = np.load(source, mmap_mode="r") if on_disk else source
    ok = _valid_mask(vecs, Path(source).with_suffix(".parquet") if on_disk else None)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    index = VectorIndex(faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)), IndexSpec.from_dict(spec))
    out = [empty]
    for s in range(0, len(vecs), chunk):
        rows = np.flatnonzero(ok[s : s + chunk]) + s
        if len(rows):
            lims, sims, found = index.range(np.asarray(vecs[rows], dtype=np.float32), threshold - SLACK)
            out.append((np.repeat(rows + start, np.diff(lims)), ev_rows[found], sims))
    return _best_per_eval(*(np.concatenate([o[i] for o in out]) for i in range(3)), k)


def _best_per_eval(p: np.ndarray, e: np.ndarray, sims: np.ndarray, k: int | None):
    """Each evaluation row's k best pairs (sim descending, then pool row ascending); all with k None."""
    if k is None or not len(p):
        return p, e, sims
    order = np.lexsort((p, -sims.astype(np.float64), e))
    p, e, sims = p[order], e[order], sims[order]
    first = np.searchsorted(e, e, side="left")
    keep = np.arange(len(e)) - first < k
    return p[keep], e[keep], sims[keep]


def eval_matches(pool: EmbeddingParts, ev: EmbeddingParts, threshold: float, k: int | None,
                 index_spec: IndexSpec | None = None, valid: np.ndarray | None = None,
                 mapper: Mapper | None = None, chunk: int = QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Unique candidate (pool row, eval row) pairs, sorted: every valid pool row whose cosine to an
    evaluation image is above threshold - SLACK (decide them with pair_sims; also the candidates of local
    verification), or with k each evaluation image's k nearest such pool rows. The evaluation set is
    indexed (small); the pool is streamed part by part (`mapper`: local calls, or ray_map), so no pool
    index is built and memory holds one part plus the candidates. Exact with a flat evaluation index."""
    shared = (*eval_index(ev, index_spec), threshold, k)
    jobs = [(str(pool.paths[i]) if pool.paths else pool.part(i), int(pool.offsets[i]),
             None if valid is None else np.asarray(valid, dtype=bool)[pool.offsets[i] : pool.offsets[i + 1]], chunk)
            for i in range(len(pool.sizes))]
    acc = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    for _, got in (mapper or local_map)(eval_part_pairs, jobs, shared):
        acc = _best_per_eval(*(np.concatenate([a, g]) for a, g in zip(acc, got)), k)
    keys = np.unique(acc[0] * max(ev.n, 1) + acc[1])
    return keys // max(ev.n, 1), keys % max(ev.n, 1)


@dataclass
class DecontamRows:
    """Decontamination over the pool rows it removes only (O(matches + their components))."""

    removed: np.ndarray  # int64 sorted pool rows removed
    reason: np.ndarray  # per removed row: "direct" (matches an evaluation image) or "component"
    first_set: np.ndarray  # per removed row: the first evaluation set (in name order) that removed it
    pairs: dict[str, pa.Table]  # per evaluation set: pool_id, eval_id, sim (sim > threshold)
    removed_ids: dict[str, pa.Table]  # per evaluation set: pool_id, reason
    stats: dict = field(default_factory=dict)


def decontaminate_rows(
    pool: EmbeddingParts,
    ids_of: Callable[[np.ndarray], np.ndarray],
    groups_of: Callable[[np.ndarray], np.ndarray] | None,
    members_of: Callable[[np.ndarray], np.ndarray] | None,
    eval_sets: Mapping[str, tuple[Vectors, Sequence[str]]],
    threshold: float = DECONTAM_THRESHOLD,
    k: int | None = None,
    index_spec: IndexSpec | None = None,
    valid: np.ndarray | None = None,
    chunk: int = QUERY_CHUNK,
    given_pairs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    mapper: Mapper | None = None,
) -> DecontamRows:
    """decontaminate holding only the matched rows and their components: `ids_of(rows)` gives sorted
    rows' ids, `groups_of(rows)` their copy groups (-1: none) and `members_of(groups)` the sorted rows of
    those groups (both None: no copy groups)."""
    removed_by: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pairs, removed, stats = {}, {}, {}
    for name in sorted(eval_sets):
        vecs, eval_ids = eval_sets[name]
        ev = as_parts(vecs)
        ev_id, _ = _id_rank(eval_ids, ev.n)
        if given_pairs is not None:
            p, e, sim = (np.asarray(a) for a in given_pairs[name])
            p, e, sim = p.astype(np.int64), e.astype(np.int64), sim.astype(np.float32)
        else:
            p, e = eval_matches(pool, ev, threshold, k, index_spec, valid, mapper, chunk)
            sim = pair_sims(pool, p, ev, e)
            hit = sim > threshold
            p, e, sim = p[hit], e[hit], sim[hit].astype(np.float32)
        if len(p) and (p.min() < 0 or p.max() >= pool.n):
            raise ValueError(f"pairs of {name!r} name pool rows outside 0..{pool.n - 1}")
        direct = np.unique(p)
        component = np.zeros(0, dtype=np.int64)
        if groups_of is not None and len(direct):
            hit_groups = np.unique(np.asarray(groups_of(direct), dtype=np.int64))
            hit_groups = hit_groups[hit_groups >= 0]
            if len(hit_groups):
                component = np.setdiff1d(np.asarray(members_of(hit_groups), dtype=np.int64), direct)
        gone = np.union1d(direct, component)
        gone_ids = np.asarray(ids_of(gone), dtype=str) if len(gone) else np.zeros(0, dtype=str)
        p_ids = gone_ids[np.searchsorted(gone, p)]
        order = np.lexsort((ev_id[e], p_ids))
        pairs[name] = pa.table({"pool_id": pa.array(p_ids[order].tolist(), type=pa.string()),
                                "eval_id": pa.array(ev_id[e][order].tolist(), type=pa.string()),
                                "sim": pa.array(sim[order])})
        by_id = np.argsort(gone_ids, kind="stable")
        is_direct = np.isin(gone, direct)
        removed[name] = pa.table({"pool_id": pa.array(gone_ids[by_id].tolist(), type=pa.string()),
                                  "reason": pa.array(np.where(is_direct[by_id], "direct", "component").tolist(),
                                                     type=pa.string())})
        stats[name] = {"eval_images": ev.n, "pairs": int(len(p)), "direct": int(len(direct)),
                       "component": int(len(component)), "removed": int(len(gone))}
        removed_by[name] = (gone, direct)
    gone_all = np.unique(np.concatenate([g for g, _ in removed_by.values()] + [np.zeros(0, dtype=np.int64)]))
    direct_all = np.unique(np.concatenate([d for _, d in removed_by.values()] + [np.zeros(0, dtype=np.int64)]))
    first_set = np.full(len(gone_all), None, dtype=object)
    for name, (gone, _) in removed_by.items():  # in name order: a row removed by several sets is the first one's
        at = np.searchsorted(gone_all, gone)
        first_set[at[first_set[at] == None]] = name  # noqa: E711 (elementwise on an object array)
    reason = np.where(np.isin(gone_all, direct_all), "direct", "component").astype(object)
    stats["total"] = {"pool": pool.n, "removed": int(len(gone_all)), "direct": int(len(direct_all)),
                      "threshold": threshold, "search": "given pairs" if given_pairs is not None else
                      "evaluation index, pool streamed by part"}
    return DecontamRows(gone_all, reason, first_set, pairs, removed, stats)


def decontaminate(
    pool_vectors: Vectors,
    pool_ids: Sequence[str],
    pool_groups: np.ndarray | None,
    eval_sets: Mapping[str, tuple[Vectors, Sequence[str]]],
    threshold: float = DECONTAM_THRESHOLD,
    k: int | None = None,
    index_spec: IndexSpec | None = None,
    valid: np.ndarray | None = None,
    chunk: int = QUERY_CHUNK,
    given_pairs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    mapper: Mapper | None = None,
) -> DecontamResult:
    """Drop pool images with cosine > threshold to any evaluation image, and their whole component.

    Each evaluation set is indexed (index_spec; flat, so exact, unless the set is large) and the pool is
    streamed through it part by part (eval_matches; `mapper` runs the parts, e.g. as Ray tasks): every
    pair above threshold when k is None, else each evaluation image's k nearest pool images above it.
    pool_groups is CopyDedupResult.group (-1: no component). `given_pairs` gives each set's matching
    (pool row, eval row, score) pairs instead (e.g. verified). This is decontaminate_rows with every
    record's outcome spelled out (O(records) memory).
    """
    pool = as_parts(pool_vectors)
    id_arr, _ = _id_rank(pool_ids, pool.n)
    groups = np.full(pool.n, -1, dtype=np.int64) if pool_groups is None else np.asarray(pool_groups, dtype=np.int64)
    if groups.shape != (pool.n,):
        raise ValueError(f"pool_groups must have shape ({pool.n},), got {groups.shape}")
    res = decontaminate_rows(pool, lambda rows: id_arr[rows], lambda rows: groups[rows],
                             lambda g: np.flatnonzero(np.isin(groups, g)), eval_sets, threshold, k, index_spec, valid,
                             chunk, given_pairs, mapper)
    keep = np.ones(pool.n, dtype=bool)
    keep[res.removed] = False
    reason = np.full(pool.n, None, dtype=object)
    reason[res.removed] = res.reason
    return DecontamResult(keep, reason.tolist(), res.pairs, res.removed_ids, res.stats)
