"""The figures `curate plan` works from: per-item costs (each with the bench command and figure it
comes from, or marked ASSUMPTION where nothing on this machine measures it, e.g. GPU throughput),
known embedders' dimensions, the cluster description and the per-stage result type.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PlanRefused(ValueError):
    """The config cannot run at this size on this cluster; the message names the key."""


@dataclass(frozen=True)
class Cost:
    """One per-item figure and its source."""

    value: float
    unit: str
    source: str


_SCALE = "python bench/scale.py --records 1000000 (RESULTS 'Plan and scale'; CPU time, RSS above a ~200 MB process)"
_CAL = "python bench/scale.py --calibrate (one thread, CPU time)"
_SCALE10 = "bench/scale.py at 1M and 10M records, the slope (RESULTS 'Plan and scale')"
HASH_RATES_OK = 9.8e6  # ok records of the runs hashdedup_s and hashdedup_ray_s were measured on
COSTS: dict[str, Cost] = {
    "ingest_s": Cost(1 / 1348, "core-s per image", "RESULTS 'Folder ingest vs bare decode': 1,348 img/s, one "
                     "process, 512x384 JPEG (python bench/ingest.py --n 2000 --size 512x384 --repeat 3)"),
    "ingest_rss": Cost(196 * 2**20, "bytes per worker", "RESULTS 'Ingest': peak RSS 196 MiB at 100k files "
                       "(python bench/ingest.py --n 3000 --rss 10000,100000)"),
    "ingest_plan_bytes": Cost(20, "driver bytes per input (the planner's count of names seen)", "python "
                              "bench/ingest.py --plan-rss 1000000,4000000 (10% repeated URLs): peak RSS 221 MB "
                              "and 281 MB, the slope (RESULTS 'Every stage on Ray')"),
    "image_bytes": Cost(110e3, "bytes per image", "ASSUMPTION: mean size of a web JPEG (not measured here)"),
    "record_bytes": Cost(80, "bytes per record on disk", f"{_SCALE}: 80 MB of ingest parts"),
    "net_bytes_s": Cost(1.25e9, "bytes/s per node", "ASSUMPTION: 10 Gbit/s per node to the internet and between nodes"),
    "ok_share": Cost(0.85, "of inputs", "ASSUMPTION: web downloads that arrive and decode"),
    "hash_dup_share": Cost(0.05, "of ok records", "ASSUMPTION: exact and pHash duplicates of a web pool"),
    "copy_dup_share": Cost(0.10, "of embedded records", "ASSUMPTION: embedding copies (DINOv2 removed a similar share)"),
    "hashdedup_s": Cost(66e-6, "driver s per ok record", f"{_SCALE10}: 644 CPU-s for 9.8M ok records (58.8 for "
                        "0.98M; bands spilled to disk, each record searched in the 5 pHash bands of its bit fields)"),
    "hashdedup_ray_s": Cost(1.37e-4, "core-s per ok record with executor ray (maps, band reduces, writes)",
                            "python bench/scale.py --records 10000000 --stages hashdedup --ray-address A (ray start, "
                            "2 CPUs): 672.6 s wall for 9.8M ok records (37.5 s for 0.98M: 7.6e-5; pHash candidates "
                            "grow faster than the records, so more records cost more per record)"),
    "phash_shared_s": Cost(2.47e-10, "core-s per ok record, per pHash field, per record sharing its field value "
                           "beyond the 9.8M-record runs above", "python bench/scale.py --calibrate-bands: pHash bands "
                           "of 250k and 1M records sharing 4 values of their field, 31.3 and 77.6 us per record "
                           "(one thread): the slope against 62.5k and 250k records per value"),
    "hashdedup_node_bytes": Cost(785, "bytes per linked record in a hash dedup bucket job (as dedup_node_bytes, "
                                 "with its pHash and sha256 and its keeper's)", "python bench/scale.py "
                                 "--calibrate-dedup: 781.2 B at 200k and at 1M linked records, one bucket"),
    "hashdedup_band_record_bytes": Cost(370, "task bytes per band record with executor ray (its chunks from the "
                                        "maps, its search and links)", "python bench/scale.py --calibrate-bands: a "
                                        "sha256 band 368.7 B per record at 250k and 1M records, a pHash band whose "
                                        "records share 4 values of its field 112.9 and 100.5 B (numpy/Python and "
                                        "Arrow peaks plus the input chunks)"),
    "hashdedup_band_bytes": Cost(150 * 2**20, "driver bytes (one band of 250k records, the 64 MB spill buffer)",
                                 f"{_SCALE10}: the intercept of peak RSS 356 MB at 0.98M and 411 MB at 9.8M ok "
                                 "records, above base_rss"),
    "embed_gpu_img_s": Cost(800, "img/s per GPU (ViT-L/14, 224 px, bf16)", "ASSUMPTION, not measured (no GPU "
                            "here): 155 GFLOP per image at 40% of an A100's 312 TFLOP/s bf16"),
    "embed_cpu_vits_img_s": Cost(6.3, "img/s per core (ViT-S/14)", "RESULTS 'Embedding stage': 12.6 img/s on 2 "
                                 "cores (python bench/embed.py --n 192 --models vits14)"),
    "embed_decode_img_s": Cost(820, "img/s per core (decode and preprocess only)", "RESULTS 'Embedding stage': "
                               "pixels:16 at 1,641 img/s on 2 cores (python bench/embed.py --n 3000 --models pixels)"),
    "embed_actor_bytes": Cost(4 * 2**30, "bytes per actor", "ASSUMPTION: model, DataLoader workers, batches"),
    "gpu_flops": Cost(15e12, "FLOP/s per GPU (fp32 search, GEMM)", "ASSUMPTION, not measured: ~75% of an A100's "
                      "19.5 TFLOP/s fp32"),
    "gpu_mem": Cost(80 * 2**30, "bytes per GPU", "ASSUMPTION: an 80 GB A100 or H100"),
    "cpu_flops": Cost(55e9, "FLOP/s per core (faiss flat search)", f"{_CAL}: 54.7-56.9 GFLOP/s at k = 4096"),
    "pp_flops": Cost(8e9, "FLOP/s per core (k-means++ in numpy)", f"{_CAL}: 7.5-9.3 GFLOP/s"),
    "pp_ray_step_s": Cost(4.7e-3, "s per k-means++ step with its shards on Ray actors (2 gloo collectives among "
                          "them)", "PYTHONPATH=. python bench/kmeans_pp.py --rounds 2, per_step: 4.7 ms per step "
                          "with the actors running the loop, 8.7 ms with the loop on the driver (2 round trips a step; "
                          "7.8 ms in session 23, quiet); local Ray, 2 actors, 2 cores, a training run beside "
                          "(RESULTS 'k-means++ shards on GPUs, the loop on the actors')"),
    "ray_call_s": Cost(4.4e-3, "s per driver-to-actors call and answer (a few actors, small arrays)",
                       "PYTHONPATH=. python bench/kmeans_pp.py --rounds 2, per_step: the driver loop's 8.7 ms per "
                       "step is two such calls (local Ray, 2 actors, 2 cores)"),
    "kmeans_rec_s": Cost(2.5e-8, "core-s per record and dimension per pass (read, sums)", f"{_CAL}: 2.0-2.9e-8"),
    "ivf_scan_s": Cost(1.2e-9, "core-s per scanned vector-dimension (IVF k-NN)", f"{_SCALE}: dedup 112 CPU-s, "
                       "~70 of them scanning 6e10 vector-dimensions (the rest training, adding, components)"),
    "flat_scan_s": Cost(2.4e-11, "core-s per query, indexed vector and dimension (flat k-NN, k = 16)",
                        f"{_CAL}: 2.44-2.45e-11 at 20k x 256; faiss IndexFlatIP self-search, 2 threads, CPU time: "
                        "2.28e-11 at 40k x 768 (with OpenBLAS's AVX-512 kernel, curate.blas; its generic fallback "
                        "took 0.85-1.08e-10; ivf_scan_s is 50x this: the flat search runs in BLAS blocks)"),
    "dedup_valid_bytes": Cost(1, "bytes per record (which rows may form edges; in each index holder under Ray, "
                              "in the driver otherwise)", "the bool mask curate.dedup.valid_rows holds (bench/scale.py dedup: RESULTS 'Copy dedup over the "
                              "records with an edge')"),
    "dedup_node_bytes": Cost(355, "bytes per record with an edge in a copy-graph bucket job (adjacency, labels, "
                             "ids, the groups and members tables, the ids' uniqueness check)", "python bench/scale.py "
                             "--calibrate-dedup: 354.4 B per node at 200k and at 1M nodes in one bucket, "
                             "numpy/Python and Arrow peaks added (26-character ids, groups of two); the driver held 320 "
                             "and 223 B per node before the buckets (group_edges)"),
    "dedup_node_s": Cost(5.0e-6, "core-s per record with an edge (every bucket job's round)", "python bench/scale.py "
                         "--calibrate-dedup: 4.6 and 5.0 us per node at 200k and 1M nodes, one bucket, traced "
                         "(load 2.4)"),
    "dedup_rounds": Cost(32, "label rounds of the copy graph (build and spread/hook pairs)", "python bench/scale.py "
                         "--calibrate-rounds: a chain of 1,000 records (max_component; a larger component warns) in "
                         "random row order takes 32 (rows rising along it 22, a random tree 20, a pair 2; 1M records: "
                         "58, 42, 26); the graph's worst component sets the count"),
    "dedup_round_node_s": Cost(0.54e-6, "core-s per record with an edge per label round past a pair's",
                               "python bench/scale.py --calibrate-rounds: a chain of 1M records in random row order, 4 "
                               "buckets, local calls, 58 rounds in 33.2 CPU-s, against 3.1 for 500k pairs (2 rounds)"),
    "verify_pair_s": Cost(0.08, "core-s per candidate pair verified by local features (dedup.verify local)",
                          "RESULTS 'Copy detection a user can trust': 52-110 ms per pair including the feature "
                          "extraction, 2 feature sets per image (cd bench && python copy_real.py --seeds 0 1 2 "
                          "--sources photos --grid 4)"),
    "balance_s": Cost(3.2e-6, "core-s per record (four passes over the cluster parts)", f"{_SCALE10}: 30.7 and "
                      "31.6 CPU-s for 9.7M records, local executor (RESULTS 'Balance streamed over parts')"),
    "balance_bytes": Cost(1, "driver bytes per record (O(clusters): leaf sizes, cut-offs, histograms)",
                          f"{_SCALE10}: balance 251-255 MB at 0.96M, 257-261 MB at 9.7M records with N/1,000 leaves "
                          "(94 B per record before it was streamed)"),
    "cluster_bytes": Cost(8, "driver bytes per record (none held: labels per chunk on disk; the slope bounds it)",
                          f"{_SCALE10}: cluster 268 MB at 0.96M, 338 MB at 9.7M records (70 B per record before "
                          "labels, distances and row maps left the driver)"),
    "plan_s": Cost(18e-6, "driver s per selected record (shard plan, written)", f"{_SCALE10}: 89 CPU-s for "
                   "5M selected (12.4 for 0.5M; 121 in another 5M run under more load)"),
    "plan_range_bytes": Cost(260 * 2**20, "driver bytes (shard plan: one range of 262,144 samples)",
                             f"{_SCALE10}: the intercept of peak RSS 470 MB at 0.5M, 553 MB at 5M selected, "
                             "above base_rss"),
    "plan_bytes": Cost(19, "driver bytes per selected record (shard plan: the shuffle, allocator growth)",
                       f"{_SCALE10}: the slope of the same two runs (1,540 B before the plan was streamed)"),
    "shards_bytes_s": Cost(370e6, "bytes/s per process", "RESULTS 'Curated shards vs an fsynced copy': 370 MB/s "
                           "(python bench/shards.py --n 1000 --size 768)"),
    "base_rss": Cost(200 * 2**20, "bytes per Python process", f"{_SCALE}: the smallest stage processes, 185-262 MB"),
}

# Embedding dimension and forward cost relative to ViT-L/14 of known model specs (substring match).
MODELS = [("vit_giant", 1536, 4.5), ("vitg", 1536, 4.5), ("vit_large", 1024, 1.0), ("vitl", 1024, 1.0),
          ("vit_base", 768, 0.28), ("vitb", 768, 0.28), ("vit_small", 384, 0.075), ("vits", 384, 0.075),
          ("sscd", 512, 0.15), ("pixels", 768, 0.0), ("colorhist", 512, 0.0)]
UNKNOWN_DIM = 1024


@dataclass(frozen=True)
class Cluster:
    """The machines: nodes, GPUs, cores and memory (GB = 2**30 bytes) per node."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 2
    mem_per_node_gb: float = 24.0

    @property
    def mem(self) -> float:
        """Bytes of memory per node."""
        return self.mem_per_node_gb * 2**30


