"""Configuration: OmegaConf structured configs (a typo in a key is an error) with overrides."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf


@dataclass
class DownloadConfig:
    """HTTP downloads of URL-list sources."""

    timeout: float = 10.0            # seconds per request (connect and read)
    retries: int = 3                 # retries on timeouts, connection errors, 5xx (never on 4xx)
    backoff: float = 0.5             # first retry delay; doubled on each retry
    backoff_max: float = 8.0
    max_bytes: int = 32 * 2**20      # larger bodies are dropped as too_large
    max_redirects: int = 5
    respect_noai: bool = True        # honour X-Robots-Tag: noai / noimageai
    concurrency: int = 32            # download threads per worker process
    user_agent: str = "dinocurate/0.1 (+image curation)"
    deadline: float = 120.0          # seconds for one URL in all: attempts, redirects, backoff and body


@dataclass
class IngestConfig:
    """Reading, checking and copying the raw inputs."""

    sources: list[str] = field(default_factory=list)  # folders, URL lists (.txt/.csv/.tsv/.parquet), tars
    part_size: int = 1000            # inputs per part (one records part + one raw shard each)
    workers: int = 0                 # processes over parts; 0 = one per CPU core
    min_side: int = 32               # shorter side below this -> too_small
    max_pixels: int = 178_956_970    # width x height above this -> too_many_pixels (bomb guard)
    max_file_bytes: int = 64 * 2**20  # files above this -> too_large
    phash_exact: bool = False        # true: full decode, imagehash-identical pHash (~3.5x slower ingest); default:
                                     # pHash of a draft-mode reduction (bench/RESULTS.md "Ingest speed (issue 16)")
    lowinfo: bool = True             # statuses blank / noise for low-information images (curate/lowinfo.py)
    lowinfo_min_std: float = 2.0     # pixel std (max over R, G, B; 0-255) below this -> blank
    lowinfo_max_flat: float = 0.98   # share of pixels near the most common colour at or above this -> blank
    lowinfo_min_corr: float = 0.2    # lag-1 luminance correlation of neighbours below this -> noise


@dataclass
class HashDedupConfig:
    """Exact (sha256) and perceptual (pHash) duplicates."""

    exact: bool = True
    phash_max_distance: int = 4      # Hamming distance on 64-bit pHash; < 0 disables (bench/phash_threshold.py)
    bucket_records: int = 4_000_000  # rows per job of the linked records' components (whole ingest parts); memory
                                     # per job, never the result


@dataclass
class EmbedConfig:
    """Embedding with a vision model (see curate/embedders.py for the spec forms)."""

    model: str = "pixels:16"         # pixels[:side] | timm:<name>[:file] | open_clip:<arch>[:tag|file] | torchscript:<file>[:side] | checkpoint:<file> | bootstrap[:<trainer config>]
    name: Optional[str] = None       # embedding name under <workdir>/embed/; default: a slug of the model spec
    batch_size: int = 64
    num_workers: int = 1             # DataLoader processes decoding and preprocessing
    device: str = "auto"             # auto = cuda when available
    precision: str = "auto"          # auto = bf16 autocast on CUDA, fp32 on CPU; fp32 | bf16 | fp16
    threads: int = 0                 # torch threads on CPU; 0 = all cores
    ray_actors: int = 0              # with executor=ray: 0 = one actor per GPU, or one per CPU without GPUs
    ray_gpus_per_actor: Optional[float] = None  # null = 1 when the cluster has GPUs, else 0
    # model `bootstrap[:<trainer config>]`: train our own small DINOv2 ViT on a sample of the pool
    bootstrap_sample: int = 20000    # images drawn (seeded) from the ok, non-duplicate records to train on
    bootstrap_overrides: list = field(default_factory=list)  # trainer key=value overrides, e.g. optim.iterations=500


@dataclass
class DedupConfig:
    """Copy detection: local verification of candidate pairs (no weights needed) or, for a declared
    copy descriptor, DINOv2's k-NN graph (k = 64, cosine > threshold); then components, one keeper."""

    embedding: Optional[str] = None  # embedding name (default: the only/configured one); a copy descriptor is best
    k: int = 64                      # neighbours per image in the k-NN graph
    threshold: Optional[float] = None  # cosine for copies; null (`--threshold auto`): 0.6 for a declared copy
                                     # descriptor, else calibrated on the pool (recorded in the manifest)
    copy_descriptor: bool = False    # the embedding is a trained copy descriptor (SSCD-style): its cosine decides
    verify: str = "auto"             # local | none | auto (local unless copy_descriptor): local features + RANSAC
    candidate_k: int = 10            # embedding neighbours per image that local verification looks at
    candidate_cosine: float = 0.5    # ... above this cosine
    candidate_phash: int = 16        # and pHash neighbours (content and mirrored) within this Hamming distance
    max_pairs_per_image: int = 20    # candidates verified per image (the best ranked): bounds the cost
    verify_max_side: int = 512       # longer side of the images local features are computed on
    verify_max_features: int = 600   # SIFT keypoints kept per image
    max_component_share: float = 0.01  # refuse (nothing committed) when the largest component holds more of the pool
    max_removed_share: float = 0.3   # ... or when more of the pool would be removed
    max_component: int = 1000        # warn when a component grows larger (a threshold that chains)
    bucket_records: int = 4_000_000  # rows per job of the copy graph's components (whole ingest parts); memory per
                                     # job, never the result: the driver holds O(buckets)
    index: str = "auto"              # auto | flat | ivf_flat | ivf_pq | hnsw
    nprobe: Optional[int] = None     # IVF lists searched (null = the index module's conservative default)
    calibrate_sample: int = 300      # pool images edited for `curate dedup --calibrate` and --threshold auto
    target_precision: float = 0.95   # precision the calibration recommends a threshold for


