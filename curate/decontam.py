"""Evaluation-set decontamination as in DINOv2 (LVD-142M): every pool image whose cosine to an
evaluation image is above a stricter threshold than copy dedup's (or that local verification links to
one) leaves, with its whole copy component. Each evaluation set is indexed (small) and the pool's
embedding parts stream through it (`eval_matches`, as Ray tasks with a mapper); `decontaminate_rows`
holds only the matched records and their components. Similarities are float64 from the stored
vectors, strict (> threshold), as in curate.dedup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.dedup import QUERY_CHUNK, SLACK, Mapper, Vectors, _id_rank, _valid_mask, as_parts, local_map, pair_sims, \
    valid_rows
from curate.index import EmbeddingParts, IndexSpec, VectorIndex, build_index

DECONTAM_THRESHOLD = 0.45  # stricter (lower) cosine against evaluation sets (DINOv2)


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