@dataclass
class StagePlan:
    """One stage's estimate."""

    stage: str
    where: str  # "cluster" (spread over the nodes) or "driver" (one process)
    mem_process: float  # peak bytes of the largest process
    mem_node: float  # peak bytes on the busiest node
    disk: float  # bytes written
    network: float  # bytes moved in from the internet or between nodes
    seconds: float
    records: int  # records the stage reads
    notes: list[str] = field(default_factory=list)


def model_info(spec: str | None) -> tuple[int, float, bool]:
    """(dim, forward cost relative to ViT-L/14, known) of an embedder spec."""
    text = (spec or "").lower()
    for key, dim, rel in MODELS:
        if key in text:
            arg = text.rsplit(":", 1)[1] if ":" in text else ""
            if key == "pixels" and arg.isdigit():
                dim = 3 * int(arg) ** 2
            if key == "colorhist" and arg.isdigit():
                dim = int(arg) ** 3
            return dim, rel, True
    return UNKNOWN_DIM, 1.0, False


def cost(name: str) -> float:
    """The value of COSTS[name]."""
    return COSTS[name].value


def dense_rate(cluster: Cluster, spread: bool) -> tuple[float, str]:
    """Dense FLOP/s available and what provides it: all GPUs (or cores) of the cluster, or of one node."""
    nodes = cluster.nodes if spread else 1
    if cluster.gpus_per_node:
        return nodes * cluster.gpus_per_node * cost("gpu_flops"), f"{nodes * cluster.gpus_per_node} GPU(s)"
    return nodes * cluster.cpus_per_node * cost("cpu_flops"), f"{nodes * cluster.cpus_per_node} core(s)"


def fmt_bytes(b: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b / 1024:.0f} KB"


def fmt_time(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"
