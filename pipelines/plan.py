"""`curate plan`: what a run of a config will cost at N input records on a given cluster, per stage:
peak memory per process and per node, disk written, network moved and an estimated time; a config
that cannot fit is refused with one line naming the key.

The per-item costs and their sources are in plan_costs.COSTS; the shapes here (how each stage's
work and memory grow with N, k, d and the index) follow the code of each stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipelines.config import Config
from pipelines.framework import enabled
from pipelines.plan_kmeans import level_plan
from pipelines.plan_costs import (
    COSTS,
    HASH_RATES_OK,
    Cluster,
    PlanRefused,
    StagePlan,
    cost,
    dense_rate,
    fmt_bytes,
    fmt_time,
    model_info,
)

EVAL_IMAGES = 100_000  # evaluation images assumed when `curate plan --eval-images` is not given

__all__ = ["COSTS", "Cluster", "PlanRefused", "StagePlan", "default_cluster", "format_plan", "plan", "plan_command"]


def _embeddings(cfg: Config) -> dict[str, tuple[str, int, float, bool]]:
    """Per embedding name: (model spec, dim, relative cost, known)."""
    from dataclasses import replace

    from pipelines.embedding import embedding_dir

    out = {}
    for ec in [cfg.embed, *cfg.extra_embeds]:
        name = embedding_dir(replace(cfg, embed=ec)).name
        out[name] = (ec.model, *model_info(ec.model))
    return out


def _embedding(cfg: Config, name: str | None, embs: dict) -> tuple[str, int, float, bool]:
    if name and name in embs:
        return embs[name]
    if name:  # named but made outside the config (e.g. `curate embed --name copy`): guess from the name
        return (name, *model_info(name))
    return next(iter(embs.values()))


# Stages whose heavy part runs as Ray tasks or actors over the nodes with `executor: ray` (the code as it
# is: ingest one task per part, hash dedup banded map/reduce tasks, curated shards one task per shard; the
# ingest plan, hash dedup's records with a link and the shard plan stay on the driver).
ON_RAY = {"ingest", "hashdedup", "embed", "dedup", "cluster", "balance", "shards"}
MODELS_VITS = 0.075  # ViT-S/14's forward cost relative to ViT-L/14 (plan_costs.MODELS)


@dataclass
class _Flow:
    """Records reaching each stage."""

    inputs: int
    ok: int
    kept: int
    clustered: int
    selected: int


def _flow(cfg: Config, n: int) -> _Flow:
    ok = int(n * cost("ok_share"))
    kept = int(ok * (1 - cost("hash_dup_share")))
    clustered = int(kept * (1 - cost("copy_dup_share"))) if enabled(cfg, "dedup") else kept
    bc = cfg.balance
    selected = min(bc.target, clustered * bc.multiplier) if bc.target else clustered
    return _Flow(n, ok, kept, clustered, selected)


def _ingest(cfg: Config, f: _Flow, cl: Cluster) -> StagePlan:
    cores = cl.cpus_per_node if "ingest" not in ON_RAY or cfg.executor != "ray" else cl.cpus_per_node * cl.nodes
    workers = cfg.ingest.workers or cl.cpus_per_node
    nodes = 1 if cores == cl.cpus_per_node else cl.nodes
    down = f.inputs * cost("image_bytes")
    seconds = max(f.inputs * cost("ingest_s") / min(cores, workers * nodes), down / (nodes * cost("net_bytes_s")))
    names = f.inputs * cost("ingest_plan_bytes")  # the count of names seen, numbering repeated names
    if nodes > 1:  # executor ray: the names counted on one actor per node (split by key), the driver holds none
        holder = cost("base_rss") + names / nodes
        planner, node = max(cost("ingest_rss"), holder), workers * cost("ingest_rss") + holder  # largest process
        seconds += (f.inputs / cfg.ingest.part_size) * cost("ray_call_s")  # the plan asks the holders once a part
        note = (f"the planner counts names on {nodes} actors, one per node ({fmt_bytes(holder)} each), one call "
                "a part; the driver holds nothing per name")
    else:
        planner = cost("ingest_rss") + names
        node = workers * cost("ingest_rss") + planner
        note = f"the planner holds 8 bytes per distinct input name ({fmt_bytes(planner)} with its process)"
    return StagePlan("ingest", "node" if nodes == 1 else "cluster", max(cost("ingest_rss"), planner), node,
                     f.ok * cost("image_bytes") + f.inputs * cost("record_bytes"), down, seconds, f.inputs,
                     [f"downloads {fmt_bytes(down)} (URL sources) at {fmt_bytes(cost('net_bytes_s'))}/s per node",
                      note])


def _bucket_jobs(records: int, bucket_records: int, share: float, node_bytes: str) -> tuple[int, int, float]:
    """The groups' bucket jobs (curate.copy_graph_parts) over `records`: rows per bucket, buckets, and a
    job's bytes: its bucket's records with an edge (`share` of them), twice that for the groups it owns
    (a group's smallest row is more often a low one)."""
    bucket = max(1, min(records, bucket_records))
    return bucket, -(-records // bucket), cost("base_rss") + 2 * bucket * share * cost(node_bytes)


def _group_core_s(nodes: float) -> float:
    """Core-seconds of the bucket jobs for `nodes` records with an edge: a pair's rounds (build, one label
    round, owners, groups, cuts, number, collect) and every further label round over all of them."""
    return nodes * (cost("dedup_node_s") + (cost("dedup_rounds") - 2) * cost("dedup_round_node_s"))


def _phash_shared_s(ok: float, max_distance: int) -> float:
    """Core-seconds per ok record that hash dedup's rates (measured at 9.8M ok records) leave out: each
    pHash band's search grows with the records sharing the band's field value (ok / 2^width)."""
    from curate.hash_bands import phash_fields

    return sum(cost("phash_shared_s") * max(0.0, ok - HASH_RATES_OK) / 2**width
               for _, width in phash_fields(max_distance))


def _hashdedup(cfg: Config, f: _Flow, cl: Cluster) -> StagePlan:
    from curate.hash_bands import phash_fields

    from pipelines.stages.hashdedup import RAY_BAND_ROWS

    hc = cfg.hashdedup
    dups = f.ok * cost("hash_dup_share")
    band_bytes = f.ok * (16 * len(phash_fields(hc.phash_max_distance)) + (72 if hc.exact else 0))  # every band
    # the linked records' groups: at most twice the duplicates have a link
    bucket, buckets, job = _bucket_jobs(f.ok, hc.bucket_records, min(1.0, 2 * cost("hash_dup_share")),
                                        "hashdedup_node_bytes")
    group_s = _group_core_s(2 * dups)
    shared = _phash_shared_s(f.ok, hc.phash_max_distance)
    rounds = cost("dedup_rounds") + 4
    if "hashdedup" in ON_RAY and cfg.executor == "ray":
        # banded map/reduce: the maps and the band reduces as tasks on every core, the bands in the object store
        # (moved between nodes); the groups by bucket jobs as tasks; the driver holds O(parts)
        cores = cl.nodes * cl.cpus_per_node
        band = cost("base_rss") + RAY_BAND_ROWS * cost("hashdedup_band_record_bytes")
        seconds = (f.ok * (cost("hashdedup_ray_s") + shared) / cores + group_s / min(cores, buckets)
                   + rounds * cost("ray_call_s"))
        return StagePlan("hashdedup", "cluster", max(band, job), cl.cpus_per_node * max(band, job),
                         f.inputs * 30, band_bytes * (1 - 1 / cl.nodes), seconds, f.ok,
                         [f"banded map/reduce over {cores:,} cores (bands of {RAY_BAND_ROWS:,} records per task); "
                          f"the ~{int(dups):,} duplicates' groups by {buckets:,} bucket jobs of {bucket:,} rows "
                          f"({fmt_bytes(job)} each); the driver holds O(parts)"])
    mem = cost("base_rss") + max(cost("hashdedup_band_bytes"), job - cost("base_rss"))
    return StagePlan("hashdedup", "driver", mem, mem, f.inputs * 30 + band_bytes, 0,
                     f.ok * (cost("hashdedup_s") + shared) + group_s, f.ok,
                     ["one process: the bands spilled to disk and reduced one at a time, then the groups by "
                      f"{buckets:,} bucket jobs of {bucket:,} rows, one after the other"])


def _embed(cfg: Config, f: _Flow, cl: Cluster, embs: dict) -> StagePlan:
    spread = cfg.executor == "ray"
    nodes = cl.nodes if spread else 1
    seconds, disk, notes = 0.0, 0.0, []
    for name, (spec, dim, rel, known) in embs.items():
        decode = nodes * cl.cpus_per_node * cost("embed_decode_img_s")  # reading and preprocessing bound it
        if cl.gpus_per_node:
            model = nodes * cl.gpus_per_node * cost("embed_gpu_img_s") / max(rel, 1e-3)
        else:
            model = nodes * cl.cpus_per_node * cost("embed_cpu_vits_img_s") * MODELS_VITS / max(rel, 1e-4)
        rate = min(decode, model)
        seconds += f.kept / rate
        disk += f.kept * (2 * dim + 40)
        notes.append(f"{name}: {spec}, d={dim}{'' if known else ' (dimension unknown: assumed)'}, "
                     f"{rate:,.0f} img/s in all ({'decode' if decode < model else 'model'}-bound)")
    actors = (cl.gpus_per_node or cl.cpus_per_node) if spread else 1
    net = f.kept * cost("image_bytes") * (1 - 1 / nodes) * len(embs)
    return StagePlan("embed", "cluster" if spread else "node", cost("embed_actor_bytes"),
                     actors * cost("embed_actor_bytes"), disk, net, seconds, f.kept, notes)


def _index(cfg: Config, n: int, d: int):
    """The resolved dedup index spec for n x d and its bytes (the index module's own estimate)."""
    from curate.index_build import IndexSpec, estimate_memory, resolve_spec

    spec = resolve_spec(IndexSpec(kind=cfg.dedup.index, nprobe=cfg.dedup.nprobe), n, d, check_budget=False)
    return spec, estimate_memory(spec, n, d)


def _search_seconds(spec, n_index: int, n_queries: int, d: int, cl: Cluster, spread: bool) -> float:
    """Train, add and k-NN search time of an index: dense FLOPs on GPUs, measured scan cost on cores."""
    nlist = spec.nlist or 1
    width = (spec.pq_m or d) if spec.kind == "ivf_pq" else d
    scanned = n_queries * (n_index if spec.kind == "flat" else n_index * (spec.nprobe or 1) / nlist)
    if spec.kind == "hnsw":
        scanned = n_queries * spec.ef_search * spec.hnsw_m * 2
    build = 2 * d * ((spec.train_size or 0) * nlist * 25 + n_index * nlist) if spec.nlist else 0
    rate, _ = dense_rate(cl, spread)
    coarse = 2 * n_queries * nlist * d if spec.nlist else 0
    if cl.gpus_per_node:
        return (build + coarse + 2 * scanned * width) / rate
    cores = (cl.nodes if spread else 1) * cl.cpus_per_node
    scan = cost("flat_scan_s") if spec.kind == "flat" else cost("ivf_scan_s")  # BLAS blocks, or inverted lists
    return (build + coarse) / rate + scanned * width * scan / cores


def _verify_local(cfg: Config, n: int, cl: Cluster, spec, d: int, spread: bool,
                  bucket: int) -> tuple[float, float, float, str]:
    """dedup.verify local (pipelines.copy_verify): every image decoded again for its content and mirrored
    pHashes, each value partition's hashes searched against all 2n within candidate_phash bits (brute
    force), the embedding's k-NN candidates (the index holders), cap jobs that keep each row's best
    max_pairs_per_image, and the kept pairs verified by local features; all jobs (Ray tasks, or one after
    the other in the driver). Returns a cap or search job's bytes, the messages' bytes on disk, the seconds
    and a note."""
    from curate.hashing import brute_force_seconds
    from pipelines.copy_verify import SEARCH_VALUES

    dc = cfg.dedup
    cores = cl.nodes * cl.cpus_per_node if spread else 1
    # the per-image cap bounds the pairs at n * cap / 2: the demo's pool reaches 68% of it (6.8 kept pairs per
    # image), the photographs of RESULTS 'Copy detection a user can trust' 51% (1,833-1,846 among 358 images)
    pairs = n * dc.max_pairs_per_image / 2
    searches = -(-2 * n // SEARCH_VALUES)  # search jobs (at most: hashes collapse to distinct values)
    # a job holds its rows' (or values') best candidates and as many gathered (u, v, cost: 24 B), with the
    # sorts' copies (x3)
    job = cost("base_rss") + max(bucket, min(SEARCH_VALUES, 2 * n)) * 2 * dc.max_pairs_per_image * 72
    # the messages: each k-NN candidate and each pHash pair a search job sends, to both rows' buckets
    disk = n * (2 * dc.candidate_k + 4 * dc.max_pairs_per_image) * 24
    # each value against all 2n (a pair is searched from both ends), the search jobs side by side
    search_s = brute_force_seconds((2 * n) ** 2, min(searches, cores) if spread else cl.cpus_per_node)
    knn_s = _search_seconds(spec, n, n, d, cl, spread)
    decode_s, verify_s = n * cost("ingest_s") / cores, pairs * cost("verify_pair_s") / cores
    seconds = decode_s + search_s + knn_s + verify_s
    where = "tasks" if spread else "the driver"
    note = (f"local verification by jobs ({where}): every image decoded again ({fmt_time(decode_s)}), the pHash "
            f"candidates within {dc.candidate_phash} bits over {2 * n:,} hashes by brute force in {searches:,} "
            f"job(s) ({fmt_time(search_s)}), the k-NN candidates ({fmt_time(knn_s)}), up to {pairs:,.0f} pairs "
            f"verified ({fmt_time(verify_s)}); cap and search jobs of {fmt_bytes(job)}, {fmt_bytes(disk)} of "
            "candidates exchanged; at scale use a copy descriptor with dedup.verify none")
    return job, disk, seconds, note


def _dedup(cfg: Config, f: _Flow, cl: Cluster, embs: dict) -> StagePlan:
    """The pool index (built by a task and held once per node under Ray; in the driver otherwise), k-NN
    queries that write their edges to files, and the copy graph's bucket jobs (tasks under Ray; one after
    the other in the driver otherwise; at most twice the copy share have an edge). Under Ray the driver holds
    O(parts + buckets); the index holders also load the valid rows (one byte per record). With dedup.verify
    local the k-NN edges are candidates, with the pHash candidates ranked by cap jobs and verified by
    local features before they are edges (see _verify_local)."""
    spec_name, d, _, known = _embedding(cfg, cfg.dedup.embedding, embs)
    spec, index = _index(cfg, f.kept, d)
    spread = cfg.executor == "ray"
    train = (spec.train_size or 0) * d * 4
    share = min(1.0, 2 * cost("copy_dup_share"))
    bucket, buckets, job = _bucket_jobs(f.kept, cfg.dedup.bucket_records, share, "dedup_node_bytes")
    notes = [f"{spec.kind} index of {f.kept:,} x {d} ({fmt_bytes(index)})"
             + (f", nlist {spec.nlist}, nprobe {spec.nprobe}" if spec.nlist else "")
             + ("" if known else f"; embedding {spec_name!r} not in the config: d={d} assumed"),
             f"copy graph: {buckets:,} bucket jobs of {bucket:,} rows ({fmt_bytes(job)} each, up to "
             f"{f.kept * share:,.0f} records with an edge in all); "]
    verify = cfg.dedup.verify == "local" or (cfg.dedup.verify == "auto" and not cfg.dedup.copy_descriptor)
    exchanged = 0.0
    if verify:  # the index holders find candidates; cap jobs rank them, as the bucket jobs run
        cap_job, exchanged, search_s, note = _verify_local(cfg, f.kept, cl, spec, d, spread, bucket)
        notes.append(note)
        if cap_job > cl.mem / (cl.cpus_per_node if spread else 1):
            raise PlanRefused(f"dedup.verify local: a cap or search job needs {fmt_bytes(cap_job)}, "
                              f"{'with one per core ' if spread else ''}over {cl.mem_per_node_gb:g} GB per node; "
                              "lower dedup.bucket_records, or use a copy descriptor with dedup.verify none")
        job = max(job, cap_job)
    else:
        search_s = _search_seconds(spec, f.kept, f.kept, d, cl, spread)
    valid = f.kept * cost("dedup_valid_bytes")
    builder = cost("base_rss") + index + train  # the process that builds the index
    if spread:  # one index per node with the valid rows, shared by that node's query actor; the bucket jobs as tasks
        driver = cost("base_rss")
        node = max(driver, builder, index + valid + cl.cpus_per_node * cost("base_rss"), cl.cpus_per_node * job)
        notes[1] += f"the valid rows written per part by tasks, loaded by the index holders ({fmt_bytes(valid)}); " \
                    "the driver holds O(parts)"
    else:
        driver = node = cost("base_rss") + valid + max(index + train, job - cost("base_rss"))
        notes[1] += f"the driver holds the valid rows ({fmt_bytes(valid)})"
    if builder > cl.mem:
        raise PlanRefused(f"dedup.index: the {spec.kind} index of {f.kept:,} x {d} vectors needs "
                          f"{fmt_bytes(builder)} in one process (index {fmt_bytes(index)}), over "
                          f"{cl.mem_per_node_gb:g} GB per node; use ivf_pq (or a smaller embedding)")
    if job > cl.mem / (cl.cpus_per_node if spread else 1):
        raise PlanRefused(f"dedup.bucket_records: a copy-graph job of {bucket:,} rows needs {fmt_bytes(job)}, "
                          f"{'with one per core ' if spread else ''}over {cl.mem_per_node_gb:g} GB per node; "
                          "lower it")
    if driver > cl.mem:
        raise PlanRefused(f"dedup: the index and a copy-graph job need {fmt_bytes(driver)} in the driver, over "
                          f"{cl.mem_per_node_gb:g} GB per node; run with executor ray (the index then stays off "
                          "the driver)")
    cores = min(cl.nodes * cl.cpus_per_node, buckets) if spread else 1  # a round runs its buckets side by side
    rounds = cost("dedup_rounds") + 4  # the label rounds and build, owners, groups, cuts, number, collect
    seconds = search_s + _group_core_s(f.kept * share) / cores + (rounds * cost("ray_call_s") if spread else 0)
    holders = index + valid + cost("base_rss")  # the index holders
    largest = max(driver, builder, holders, job) if spread else driver
    return StagePlan("dedup", "cluster" if spread else "driver", largest, node, f.kept * 40 + exchanged,
                     (cl.nodes - 1) * index + exchanged if spread else 0, seconds, f.kept, notes)


def _decontaminate(cfg: Config, f: _Flow, cl: Cluster, embs: dict, eval_images: int) -> StagePlan:
    """The evaluation sets are indexed (one index, shipped to every task) and the pool's embedding parts
    stream through it as range searches: memory holds the evaluation index, one part and the candidates."""
    _, d, _, _ = _embedding(cfg, cfg.dedup.embedding, embs)
    from curate.index_build import IndexSpec, estimate_memory, resolve_spec

    spec = resolve_spec(IndexSpec(kind="auto", nprobe=cfg.dedup.nprobe), eval_images, d, check_budget=False)
    index = estimate_memory(spec, eval_images, d)
    spread = cfg.executor == "ray"
    candidates = eval_images * (cfg.dedup.candidate_k or 64) * 24  # (pool row, eval row, sim) kept per image
    driver = cost("base_rss") + eval_images * d * 4 + index + candidates
    task = cost("base_rss") + index + cfg.ingest.part_size * d * 4 + candidates
    node = max(driver, cl.cpus_per_node * task) if spread else max(driver, task)
    if node > cl.mem:
        raise PlanRefused(f"decontaminate.eval_sets: decontamination ships a {spec.kind} index of {eval_images:,} x {d} "
                          f"evaluation images ({fmt_bytes(index)}) to every task, {fmt_bytes(node)} per node, over "
                          f"{cl.mem_per_node_gb:g} GB")
    seconds = _search_seconds(spec, eval_images, f.kept, d, replace(cl, gpus_per_node=0), spread)  # range: CPU only
    return StagePlan("decontaminate", "cluster" if spread else "driver", max(driver, task), node, f.kept * 20,
                     index * (cl.nodes - 1) if spread else 0, seconds, f.kept,
                     [f"{spec.kind} index of {eval_images:,} evaluation images x {d} ({fmt_bytes(index)}; "
                      "--eval-images, default an assumed 100,000); the pool streams through it part by part"])


def _cluster(cfg: Config, f: _Flow, cl: Cluster, embs: dict) -> StagePlan:
    spec, d, _, known = _embedding(cfg, cfg.cluster.embedding, embs)
    n, driver, node, seconds, notes = f.clustered, 0.0, 0.0, 0.0, []
    for i, lv in enumerate(cfg.cluster.levels):
        dm, nm, s, more = level_plan(i, lv, n, d, cfg, cl)
        driver, node, seconds, notes = max(driver, dm), max(node, nm), seconds + s, notes + more
        n = lv.n_clusters
    if not known:
        notes.append(f"embedding {spec!r}: d={d} assumed")
    spread = cfg.executor == "ray"
    read = f.clustered * d * 2 * sum(lv.n_iters + 1 for lv in cfg.cluster.levels[:1])
    return StagePlan("cluster", "cluster" if spread else "driver", driver, node,
                     sum(lv.n_clusters for lv in cfg.cluster.levels) * d * 4 + f.kept * 20,
                     read * (1 - 1 / cl.nodes) if spread else 0, seconds, f.clustered, notes)


def _driver_stage(stage: str, records: int, per_s: str, per_b: str, disk: float, note: str) -> StagePlan:
    mem = cost("base_rss") + records * cost(per_b)
    return StagePlan(stage, "driver", mem, mem, disk, 0, records * cost(per_s), records, [note])


def _balance(cfg: Config, f: _Flow, cl: Cluster) -> StagePlan:
    on_ray = "balance" in ON_RAY and cfg.executor == "ray"
    p = _driver_stage("balance", f.clustered, "balance_s", "balance_bytes", f.clustered * 20,
                      "passes over the cluster parts (leaf sizes, cut-off histograms, one write per part), "
                      + ("one Ray task per part" if on_ray else "in one process") + "; the driver holds O(clusters)")
    if on_ray:
        p.where, p.seconds = "cluster", p.seconds / (cl.nodes * cl.cpus_per_node)
    return p


def _shards(cfg: Config, f: _Flow, cl: Cluster) -> StagePlan:
    spread = "shards" in ON_RAY and cfg.executor == "ray"
    p = _driver_stage("shards", f.selected, "plan_s", "plan_bytes", f.selected * cost("image_bytes"),
                      "the plan by an external sort on the driver (a range of samples in memory at a time, and "
                      "the shuffle), then " + (f"one task per shard over {cl.nodes} node(s)" if spread
                                               else "shards written in order"))
    p.mem_process += cost("plan_range_bytes")
    p.mem_node += cost("plan_range_bytes")
    data = f.selected * cost("image_bytes")
    if spread:  # one task per shard on every core, reading the raw shards over the network
        rate = min(cl.nodes * cl.cpus_per_node * cost("shards_bytes_s"), cl.nodes * cost("net_bytes_s"))
        p.where = "cluster"
    else:
        rate = cost("shards_bytes_s")
    p.seconds += data / rate
    p.network = data * (1 - 1 / cl.nodes)
    return p


def plan(cfg: Config, records: int, cluster: Cluster, dims: dict[str, int] | None = None,
         eval_images: int = EVAL_IMAGES) -> list[StagePlan]:
    """Per enabled curation stage, in pipeline order: the estimate; PlanRefused when one cannot fit.
    `dims` gives the dimension of embeddings the config does not describe (e.g. {"copy": 512});
    `eval_images` the images of all evaluation sets together."""
    if records < 1:
        raise ValueError(f"--records must be at least 1, got {records}")
    f, embs, out = _flow(cfg, records), _embeddings(cfg), []
    for name, dim in (dims or {}).items():
        spec, _, rel, _ = embs.get(name, (name, 0, model_info(name)[1], True))
        embs[name] = (spec, int(dim), rel, True)
    out.append(_ingest(cfg, f, cluster))
    out.append(_hashdedup(cfg, f, cluster))
    out.append(_embed(cfg, f, cluster, embs))
    if enabled(cfg, "dedup"):
        out.append(_dedup(cfg, f, cluster, embs))
    if enabled(cfg, "decontaminate"):
        out.append(_decontaminate(cfg, f, cluster, embs, eval_images))
    if enabled(cfg, "cluster"):
        out.append(_cluster(cfg, f, cluster, embs))
        out.append(_balance(cfg, f, cluster))
    out.append(_shards(cfg, f, cluster))
    for p in out:
        if p.mem_node > cluster.mem:
            raise PlanRefused(f"{p.stage}: needs {fmt_bytes(p.mem_node)} on one node, over "
                              f"{cluster.mem_per_node_gb:g} GB (--mem-per-node); {p.notes[0]}")
    return out


def format_plan(plans: list[StagePlan], records: int, cluster: Cluster) -> str:
    """The plan as a table with totals, and where the figures come from."""
    gpus = f" x {cluster.gpus_per_node} GPUs" if cluster.gpus_per_node else " (no GPU)"
    title = (f"plan for {records:,} input records on {cluster.nodes} node(s){gpus}, {cluster.cpus_per_node} cores "
             f"and {cluster.mem_per_node_gb:g} GB each")
    header = (f"{'stage':<14}{'where':<9}{'records':>15}{'mem/process':>13}{'mem/node':>11}{'disk':>11}"
              f"{'network':>11}{'time':>10}")
    lines = [title, header]
    for p in plans:
        lines.append(f"{p.stage:<14}{p.where:<9}{p.records:>15,}{fmt_bytes(p.mem_process):>13}"
                     f"{fmt_bytes(p.mem_node):>11}{fmt_bytes(p.disk):>11}{fmt_bytes(p.network):>11}"
                     f"{fmt_time(p.seconds):>10}")
    total = sum(p.seconds for p in plans)
    lines.append(f"{'total':<38}{'':>13}{'':>11}{fmt_bytes(sum(p.disk for p in plans)):>11}"
                 f"{fmt_bytes(sum(p.network for p in plans)):>11}{fmt_time(total):>10}")
    lines.append("notes:")
    lines += [f"  {p.stage}: {n}" for p in plans for n in p.notes]
    lines.append("assumptions (not measured on this machine): " + "; ".join(
        f"{k} = {c.value:g} {c.unit}" for k, c in COSTS.items() if c.source.startswith("ASSUMPTION")))
    return "\n".join(lines)


def default_cluster(nodes: int | None, gpus: int | None, cpus: int | None, mem_gb: float | None) -> Cluster:
    """The cluster of the command line; what is not given is this machine's."""
    import os

    here_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Cluster(nodes=nodes or 1, gpus_per_node=gpus or 0, cpus_per_node=cpus or os.cpu_count() or 1,
                   mem_per_node_gb=mem_gb or round(here_mem, 1))


def plan_command(cfg: Config, args) -> str:
    """`curate plan`: the table for the command line's records, cluster and --dim NAME=D settings."""
    dims = {}
    for spec in args.dim:
        name, _, value = spec.partition("=")
        if not name or not value.isdigit():
            raise ValueError(f"--dim takes NAME=D with D a positive integer, got {spec!r}")
        dims[name] = int(value)
    cluster = default_cluster(args.nodes, args.gpus_per_node, args.cpus_per_node, args.mem_per_node)
    eval_images = getattr(args, "eval_images", None) or EVAL_IMAGES
    return format_plan(plan(cfg, args.records, cluster, dims, eval_images), args.records, cluster)
