"""decontaminate: drop pool images that copy an evaluation image and their whole copy component;
`contaminated`, `contam_reason`, `contam_set` and `matches-<set>.parquet` per set. Each evaluation set
is indexed (flat and exact below 200,000 images, else IVF-Flat with dedup.nprobe) and the pool's embedding
parts stream through it (Ray tasks with executor ray), so no pool index is built. A pool image copies
an evaluation image when local verification says so (dedup.verify local: candidates above
decontaminate.candidate_cosine; the cosine decides pairs too flat to judge), else when its cosine is
> decontaminate.threshold."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import write_table_atomic
from pipelines.aligned import RowMap, embedding_ids
from pipelines.copy_images import verify_mode
from pipelines.config import Config, fingerprint
from pipelines.embedding import embed_reference_set, resolve_embedding
from pipelines.executors import stage_mapper
from pipelines.framework import enabled, source_fingerprint, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _verified_matches(cfg: Config, emb_dir, eval_sets: dict, d, spec) -> tuple[dict, dict]:
    """Per set, (pool row, eval row, score) pairs that local verification links: candidates are each
    evaluation image's candidate_k nearest pool images above decontaminate.candidate_cosine."""
    from curate.dedup import as_parts, eval_matches, pair_sims
    from curate.parts import read_table
    from pipelines.copy_images import verify_image_pairs, verify_settings

    pool = as_parts(str(emb_dir))
    pool_ingest = stage_dir(cfg, "ingest")
    pool_rows = RowMap(pool_ingest, emb_dir).emb_rows
    mapper = stage_mapper(cfg.executor, cfg.ray_address)
    direct, stats = {}, {}
    for name, (vecs, ev_ids) in eval_sets.items():
        ev = as_parts(vecs)
        p, e = eval_matches(pool, ev, cfg.decontaminate.candidate_cosine, cfg.dedup.candidate_k, spec, mapper=mapper)
        ingest_dir = d / "eval_sets" / name / "ingest"
        # eval vector i is the image of id ev_ids[i] (images that failed to embed have no vector)
        ev_rows = pc.index_in(pa.array(ev_ids, pa.string()), value_set=read_table(ingest_dir, ["id"]).column("id"))
        n = pool.n  # pool rows first, then the evaluation images
        res = verify_image_pairs([(pool_ingest, pool_rows), (ingest_dir, ev_rows.to_numpy(zero_copy_only=False))],
                                 p, n + e, verify_settings(cfg), mapper)
        sims = pair_sims(pool, res.i, ev, res.j - n)
        take = res.verified | (res.abstained & (sims > cfg.decontaminate.threshold))
        score = np.where(res.verified, res.share, sims)
        direct[name] = (res.i[take], res.j[take] - n, score[take])
        stats[name] = {**res.stats, "linked_too_flat_cosine": int((take & ~res.verified).sum())}
    return direct, stats


def run(cfg: Config, force: bool = False) -> StageResult:
    """Drop pool images that copy an evaluation image (verified locally, or cosine > threshold with
    verify none) and their copy component."""
    from curate.dedup import decontaminate
    from curate.index import IndexSpec

    xc = cfg.decontaminate
    if not xc.eval_sets:
        raise ValueError("no evaluation sets: give --eval-set NAME=SOURCE (or decontaminate.eval_sets)")
    emb_dir = resolve_embedding(cfg, cfg.dedup.embedding)
    with_groups = enabled(cfg, "dedup") and read_manifest(stage_dir(cfg, "dedup")) is not None  # copy dedup done
    inputs = {**upstream(cfg, "ingest", *(["dedup"] if with_groups else [])), "embedding": read_manifest(emb_dir)["key"]}
    # the evaluation sets by content (added images redo the stage; a moved folder does not), and the
    # copy settings this stage uses
    inputs["eval_sets"] = {s.name: source_fingerprint(s.source) for s in xc.eval_sets}
    used = ("candidate_k", "candidate_phash", "max_pairs_per_image", "verify_max_side", "verify_max_features",
            "nprobe")
    config = {**{k: v for k, v in asdict(xc).items() if k != "eval_sets"}, "eval_set_names": [s.name for s in xc.eval_sets],
              "verify": verify_mode(cfg), "dedup": {k: getattr(cfg.dedup, k) for k in used},
              "search": "evaluation index, pool streamed"}
    key = fingerprint({"config": config, "inputs": inputs})
    d = stage_dir(cfg, "decontaminate")
    prev = begin("decontaminate", d, key, force)
    if prev:
        return prev
    t0 = time.time()
    ids = embedding_ids(emb_dir)
    rows = RowMap(stage_dir(cfg, "ingest"), emb_dir)
    pool_groups = None  # without copy dedup every image is its own component
    alive = np.ones(len(ids), dtype=bool)  # survived copy dedup, so the funnel chains stage to stage
    if with_groups:
        group = rows.column(stage_dir(cfg, "dedup"), "copy_group")
        pool_groups = pc.fill_null(group, -1).to_numpy().astype(np.int64)[rows.emb_rows]
        alive = pc.is_null(rows.column(stage_dir(cfg, "dedup"), "copy_of")).to_numpy(zero_copy_only=False)[rows.emb_rows]
    eval_sets = {s.name: embed_reference_set(cfg, emb_dir, s.name, s.source, d / "eval_sets" / s.name)
                 for s in xc.eval_sets}
    # the evaluation sets' index: exact flat up to AUTO_FLAT_MAX_N images, IVF-Flat (dedup.nprobe) above;
    # dedup.index sizes the pool's copy-graph index and does not apply here
    spec = IndexSpec(kind="auto", nprobe=cfg.dedup.nprobe)
    direct, verify_stats = None, {}
    if verify_mode(cfg) == "local":
        direct, verify_stats = _verified_matches(cfg, emb_dir, eval_sets, d, spec)
    res = decontaminate(str(emb_dir), ids, pool_groups, eval_sets, threshold=xc.threshold, index_spec=spec,
                        given_pairs=direct, mapper=stage_mapper(cfg.executor, cfg.ray_address))
    contam_set = np.full(len(ids), None, dtype=object)
    id_array = pa.array(ids, type=pa.string())
    matches = {}
    for name, table in res.removed.items():  # a record removed by several sets is credited to the first
        at = pc.index_in(table.column("pool_id"), value_set=id_array).to_numpy().astype(np.int64)
        first = at[contam_set[at] == None]  # noqa: E711 (elementwise on an object array)
        contam_set[first] = name
        path = d / f"matches-{name}.parquet"
        write_table_atomic(res.pairs[name], path)
        matches[f"matches[{name}]"] = str(path)
    rows.write(d, rows.emb_rows, {
        "contaminated": (~res.keep, pa.bool_()), "contam_reason": (res.reason, pa.string()),
        "contam_set": (contam_set.tolist(), pa.string())})
    removed = alive & ~res.keep
    reason = np.array(res.reason, dtype=object)
    dropped = {f"contaminated_{r}": int((removed & (reason == r)).sum()) for r in ("direct", "component")}
    result = StageResult("decontaminate", str(d), key, counts={
        "in": int(alive.sum()), "out": int(alive.sum() - removed.sum()), "dropped": {k: v for k, v in dropped.items() if v}},
        seconds=time.time() - t0, outputs={"records": str(d), **matches})
    finish(result, {**asdict(xc), "verify": verify_mode(cfg), "stats": res.stats, "verify_stats": verify_stats}, inputs)
    return result
