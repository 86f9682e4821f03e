"""Embedding copy detection as in DINOv2 (LVD-142M): a k-NN graph over the embeddings, edges with
cosine above a threshold, connected components, one keeper per component (evaluation-set
decontamination, which uses the same similarities, is curate.decontam).

Edges are strict: a pair is linked when its cosine is > threshold, never when it is equal (the
convention of faiss range search). Every similarity that decides or is reported is recomputed in
float64 from the stored vectors, so results do not depend on chunking, query splitting or order
(up to exact ties for a row's k-th nearest neighbour).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.copy_safety import (CopyDedupRefused, LargeComponentWarning, SafetyLimits, check_safety,  # noqa: F401
                                graph_stats)  # (re-exported)
from curate.groups import arrow_id_ranks, id_ranks, pick_keepers, take_string_lists, take_strings
from curate.parts import Mapper, local_map, map_in_order  # noqa: F401 (re-exported)
from curate.index import EmbeddingParts, IndexSpec, VectorIndex, build_index

DEFAULT_K = 64  # neighbours per image in the k-NN graph (DINOv2)
DEFAULT_THRESHOLD = 0.6  # copy-dedup cosine (DINOv2)
DEFAULT_MAX_COMPONENT = 1000  # a larger component usually means a threshold that chains images
QUERY_CHUNK = 8192  # queries per index search
PAIR_BATCH = 32768  # pairs whose similarity is recomputed at once
SLACK = 1e-3  # candidates are fetched this far below the threshold, then decided exactly

Vectors = EmbeddingParts | str | os.PathLike | np.ndarray | Sequence[np.ndarray]
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


def file_valid(path: str | os.PathLike) -> np.ndarray:
    """Rows of the embedding part file `path` (memory-mapped) that may form edges, as part_valid."""
    return _valid_mask(np.load(path, mmap_mode="r"), Path(path).with_suffix(".parquet"))


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
    node_ids: pa.Array  # Arrow large_string: the id of each node
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

    def dropped(self) -> tuple[np.ndarray, pa.Array]:
        """Rows of the records removed and their keepers' ids."""
        return self.nodes[~self.keep], self.copy_of().drop_null()

    def copy_of(self, lo: int = 0, hi: int | None = None) -> pa.Array:
        """Per node lo..hi: its keeper's id if it is removed, else null (a new Arrow array: no Python
        string per node, and no buffer shared with the other nodes' when it is sent to a task)."""
        hi = len(self.nodes) if hi is None else hi
        return self.node_ids.take(pa.array(self.keeper[lo:hi], mask=self.keep[lo:hi], type=pa.int64()))


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
    holding only the records that have an edge: `node_info(rows)` gives those rows' ids (str: an Arrow
    array, kept as one, or a sequence) and pixel counts. The keeper has the most pixels, then the
    smallest id; groups are numbered by their smallest id (as copy_dedup, which is this over all
    records). Warns past max_component, raises CopyDedupRefused past `limits` (None allows any result)."""
    i, j, sim = (np.asarray(edges[0], dtype=np.int64), np.asarray(edges[1], dtype=np.int64),
                 np.asarray(edges[2], dtype=np.float32))
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edges name rows outside 0..{n - 1}")
    nodes = np.unique(np.concatenate([i, j]))
    ci, cj = np.searchsorted(nodes, i), np.searchsorted(nodes, j)
    node_ids, pixels = node_info(nodes)
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1)
    if len(node_ids) != len(nodes) or len(pixels) != len(nodes):
        raise ValueError(f"node_info gave {len(node_ids)} ids and {len(pixels)} pixel counts for {len(nodes)} rows")
    node_ids, rank = arrow_id_ranks(node_ids)
    labels = components(len(nodes), ci, cj, method)
    picked = pick_keepers(labels, pixels, rank)
    sizes, multi = picked.sizes, picked.multi  # every component here has >= 2 records: multi is all of them
    max_sim = np.full(len(nodes), -np.inf, dtype=np.float32)
    np.maximum.at(max_sim, ci, sim)
    np.maximum.at(max_sim, cj, sim)
    group_max = np.full(len(multi), -np.inf, dtype=np.float32)
    np.maximum.at(group_max, picked.group[ci], sim)  # both ends of an edge are in the same group
    members = np.lexsort((rank, picked.group))
    offsets = np.concatenate([[0], np.cumsum(sizes[multi])]).astype(np.int64)
    groups = pa.table({
        "group": pa.array(np.arange(len(multi), dtype=np.int64)),
        "keeper": take_strings(node_ids, picked.keeper_of[multi]),
        "members": take_string_lists(node_ids, offsets, members),
        "size": pa.array(sizes[multi].astype(np.int64)),
        "max_sim": pa.array(group_max),
    })
    hist_sizes, hist_counts = np.unique(sizes[multi], return_counts=True)
    stats, warning = graph_stats(n, valid, len(i), dict(zip(hist_sizes.tolist(), hist_counts.tolist())), k,
                                 threshold, decision, index_kind, max_component, limits)
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
    dup_of[rows] = keepers.to_numpy(zero_copy_only=False)
    return CopyDedupResult(id_arr, keep, dup_of.tolist(), group, max_sim, ok, graph.edges, graph.groups, graph.stats,
                           graph.warning)
