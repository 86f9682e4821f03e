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

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

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

        self.index, self.emb_dir, self.ok = VectorIndex.load(path), emb_dir, None

    def edges(self, lo: int, hi: int, path: str, ok, k: int, threshold: float, bounds: np.ndarray) -> int:
        from curate.copy_graph_parts import write_edges
        from curate.dedup import knn_edges

        if self.ok is None:  # the valid rows: an array, or the per-part files the valid-row tasks wrote
            self.ok = ok if isinstance(ok, np.ndarray) else _load_valid(ok)
        edges = knn_edges(self.emb_dir, k, threshold, index=self.index, query_rows=(lo, hi), checked=self.ok)
        return write_edges(path, edges, bounds)


GROUP_ROWS = 1 << 20  # rows per row group of groups.parquet (pq.write_table's default)
RANGES_PER_HOLDER = 8  # query ranges per node: a lost node's share is redone by the others in small pieces


def _save_pool_index(emb_dir: str, spec, path: str) -> str:
    """Build the pool's copy-graph index and save it (a Ray task: the driver never holds the index)."""
    from curate.dedup import as_parts, pool_index

    index = pool_index(as_parts(emb_dir), spec)
    index.save(path)
    return index.kind


def _ray_edges(emb_dir: Path, spec, ok, k: int, threshold: float, work: Path, bounds: np.ndarray,
               address: str | None, out: str = "edges") -> tuple[list[str], str]:
    """k-NN graph queries over Ray: the index built and saved by one task and loaded once per node (one
    actor each), the valid rows (`ok`: an array, or the per-part files of `valid_files`) loaded once
    per actor; query ranges queued to the actors, a range
    whose actor dies (its node lost) goes back to the queue. Each range's edges (k neighbours above
    `threshold`) are written to a file of `work / out` for the buckets of `bounds` (never sent to the
    driver). Returns the files and the index kind."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.executors import TASK_RETRIES, init_ray, ray_get

    init_ray(address)
    path = work / "_index.faiss"
    kind = ray_get(ray.remote(_save_pool_index).options(num_cpus=1, max_retries=TASK_RETRIES).remote(
        str(emb_dir), spec, str(path)))
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    holders = [ray.remote(_IndexHolder).options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=True)).remote(str(path), str(emb_dir)) for node in nodes]
    cuts = np.linspace(0, int(bounds[-1]), max(RANGES_PER_HOLDER * len(holders), len(bounds) - 1) + 1).astype(int)
    queue = [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
    queue = [(lo, hi, str(work / out / f"{q:06d}.arrow")) for q, (lo, hi) in enumerate(queue)]
    files = [job[2] for job in queue]
    ok_ref, idle, running = ray.put(ok), list(holders), {}  # ray.put: one copy per node, not per call
    try:
        while queue or running:
            while queue and idle:
                holder, job = idle.pop(), queue.pop(0)
                running[holder.edges.remote(*job, ok_ref, k, threshold, bounds)] = (holder, job)
            if not running:
                raise RuntimeError(f"every index holder died with {len(queue)} query range(s) left; rerun dedup")
            [ref], _ = ray.wait(list(running), num_returns=1)
            holder, job = running.pop(ref)
            try:
                ray_get(ref)
            except RayActorError:  # the node is gone: its range goes back to the queue
                queue.insert(0, job)
                continue
            idle.append(holder)
    finally:
        for holder in holders:
            ray.kill(holder)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)
    return files, kind


def _part_valid(path: str, out: str) -> int:
    """The valid rows of the embedding part at `path` (curate.dedup.file_valid: non-zero vectors with
    status ok in its Parquet) saved to `out`, atomically."""
    from curate.dedup import file_valid
    from curate.parts import atomic_path

    v = file_valid(path)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, v)
    return int(v.sum())


def valid_files(paths: list[str], work: Path, mapper) -> tuple[list[str], int]:
    """The rows that may form edges, one file per embedding part written by a job each (a task with
    executor ray: the parts' vectors are read there, never by the driver); returns the files and the
    count. Whoever needs the rows concatenates the files (1 byte per record)."""
    from curate.parts import map_in_order

    (work / "valid").mkdir(parents=True, exist_ok=True)
    files = [str(work / "valid" / f"{p:06d}.npy") for p in range(len(paths))]
    counts = map_in_order(mapper, _part_valid, list(zip(map(str, paths), files)))
    return files, int(sum(counts))


def _load_valid(files: list[str]) -> np.ndarray:
    """The valid rows of `valid_files`' files, one array (a byte per record)."""
    return np.concatenate([np.load(f) for f in files]) if files else np.zeros(0, dtype=bool)


def _threshold(cfg: Config, emb_dir: Path, model: str, valid):
    """The cosine threshold and how it was chosen (given, copy descriptor, or calibrated on the pool;
    `valid()` gives the valid rows, read only to calibrate)."""
    from curate.calibrate import choose_threshold, evaluate_embedder
    from pipelines.copy_images import calibration_sample, embedder_fn

    dc = cfg.dedup

    def calibrate():
        originals, copies = calibration_sample(cfg, emb_dir, valid())
        return evaluate_embedder(embedder_fn(cfg, model), originals, copies, target_precision=dc.target_precision)

    return choose_threshold(model, "auto" if dc.threshold is None else dc.threshold, dc.copy_descriptor, calibrate)


def _knn_files(cfg: Config, emb_dir: Path, parts, valid_at: list[str], k: int, threshold: float, work: Path,
               bounds: np.ndarray, out: str) -> tuple[list[str], str]:
    """Each valid row's k nearest neighbours above `threshold` sent to the buckets of `bounds` (write_edges)
    in files of `work / out`: by index holders on the nodes with executor ray (`_ray_edges`), else by the
    driver, which holds the index and queries a bucket at a time. Returns the files and the index kind."""
    from curate.copy_graph_parts import write_edges
    from curate.dedup import knn_edges, pool_index

    if cfg.executor == "ray":
        return _ray_edges(emb_dir, index_spec(cfg), valid_at, k, threshold, work, bounds, cfg.ray_address, out)
    index, valid = pool_index(parts, index_spec(cfg)), _load_valid(valid_at)
    files = [str(work / out / f"{b:06d}.arrow") for b in range(len(bounds) - 1)]
    for b, f in enumerate(files):  # the driver holds one bucket's edges at a time
        write_edges(f, knn_edges(parts, k, threshold, index=index, checked=valid,
                                 query_rows=(int(bounds[b]), int(bounds[b + 1]))), bounds)
    return files, index.kind


def _verified_edges(cfg: Config, emb_dir: Path, layout, parts, valid_at: list[str], threshold: float, work: Path,
                    bounds: np.ndarray, mapper) -> tuple[list[str], dict]:
    """Candidates (content and mirrored pHash neighbours, embedding k-NN) verified by local features, by
    jobs over buckets (pipelines.copy_verify); a pair too flat to judge is linked when its cosine is >
    threshold. Returns the edge files and the manifest's record."""
    from pipelines.copy_images import verify_settings
    from pipelines.copy_verify import verified_edge_files

    dc = cfg.dedup
    ingest = stage_dir(cfg, "ingest")
    knn, _ = _knn_files(cfg, emb_dir, parts, valid_at, dc.candidate_k, dc.candidate_cosine, work, bounds, "knn")
    settings = verify_settings(cfg)
    files, info = verified_edge_files(work, layout, RowMap(ingest).offsets, valid_at, knn, bounds, dc, settings,
                                      threshold, str(emb_dir), str(ingest), mapper)
    return files, {**info, "verify_settings": settings.to_dict()}


class _NodeInfo:
    """node_info for the copy graph's jobs: ids and pixel counts of sorted embedding rows, read from the
    parts that hold them (picklable: a Ray task reads its own bucket's)."""

    def __init__(self, layout) -> None:
        self.layout = layout

    def __call__(self, rows: np.ndarray) -> tuple[pa.ChunkedArray, np.ndarray]:
        t = self.layout.table(rows, ["id", "width", "height"])
        w, h = (np.nan_to_num(np.asarray(t.column(c).to_numpy(), dtype=np.float64)).astype(np.int64)
                for c in ("width", "height"))
        return t.column("id"), w * h


def _write_part(graph, ingest_part: str, emb_part: str, out: str, lo: int, hi: int) -> int:
    """One stage part: `copy_of` (keeper id of a removed record), `copy_group` (-1: none), `copy_max_sim`
    of the embedding rows lo .. hi - 1 (the part's), read from the graph's files by the job itself."""
    from pipelines.aligned import write_emb_part

    t = graph.members(lo, hi)
    columns = {"copy_of": (t.column("copy_of"), None, pa.string()),
               "copy_group": (t.column("group").to_numpy(), -1, pa.int64()),
               "copy_max_sim": (t.column("max_sim").to_numpy(), np.nan, pa.float32())}
    return write_emb_part(ingest_part, emb_part, out, t.column("row").to_numpy() - lo, columns)


def _write_outputs(d: Path, layout, graph, mapper) -> None:
    """The stage's parts, one job (a task with executor ray) per ingest part, and groups.parquet streamed
    one range of groups at a time."""
    import pyarrow.parquet as pq

    from curate.parts import atomic_path, local_map, part_name

    jobs = [(str(layout.ingest_parts[k]), str(layout.emb_parts[k]), str(d / part_name(k)),
             int(layout.offsets[k]), int(layout.offsets[k + 1])) for k in range(len(layout.emb_parts))]
    for _ in (mapper or local_map)(_write_part, jobs, (graph,)):
        pass
    with atomic_path(d / "groups.parquet") as tmp:
        writer, held, wrote = None, [], 0
        for t in graph.group_tables():  # row groups of GROUP_ROWS whatever the ranges: the bytes of one table
            writer = writer or pq.ParquetWriter(tmp, t.schema, compression="zstd", write_statistics=True)
            held.append(t)
            while sum(len(h) for h in held) >= GROUP_ROWS:
                whole = pa.concat_tables(held)
                writer.write_table(whole.slice(0, GROUP_ROWS), row_group_size=GROUP_ROWS)
                held, wrote = [whole.slice(GROUP_ROWS)], wrote + 1
        rest = pa.concat_tables(held)
        if len(rest) or not wrote:  # pq.write_table writes an empty table as one empty row group
            writer.write_table(rest, row_group_size=GROUP_ROWS)
        writer.close()


def run(cfg: Config, force: bool = False) -> StageResult:
    """Copy groups: `copy_of` (keeper id), `copy_group`, `copy_max_sim`; refuses a wiping result.

    The components, keepers and group numbers are computed by jobs over buckets of whole parts
    (curate.copy_graph_parts; Ray tasks with executor ray), which exchange edges, labels and members
    through files in the stage's `_graph` folder, where jobs also write each part's valid rows (which
    rows may form edges). Under Ray the pool index is built by a task and searched by one actor per node,
    each loading the valid rows and writing its query ranges' edges (verify none), or candidates (verify
    local: with the content hashes, their search, the cap and the verification as jobs of
    pipelines.copy_verify): the driver holds O(parts + buckets + verification jobs), never an id, a hash,
    an edge or a byte per record. (The local executor loads the valid rows, one byte per record, and holds
    the index.)
    """
    from curate.copy_graph_parts import group_edge_files, part_buckets
    from curate.dedup import CopyDedupRefused, SafetyLimits, as_parts
    from pipelines.aligned import EmbeddingLayout
    from pipelines.copy_images import verify_mode
    from pipelines.executors import stage_mapper
    from pipelines.manifest import STARTED

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    model = read_manifest(emb_dir)["config"]["model"]
    mode = verify_mode(cfg)
    inputs = {**upstream(cfg, "ingest"), "embedding": read_manifest(emb_dir)["key"]}
    unkeyed = ("max_component", "max_component_share", "max_removed_share",  # they refuse, never change output
               "bucket_records")  # how the work is split
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
    work = d / "_graph"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted run's messages
    valid_at, n_valid = valid_files(parts.paths, work, mapper)
    limits = SafetyLimits(max_component_share=dc.max_component_share, max_removed_share=dc.max_removed_share)
    notes = []
    try:
        try:
            choice = _threshold(cfg, emb_dir, model, lambda: _load_valid(valid_at))
            if not 0 <= choice.threshold < 1:  # e.g. calibrated on a pool of one image
                raise ValueError(f"calibration gave no usable cosine ({choice.threshold}) on {n_valid} images")
        except ValueError as exc:
            if mode != "local" or dc.threshold is not None:
                raise
            # local verification decides every pair it can judge; with no cosine to trust for the rest,
            # pairs too flat to judge are not linked
            from curate.calibrate import ThresholdChoice

            choice = ThresholdChoice(1.0, "none (calibration found none)", {"spec": model, "reason": str(exc)})
            notes.append(f"no cosine of {model} reached precision {dc.target_precision} on the pool: pairs too flat "
                         "to verify are not linked (give dedup.threshold to link them)")
        bounds = part_buckets(layout.offsets, dc.bucket_records)
        if mode == "local":
            files, extra = _verified_edges(cfg, emb_dir, layout, parts, valid_at, choice.threshold, work, bounds,
                                           mapper)
            decision, index_kind = f"local verification (cosine > {choice.threshold:.4g} where too flat)", "given edges"
        else:
            extra, decision = {}, None
            files, index_kind = _knn_files(cfg, emb_dir, parts, valid_at, dc.k, choice.threshold, work, bounds,
                                           "edges")
        extra["threshold_choice"] = choice.manifest()
        graph = group_edge_files(work, bounds, files, _NodeInfo(layout), mapper, valid=n_valid, k=dc.k,
                                 threshold=choice.threshold, max_component=dc.max_component, limits=limits,
                                 decision=decision, index_kind=index_kind)
    except CopyDedupRefused:
        (d / STARTED).unlink(missing_ok=True)  # nothing committed: other settings may run here next
        shutil.rmtree(d / "_graph", ignore_errors=True)
        raise
    _write_outputs(d, layout, graph, mapper)
    graph.cleanup()
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
