"""dedup: copy detection over an embedding, then connected components and one keeper per component;
writes `copy_of` (keeper id), `copy_group`, `copy_max_sim` and `groups.parquet`.

Pairs are decided by local verification (`dedup.verify local`, the default unless the embedding is a
declared copy descriptor: candidates from content/mirrored pHash and the embedding's k-NN, verified by
local features, the cosine deciding only pairs too flat to judge; `copy_max_sim` is then the verified
overlap share, or the cosine of such a pair) or by the embedding's cosine
(`verify none`; threshold given, 0.6 for a copy descriptor, else calibrated on the pool). A result
whose largest component or removed share passes its limits is refused: nothing is committed.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.parts import write_table_atomic
from pipelines.aligned import RowMap
from pipelines.config import Config, fingerprint
from pipelines.embedding import resolve_embedding
from pipelines.framework import stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def index_spec(cfg: Config):
    """The index the copy graph and decontamination search (cfg.dedup.index, nprobe)."""
    from curate.index import IndexSpec

    return IndexSpec(kind=cfg.dedup.index, nprobe=cfg.dedup.nprobe)


class _IndexHolder:
    """One Ray actor per node: loads the saved index once and answers k-NN edge queries for row ranges."""

    def __init__(self, path: str, emb_dir: str) -> None:
        from curate.index import VectorIndex

        self.index, self.emb_dir = VectorIndex.load(path), emb_dir

    def edges(self, lo: int, hi: int, ok: np.ndarray, k: int, threshold: float):
        from curate.dedup import knn_edges

        return knn_edges(self.emb_dir, k, threshold, index=self.index, query_rows=(lo, hi), checked=ok)


RANGES_PER_HOLDER = 8  # query ranges per node: a lost node's share is redone by the others in small pieces


def _save_pool_index(emb_dir: str, spec, path: str) -> str:
    """Build the pool's copy-graph index and save it (a Ray task: the driver never holds the index)."""
    from curate.dedup import as_parts, pool_index

    index = pool_index(as_parts(emb_dir), spec)
    index.save(path)
    return index.kind