@dataclass
class EvalSetConfig:
    """An evaluation set whose copies must leave the pool."""

    name: str = "eval"
    source: str = ""                 # folder, URL list or tar


@dataclass
class DecontamConfig:
    """Evaluation-set decontamination (DINOv2: cosine > 0.45, whole duplicate component); with
    dedup.verify local, pool/evaluation pairs above candidate_cosine are verified by local features."""

    threshold: float = 0.45
    candidate_cosine: float = 0.3    # embedding candidates for local verification (looser than dedup's)
    eval_sets: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class LevelConfig:
    """One level of the hierarchical k-means (level 1 is the finest, fitted on the embeddings)."""

    n_clusters: int = 100
    n_iters: int = 20
    resampling_steps: int = 0        # fits in all, the first one included (reference n_resampling_steps): each next
                                     # refits on sample_size points drawn per cluster; 0 or 1 = no resampling
    sample_size: int = 0
    sampling: str = "c"              # c: closest to the centroid | r: random
    init: str = "kmeans++"           # kmeans++ | random
    split: int = 0                   # > 0: k-means with `split` clusters, then k-means inside each
    split_assign: str = "global"     # split mode: global (reassign every point to all clusters) | within (each point
                                     # keeps its sub-cluster in its split: the reference's mode, for k in the millions)


@dataclass
class ClusterConfig:
    """Hierarchical k-means over one embedding (Vo et al. 2024)."""

    embedding: Optional[str] = None  # embedding name under <workdir>/embed/ (default: the embed stage's)
    levels: list[LevelConfig] = field(default_factory=lambda: [LevelConfig(100), LevelConfig(10)])
    seed: int = 0
    chunk_size: int = 65536          # rows per assignment chunk (memory-mapped float16 -> float32)
    pp_shard_rows: int = 262144      # k-means++ sample rows per shard (curate/kmeans_pp.py): up to this many, one
                                     # shard; more shards spread the seeding over Ray actors (the shards decide
                                     # the draws, so a change redoes the stage)
    ray_gpus_per_task: Optional[float] = None  # with executor=ray, GPUs per Lloyd-pass task (one chunk each);
                                     # null = 1 when the cluster has GPUs, else 0 (a task asking none sees none)


@dataclass
class SeedSetConfig:
    """A curated seed set for retrieval (DINOv2's retrieval-based augmentation)."""

    name: str = "seeds"
    source: str = ""                 # folder, URL list or tar of the seed images
    n_per_seed: int = 4              # sample-based mode: nearest pool images per seed image
    max_images: Optional[int] = None  # cap of retrieved images for this set (cluster mode)


