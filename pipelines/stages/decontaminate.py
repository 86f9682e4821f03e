"""decontaminate: drop pool images that copy an evaluation image and their whole copy component;
`contaminated`, `contam_reason`, `contam_set` and `matches-<set>.parquet` per set. Each evaluation set
is indexed (flat and exact below 200,000 images, else IVF-Flat with dedup.nprobe) and the pool's embedding
parts stream through it (Ray tasks with executor ray), so no pool index is built. A pool image copies
an evaluation image when local verification says so (dedup.verify local: candidates above
decontaminate.candidate_cosine; the cosine decides pairs too flat to judge), else when its cosine is
> decontaminate.threshold. Memory holds one part, the candidates and the records removed."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import write_table_atomic
from pipelines.aligned import EmbeddingLayout, RowMap
from pipelines.copy_images import verify_mode
from pipelines.config import Config, fingerprint
from pipelines.embedding import embed_reference_set, resolve_embedding
from pipelines.executors import stage_mapper
from pipelines.framework import enabled, source_fingerprint, stage_dir, upstream
from pipelines.manifest import StageResult, begin, finish, read_manifest


def _verified_matches(cfg: Config, emb_dir, eval_sets: dict, d, spec) -> tuple[dict, dict]:
    """Per set, (pool row, eval row, score) pairs that local verification links: candidates are each
    evaluation image's candidate_k nearest pool images above decontaminate.candidate_cosine."""
    from curate.decontam import eval_matches
    from curate.dedup import as_parts, pair_sims
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


def _write_parts(d, layout, res, mapper) -> None:
    """The stage's parts, one job (a task with executor ray) per ingest part given only its removed rows:
    `contaminated`, `contam_reason` ("direct" or "component"), `contam_set` (the first set that removed it)."""
    from curate.parts import map_in_order, part_name
    from pipelines.aligned import write_emb_part

    cuts = np.searchsorted(res.removed, layout.offsets)
    jobs = []
    for k in range(len(layout.emb_parts)):
        lo, hi = cuts[k], cuts[k + 1]
        columns = {"contaminated": (np.ones(hi - lo, dtype=bool), False, pa.bool_()),
                   "contam_reason": (res.reason[lo:hi], None, pa.string()),
                   "contam_set": (res.first_set[lo:hi], None, pa.string())}
        jobs.append((str(layout.ingest_parts[k]), str(layout.emb_parts[k]), str(d / part_name(k)),
                     res.removed[lo:hi] - layout.offsets[k], columns))
    map_in_order(mapper, write_emb_part, jobs)


def run(cfg: Config, force: bool = False) -> StageResult:
    """Drop pool images that copy an evaluation image (verified locally, or cosine > threshold with
    verify none) and their copy component. The driver holds the matched records and their components,
    never an id or a value per record: ids, copy groups and members are read, and the parts written, part
    by part (Ray tasks with executor ray); verify local still maps every pool row to its image."""
    from curate.decontam import decontaminate_rows
    from curate.dedup import as_parts
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
    layout = EmbeddingLayout(stage_dir(cfg, "ingest"), emb_dir)
    mapper = stage_mapper(cfg.executor, cfg.ray_address)
    alive = layout.n  # survived copy dedup, so the funnel chains stage to stage
    if with_groups:
        copies = EmbeddingLayout(stage_dir(cfg, "dedup"), emb_dir)  # the dedup parts, read by the same layout

        def groups_of(rows):
            return np.nan_to_num(np.asarray(copies.values(rows, ["copy_group"], mapper)["copy_group"], dtype=np.float64),
                                 nan=-1).astype(np.int64)

        def members_of(groups):
            return copies.rows_where("copy_group", groups, mapper)

        alive -= copies.count_set("copy_of", mapper)
    else:  # without copy dedup every image is its own component
        groups_of = members_of = None
    eval_sets = {s.name: embed_reference_set(cfg, emb_dir, s.name, s.source, d / "eval_sets" / s.name)
                 for s in xc.eval_sets}
    # the evaluation sets' index: exact flat up to AUTO_FLAT_MAX_N images, IVF-Flat (dedup.nprobe) above;
    # dedup.index sizes the pool's copy-graph index and does not apply here
    spec = IndexSpec(kind="auto", nprobe=cfg.dedup.nprobe)
    direct, verify_stats = None, {}
    if verify_mode(cfg) == "local":
        direct, verify_stats = _verified_matches(cfg, emb_dir, eval_sets, d, spec)
    res = decontaminate_rows(as_parts(str(emb_dir)), lambda rows: layout.values(rows, ["id"], mapper)["id"], groups_of,
                             members_of, eval_sets, threshold=xc.threshold, index_spec=spec, given_pairs=direct,
                             mapper=mapper)
    matches = {}
    for name, table in res.pairs.items():
        path = d / f"matches-{name}.parquet"
        write_table_atomic(table, path)
        matches[f"matches[{name}]"] = str(path)
    _write_parts(d, layout, res, mapper)
    # removed records that copy dedup had kept: the funnel counts only those
    gone_alive = np.ones(len(res.removed), dtype=bool)
    if with_groups and len(res.removed):
        gone_alive = pc.is_null(pa.array(copies.values(res.removed, ["copy_of"], mapper)["copy_of"],
                                         type=pa.string(), from_pandas=True)).to_numpy(zero_copy_only=False)
    dropped = {f"contaminated_{r}": int((gone_alive & (res.reason == r)).sum()) for r in ("direct", "component")}
    removed = int(gone_alive.sum())
    result = StageResult("decontaminate", str(d), key, counts={
        "in": int(alive), "out": int(alive - removed), "dropped": {k: v for k, v in dropped.items() if v}},
        seconds=time.time() - t0, outputs={"records": str(d), **matches})
    finish(result, {**asdict(xc), "verify": verify_mode(cfg), "stats": res.stats, "verify_stats": verify_stats}, inputs)
    return result
