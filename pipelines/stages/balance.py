"""balance: select `target` records balanced over the cluster tree (top-down), plus DINOv2-style
retrieval for seed sets; `selected`, `repeats`, `selected_by` and `seed_*` per record."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import list_parts, part_name
from pipelines.aligned import RowMap
from pipelines.config import Config, fingerprint
from pipelines.embedding import embed_reference_set, resolve_embedding
from pipelines.framework import source_fingerprint, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def cluster_embedding(cfg: Config):
    """The embedding the cluster stage ran on (as its manifest says), which seed sets must be matched in."""
    manifest = read_manifest(stage_dir(cfg, "cluster"))
    emb_dir = resolve_embedding(cfg, manifest["config"].get("embedding"))
    if read_manifest(emb_dir)["key"] != manifest["inputs"]["embedding"]:
        raise ValueError(f"the cluster stage ran on another embedding than {emb_dir.name}: redo cluster (--force)")
    return emb_dir


def retrieve_seeds(cfg: Config, pool_rows: np.ndarray, pool_l1: np.ndarray):
    """Retrieved pool images (indexes into pool_rows, global ingest rows of the clustered records) with
    their seed set, seed id and similarity; each seed set is embedded with the pool's model."""
    from curate.balance import retrieve
    from curate.index import build_index
    from curate.vectors import EmbeddingParts

    bc = cfg.balance
    emb_dir = cluster_embedding(cfg)
    rows = RowMap(stage_dir(cfg, "ingest"), emb_dir)
    emb_row = np.full(rows.n, -1, dtype=np.int64)
    emb_row[rows.emb_rows] = np.arange(len(rows.emb_rows))
    pool = EmbeddingParts(emb_dir).subset(emb_row[pool_rows])  # read from the memory maps when needed
    index = build_index(pool, log=lambda m: None)
    sets, ids = {}, {}
    for s in bc.seeds:
        sets[s.name], ids[s.name] = embed_reference_set(cfg, emb_dir, s.name, s.source,
                                                        stage_dir(cfg, "balance") / "seeds" / s.name)
    res = retrieve(sets, knn=index.knn, pool=pool, pool_labels=pool_l1,
                   pool_centroids=np.load(stage_dir(cfg, "cluster") / "centroids_l1.npy"),
                   cluster_max_seeds=bc.seed_cluster_max, n_per_seed={s.name: s.n_per_seed for s in bc.seeds},
                   min_seeds=bc.seed_min_per_cluster, per_cluster=bc.seed_per_cluster,
                   max_per_set={s.name: s.max_images for s in bc.seeds}, seed=bc.seed, seed_ids=ids)
    return res.rows, res.seed_set, res.seed_id, res.sim, res.report


def balanced_depth(cfg: Config, n_levels: int) -> int:
    """How many tree levels (from level 1 up) balanced sampling goes over, by balance.levels: all of
    them, a given number, or (auto) level 1 plus each next level while it groups the level below's
    centroids with >= balance.min_explained of their variance explained. Above the concepts, an
    arbitrary grouping splits the quota unevenly and selects less evenly than random (bench/balance.py)."""
    from curate.balance import structured_levels

    choice = str(cfg.balance.levels).strip().lower()
    if choice == "all":
        return n_levels
    if choice.isdigit():
        if not 1 <= int(choice) <= n_levels:
            raise ValueError(f"balance.levels={choice}: the cluster tree has levels 1..{n_levels}")
        return int(choice)
    if choice != "auto":
        raise ValueError(f"balance.levels must be auto, all or a level count, got {cfg.balance.levels!r}")
    cluster = stage_dir(cfg, "cluster")
    centroids = [np.load(cluster / f"centroids_l{lv}.npy") for lv in range(1, n_levels + 1)]
    return structured_levels(centroids, min_explained=cfg.balance.min_explained)