@dataclass
class BalanceConfig:
    """Balanced sampling over the cluster tree, plus retrieval from seed sets."""

    target: int = 0                  # images to select; 0 = no balanced sampling (retrieval only)
    strategy: str = "r"              # r: random inside a leaf | c: closest to the centroid first
    multiplier: int = 1              # > 1 allows repeats (target may exceed the pool)
    levels: str = "auto"             # tree levels balanced over: auto (structured ones) | all | N (levels 1..N)
    min_explained: float = 0.7       # auto: keep a level while it explains >= this of the variance below
    seed: int = 0
    seeds: list[SeedSetConfig] = field(default_factory=list)
    seed_cluster_max: int = 10000    # seed sets up to this size use cluster-based retrieval
    seed_min_per_cluster: int = 3    # cluster mode: a pool cluster needs more seeds than this
    seed_per_cluster: int = 1000     # cluster mode: pool images a qualifying cluster contributes


@dataclass
class ShardsConfig:
    """Curated webdataset shards."""

    out: Optional[str] = None        # default: <workdir>/shards
    max_size: int = 512 * 2**20      # bytes per shard
    max_count: int = 10_000          # samples per shard
    shuffle_seed: Optional[int] = 0  # null keeps id order
    select: Optional[str] = None     # extra boolean column that must be true ("column" or "stage:column")


@dataclass
class TrainStageConfig:
    """Training on the curated shards at the end of `curate run` (off unless `config` is set)."""

    config: Optional[str] = None     # trainer config: tiny | vits14 | vitb14 | vitl14 | vitg14 | a YAML path
    overrides: list[str] = field(default_factory=list)  # trainer key=value overrides
    output_dir: Optional[str] = None  # default <workdir>/train
    eval_train: Optional[str] = None  # labelled folder root/<class>/<img>: the k-NN bank
    eval_test: Optional[str] = None   # labelled folder with the same classes: the k-NN queries
    ks: list[int] = field(default_factory=lambda: [10, 20])
    probe_steps: int = 100           # linear-probe optimisation steps
    nproc: int = 1                   # local training processes (DDP/FSDP ranks, gloo on CPU, NCCL on GPUs)


@dataclass
class Config:
    """The whole pipeline's settings."""

    workdir: str = "work"
    executor: str = "local"          # local | ray
    ray_address: Optional[str] = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    hashdedup: HashDedupConfig = field(default_factory=HashDedupConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    extra_embeds: list[EmbedConfig] = field(default_factory=list)  # more named embeddings (e.g. copy + semantic)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a YAML file, then `key.sub=value` overrides; unknown keys raise."""
    merged = OmegaConf.structured(Config)
    if path:
        loaded = _load_mapping(path)
        try:
            merged = OmegaConf.merge(merged, loaded)
        except TypeError as exc:  # OmegaConf names no key when a list meets a mapping
            where = _shape_mismatch(OmegaConf.to_container(merged), OmegaConf.to_container(loaded))
            raise ValueError(f"config {path}: {where or f'a list where a mapping is expected, or the reverse ({exc})'}") from None
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


def _load_mapping(path: str | Path) -> Any:
    """A YAML config file as an OmegaConf mapping; ValueError when its document is not a mapping."""
    try:
        loaded = OmegaConf.load(path)
    except OSError as exc:
        if Path(path).is_file():  # OmegaConf's error for a scalar document
            raise ValueError(f"config {path}: expected a mapping of sections (key: value), got a scalar") from None
        raise FileNotFoundError(f"config file not found: {path}") from exc
    if not OmegaConf.is_dict(loaded):
        raise ValueError(f"config {path}: expected a mapping of sections (key: value), got a list")
    return loaded


def _shape_mismatch(schema: Any, given: Any, prefix: str = "") -> str | None:
    """'<dotted key> must be a list, not a mapping' (or the reverse) for the first such place in `given`."""
    if not isinstance(schema, dict) or not isinstance(given, dict):
        return None
    for key, value in given.items():
        if key not in schema:
            continue
        want, name = schema[key], f"{prefix}{key}"
        for a, b in ((want, value), (value, want)):
            if isinstance(a, dict) and isinstance(b, list):
                return f"{name} must be a {'mapping' if a is want else 'list'}, not a {'list' if a is want else 'mapping'}"
        found = _shape_mismatch(want, value, f"{name}.")
        if found:
            return found
    return None


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the workdir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object or dataclass."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_pipeline_config(path: str) -> bool:
    """A pipeline config (curate, then train) rather than a trainer config."""
    import os

    if not os.path.isfile(path):
        return False
    try:
        keys = set(_load_mapping(path).keys())
    except (ValueError, OSError):
        return False
    return bool(keys & {"workdir", "ingest", "embed", "balance", "shards"})
