"""balance: select `target` records balanced over the cluster tree (top-down), plus DINOv2-style
retrieval for seed sets; `selected`, `repeats`, `selected_by` and `seed_*` per record."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.parts import list_parts
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


def run(cfg: Config, force: bool = False) -> StageResult:
    """Select `target` records balanced over the cluster tree, plus seed-set retrievals."""
    from curate.balance import balanced_sample

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
    rows = RowMap(stage_dir(cfg, "ingest"))
    cluster = stage_dir(cfg, "cluster")
    n_levels = sum(1 for c in pq.read_schema(list_parts(cluster)[0]).names if c.startswith("cluster_l"))
    clustered = np.flatnonzero(pc.is_valid(rows.column(cluster, "cluster_l1")).to_numpy(zero_copy_only=False))
    paths = np.empty((len(clustered), n_levels), dtype=np.int32)  # filled a level at a time, no float copies
    for lv in range(n_levels):
        paths[:, lv] = pc.fill_null(rows.column(cluster, f"cluster_l{lv + 1}"), 0).to_numpy()[clustered]
    n = len(clustered)
    counts = np.zeros(n, dtype=np.int32)
    by_code = np.full(n, -1, dtype=np.int32)  # selected_by as codes into by_labels (no string per record)
    by_labels: list[str] = []
    report: dict = {"pool": n}
    if bc.target:
        depth = balanced_depth(cfg, n_levels)
        paths = paths[:, :depth]
        report.update({"levels_balanced": depth, "levels": n_levels})
        sq = rows.column(cluster, "cluster_sq_dist").to_numpy(zero_copy_only=False)[clustered]
        res = balanced_sample(paths, bc.target, strategy=bc.strategy, multiplier=bc.multiplier, seed=bc.seed,
                              sq_dists=sq)
        counts, by_code, by_labels = res.counts.astype(np.int32), res.by_code, list(res.by_labels)
        report.update({k: v for k, v in res.report.items() if isinstance(v, (int, float, str))})
    seed_types = {"seed_set": pa.string(), "seed_id": pa.string(), "seed_sim": pa.float32()}
    seeded = {c: (pa.nulls(n, t), t) for c, t in seed_types.items()}  # no Python object per record without seeds
    if bc.seeds:
        seed_set, seed_id, seed_sim = (np.full(n, None, dtype=object) for _ in range(3))
        got, sets, sids, sims, seed_report = retrieve_seeds(cfg, clustered, paths[:, 0])
        seed_set[got], seed_id[got], seed_sim[got] = sets, sids, [float(x) for x in sims]
        fresh = got[counts[got] == 0]
        counts[fresh] = 1
        names = sorted({str(s) for s in seed_set[fresh]})
        by_code[fresh] = len(by_labels) + np.searchsorted(np.array(names, dtype=object), seed_set[fresh])
        by_labels += [f"seed:{s}" for s in names]
        report["retrieval"] = seed_report
        seeded = {c: (v.tolist(), seed_types[c]) for c, v in zip(seed_types, (seed_set, seed_id, seed_sim))}
    selected = counts > 0
    by = pa.DictionaryArray.from_arrays(pa.array(by_code, mask=by_code < 0, type=pa.int32()),
                                        pa.array(by_labels, type=pa.string()))
    rows.write(d, clustered, {"selected": (selected, pa.bool_()), "repeats": (counts, pa.int32()),
                              "selected_by": (by, pa.string()), **seeded})
    shortfall = max(0, bc.target - int(counts.sum())) if bc.target else 0
    result = StageResult("balance", str(d), key, counts={
        "in": n, "out": int(selected.sum()), "dropped": {"not_selected": int((~selected).sum())},
        "target": bc.target, "shortfall": shortfall}, seconds=time.time() - t0, outputs={"selection": str(d)})
    if bc.target and report["levels_balanced"] < n_levels:
        result.notes.append(f"balanced over cluster levels 1..{report['levels_balanced']} of {n_levels}: the levels "
                            f"above explain < {bc.min_explained:.0%} of the variance below them (balance.levels=all "
                            f"balances over every level)")
    finish(result, {**asdict(bc), "report": report}, inputs)
    return result