def _ray_edges(emb_dir: Path, spec, ok: np.ndarray, dc, threshold: float, work: Path, address: str | None):
    """k-NN graph queries over Ray: the index built and saved by one task and loaded once per node (one
    actor each), the valid rows computed once on the driver; query ranges queued to the actors, a range
    whose actor dies (its node lost) goes back to the queue; edges merged (the same as one local run).
    Returns the edges and the index kind."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from curate.dedup import merge_edges
    from pipelines.executors import TASK_RETRIES, init_ray, ray_get

    init_ray(address)
    path = work / "_index.faiss"
    kind = ray_get(ray.remote(_save_pool_index).options(num_cpus=1, max_retries=TASK_RETRIES).remote(
        str(emb_dir), spec, str(path)))
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    holders = [ray.remote(_IndexHolder).options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=True)).remote(str(path), str(emb_dir)) for node in nodes]
    bounds = np.linspace(0, len(ok), RANGES_PER_HOLDER * len(holders) + 1).astype(int)
    queue = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    ok_ref, idle, running, out = ray.put(ok), list(holders), {}, []
    try:
        while queue or running:
            while queue and idle:
                holder, job = idle.pop(), queue.pop(0)
                running[holder.edges.remote(*job, ok_ref, dc.k, threshold)] = (holder, job)
            if not running:
                raise RuntimeError(f"every index holder died with {len(queue)} query range(s) left; rerun dedup")
            [ref], _ = ray.wait(list(running), num_returns=1)
            holder, job = running.pop(ref)
            try:
                out.append(ray.get(ref))
            except RayActorError:  # the node is gone: its range goes back to the queue
                queue.insert(0, job)
                continue
            idle.append(holder)
    finally:
        for holder in holders:
            ray.kill(holder)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)
    return merge_edges(*out), kind


def _threshold(cfg: Config, emb_dir: Path, model: str, valid: np.ndarray):
    """The cosine threshold and how it was chosen (given, copy descriptor, or calibrated on the pool)."""
    from curate.calibrate import choose_threshold, evaluate_embedder
    from pipelines.copy_images import calibration_sample, embedder_fn

    dc = cfg.dedup

    def calibrate():
        originals, copies = calibration_sample(cfg, emb_dir, valid)
        return evaluate_embedder(embedder_fn(cfg, model), originals, copies, target_precision=dc.target_precision)

    return choose_threshold(model, "auto" if dc.threshold is None else dc.threshold, dc.copy_descriptor, calibrate)


def _verified_edges(cfg: Config, emb_dir: Path, valid: np.ndarray, threshold: float) -> tuple[tuple, dict]:
    """Candidates (content and mirrored pHash neighbours, embedding k-NN) verified by local features;
    a pair too flat to judge (few keypoints) is linked when its cosine is > threshold."""
    from curate.dedup import as_parts, pair_sims
    from curate.verify import candidate_pairs, embedding_candidates, phash_candidates
    from pipelines.copy_images import content_hashes, verify_image_pairs, verify_settings
    from pipelines.executors import stage_mapper

    dc = cfg.dedup
    n = len(valid)
    mapper = stage_mapper(cfg.executor, cfg.ray_address)  # decoding, hashing and verifying as Ray tasks with executor ray
    ingest = stage_dir(cfg, "ingest")
    emb_rows = RowMap(ingest, emb_dir).emb_rows
    sources = [embedding_candidates(str(emb_dir), dc.candidate_k, dc.candidate_cosine, valid=valid,
                                    index_spec=index_spec(cfg))]
    ph, mirror, decoded, hash_seconds = content_hashes(ingest, emb_rows, mapper)
    i, j, cost = phash_candidates(ph, dc.candidate_phash, mirror)
    usable = decoded & valid
    take = usable[i] & usable[j]
    sources.append((i[take], j[take], cost[take]))
    ci, cj, cstats = candidate_pairs(n, *sources, max_pairs_per_image=dc.max_pairs_per_image)
    res = verify_image_pairs([(ingest, emb_rows)], ci, cj, verify_settings(cfg), mapper)
    parts = as_parts(str(emb_dir))
    sims = pair_sims(parts, res.i, parts, res.j)
    flat = res.abstained & (sims > threshold)
    take = res.verified | flat
    edges = (res.i[take], res.j[take], np.where(res.verified, res.share, sims)[take].astype(np.float32))
    info = {"candidates": cstats, "content_hash_seconds": round(hash_seconds, 2), "verify_stats": res.stats,
            "verify_settings": verify_settings(cfg).to_dict(),
            "linked": {"verified": int(res.verified.sum()), "too_flat_cosine": int(flat.sum())}}
    return edges, info


def _node_info(layout, mapper):
    """node_info for group_edges: ids and pixel counts of the given embedding rows, read part by part."""

    def info(rows: np.ndarray) -> tuple[pa.ChunkedArray, np.ndarray]:
        t = layout.table(rows, ["id", "width", "height"], mapper)
        w, h = (np.nan_to_num(np.asarray(t.column(c).to_numpy(), dtype=np.float64)).astype(np.int64)
                for c in ("width", "height"))
        return t.column("id"), w * h

    return info


def _write_parts(d: Path, layout, graph, mapper) -> None:
    """The stage's parts, one job (a task with executor ray) per ingest part, each given only its part's
    group members: `copy_of` (keeper id of a removed record), `copy_group` (-1: none), `copy_max_sim`.
    Each job is made when it is sent (its keeper ids taken then, as Arrow)."""
    from curate.parts import local_map, part_name
    from pipelines.aligned import write_emb_part

    cuts = np.searchsorted(graph.nodes, layout.offsets)

    def jobs():
        for k in range(len(layout.emb_parts)):
            lo, hi = int(cuts[k]), int(cuts[k + 1])
            columns = {"copy_of": (graph.copy_of(lo, hi), None, pa.string()),
                       "copy_group": (graph.group[lo:hi], -1, pa.int64()),
                       "copy_max_sim": (graph.max_sim[lo:hi], np.nan, pa.float32())}
            yield (str(layout.ingest_parts[k]), str(layout.emb_parts[k]), str(d / part_name(k)),
                   graph.nodes[lo:hi] - layout.offsets[k], columns)

    for _ in (mapper or local_map)(write_emb_part, jobs(), ()):
        pass


def run(cfg: Config, force: bool = False) -> StageResult:
    """Copy groups: `copy_of` (keeper id), `copy_group`, `copy_max_sim`; refuses a wiping result.

    The driver holds the edges, the records that have one (ids, pixels, groups) and one byte per record
    (which rows may form edges), never an id or an int64 per record; ids and pixel counts are read, and
    the parts written, part by part (Ray tasks with executor ray). With verify none under Ray the pool
    index is built by a task and searched by one actor per node, so the driver never holds it.
    (verify local still holds per-record pHashes and candidates: it decodes every image anyway.)
    """
    from curate.dedup import CopyDedupRefused, SafetyLimits, as_parts, group_edges, knn_edges, pool_index, valid_rows
    from pipelines.aligned import EmbeddingLayout
    from pipelines.copy_images import verify_mode
    from pipelines.executors import stage_mapper
    from pipelines.manifest import STARTED

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    model = read_manifest(emb_dir)["config"]["model"]
    mode = verify_mode(cfg)
    inputs = {**upstream(cfg, "ingest"), "embedding": read_manifest(emb_dir)["key"]}
    unkeyed = ("max_component", "max_component_share", "max_removed_share")  # they refuse, never change output
    config = {**{k: v for k, v in asdict(dc).items() if k not in unkeyed}, "verify": mode}
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "dedup")
    prev = begin("dedup", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    layout = EmbeddingLayout(stage_dir(cfg, "ingest"), emb_dir)
    mapper = stage_mapper(cfg.executor, cfg.ray_address)
    parts = as_parts(str(emb_dir))
    valid = valid_rows(parts)
    limits = SafetyLimits(max_component_share=dc.max_component_share, max_removed_share=dc.max_removed_share)
    notes = []
    try:
        try:
            choice = _threshold(cfg, emb_dir, model, valid)
            if not 0 <= choice.threshold < 1:  # e.g. calibrated on a pool of one image
                raise ValueError(f"calibration gave no usable cosine ({choice.threshold}) on {int(valid.sum())} images")
        except ValueError as exc:
            if mode != "local" or dc.threshold is not None:
                raise
            # local verification decides every pair it can judge; with no cosine to trust for the rest,
            # pairs too flat to judge are not linked
            from curate.calibrate import ThresholdChoice

            choice = ThresholdChoice(1.0, "none (calibration found none)", {"spec": model, "reason": str(exc)})
            notes.append(f"no cosine of {model} reached precision {dc.target_precision} on the pool: pairs too flat "
                         "to verify are not linked (give dedup.threshold to link them)")
        if mode == "local":
            edges, extra = _verified_edges(cfg, emb_dir, valid, choice.threshold)
            decision, index_kind = f"local verification (cosine > {choice.threshold:.4g} where too flat)", "given edges"
        else:
            extra, decision = {}, None
            if cfg.executor == "ray":
                edges, index_kind = _ray_edges(emb_dir, index_spec(cfg), valid, dc, choice.threshold, d, cfg.ray_address)
            else:
                index = pool_index(parts, index_spec(cfg))
                edges = knn_edges(parts, dc.k, choice.threshold, index=index, checked=valid)
                index_kind = index.kind
                del index
        extra["threshold_choice"] = choice.manifest()
        graph = group_edges(parts.n, edges, _node_info(layout, mapper), valid=int(valid.sum()), k=dc.k,
                            threshold=choice.threshold, max_component=dc.max_component, limits=limits,
                            decision=decision, index_kind=index_kind)
    except CopyDedupRefused:
        (d / STARTED).unlink(missing_ok=True)  # nothing committed: other settings may run here next
        raise
    _write_parts(d, layout, graph, mapper)
    write_table_atomic(graph.groups, d / "groups.parquet")
    st = graph.stats
    counts = {"in": st["n"], "out": st["kept"], "dropped": {"copy_duplicate": st["dropped"]} if st["dropped"] else {},
              "groups": st["groups"], "pairs": st["pairs"], "largest_component": st["largest_component"],
              "decision": st["decision"]}
    if graph.warning:
        counts["warning"] = graph.warning
    result = StageResult("dedup", str(d), key, counts=counts, seconds=time.time() - t0,
                         outputs={"records": str(d), "groups": str(d / "groups.parquet")}, notes=notes)
    finish(result, {**config, "stats": st, **extra}, inputs)
    return result