def _seeds_by_part(cfg: Config, rows: RowMap, n_levels: int) -> tuple[dict, list[str], dict]:
    """Seed retrievals on the driver (O(pool) only while retrieving), split by ingest part:
    {part: (positions, seed set, seed id, similarity)}, the seed set names in order, the report."""
    cluster = stage_dir(cfg, "cluster")
    clustered = np.flatnonzero(pc.is_valid(rows.column(cluster, "cluster_l1")).to_numpy(zero_copy_only=False))
    l1 = pc.fill_null(rows.column(cluster, "cluster_l1"), 0).to_numpy()[clustered]
    got, sets, sids, sims, seed_report = retrieve_seeds(cfg, clustered, l1)
    del l1
    at = clustered[got]
    part = np.searchsorted(rows.offsets, at, side="right") - 1
    out = {}
    for k in np.unique(part):
        w = np.flatnonzero(part == k)
        out[int(k)] = (at[w] - rows.offsets[k], np.asarray(sets, dtype=object)[w], np.asarray(sids, dtype=object)[w],
                       np.asarray(sims, dtype=np.float32)[w])
    return out, [s.name for s in cfg.balance.seeds], seed_report


def run(cfg: Config, force: bool = False) -> StageResult:
    """Select `target` records balanced over the cluster tree, plus seed-set retrievals: passes over
    the cluster parts (curate/balance_parts.py), as Ray tasks with executor ray; O(clusters) here."""
    from curate.balance import check_settings
    from curate.balance_parts import balance_parts
    from pipelines.executors import stage_mapper

    bc = cfg.balance
    inputs = upstream(cfg, "ingest", "cluster")
    config = asdict(bc)
    if bc.seeds:  # seed sets by content, embedded with the model the tree was clustered on
        inputs["seeds"] = {s.name: source_fingerprint(s.source) for s in bc.seeds}
        inputs["seed_embedding"] = read_manifest(cluster_embedding(cfg))["key"]
        config["seeds"] = [{k: v for k, v in asdict(s).items() if k != "source"} for s in bc.seeds]
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "balance")
    prev = begin("balance", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    check_settings(bc.strategy, True, bc.multiplier, bc.target)
    rows = RowMap(stage_dir(cfg, "ingest"))
    cluster = stage_dir(cfg, "cluster")
    cluster_parts = list_parts(cluster)
    if len(cluster_parts) != len(rows.parts):
        raise ValueError(f"{cluster} has {len(cluster_parts)} parts, the ingest stage {len(rows.parts)}")
    n_levels = sum(1 for c in pq.read_schema(cluster_parts[0]).names if c.startswith("cluster_l"))
    depth = balanced_depth(cfg, n_levels) if bc.target else n_levels
    seeds, seed_report = None, None
    if bc.seeds:
        seeds, names, seed_report = _seeds_by_part(cfg, rows, n_levels)
    res = balance_parts(rows.parts, cluster_parts, [d / part_name(k) for k in range(len(rows.parts))],
                        rows.offsets[:-1], bc.target, depth=depth, strategy=bc.strategy, multiplier=bc.multiplier,
                        seed=bc.seed, seeds=seeds, seed_sets=sorted(names) if bc.seeds else (),
                        mapper=stage_mapper(cfg.executor, cfg.ray_address))
    n = res.clustered
    report: dict = {"pool": n}
    if bc.target:
        report.update({"levels_balanced": depth, "levels": n_levels})
        report.update({k: v for k, v in res.report.items() if isinstance(v, (int, float, str))})
    if seed_report is not None:
        report["retrieval"] = seed_report
    shortfall = max(0, bc.target - res.repeats) if bc.target else 0
    result = StageResult("balance", str(d), key, counts={
        "in": n, "out": res.selected, "dropped": {"not_selected": n - res.selected},
        "target": bc.target, "shortfall": shortfall}, seconds=time.time() - t0, outputs={"selection": str(d)})
    if bc.target and report["levels_balanced"] < n_levels:
        result.notes.append(f"balanced over cluster levels 1..{report['levels_balanced']} of {n_levels}: the levels "
                            f"above explain < {bc.min_explained:.0%} of the variance below them (balance.levels=all "
                            f"balances over every level)")
    finish(result, {**asdict(bc), "report": report}, inputs)
    return result
