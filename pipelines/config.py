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


@dataclass
class IngestConfig:
    """Reading, checking and copying the raw inputs."""

    sources: list[str] = field(default_factory=list)  # folders, URL lists (.txt/.csv/.tsv/.parquet), tars
    part_size: int = 1000            # inputs per part (one records part + one raw shard each)
    workers: int = 0                 # processes over parts; 0 = one per CPU core
    min_side: int = 32               # shorter side below this -> too_small
    max_pixels: int = 178_956_970    # width x height above this -> too_many_pixels (bomb guard)
    max_file_bytes: int = 64 * 2**20  # files above this -> too_large


@dataclass
class HashDedupConfig:
    """Exact (sha256) and perceptual (pHash) duplicates."""

    exact: bool = True
    phash_max_distance: int = 4      # Hamming distance on 64-bit pHash; < 0 disables (bench/phash_threshold.py)


@dataclass
class EmbedConfig:
    """Embedding with a vision model (see pipelines/embedders.py for the spec forms)."""

    model: str = "pixels:16"         # pixels[:side] | timm:<name>[:file] | open_clip:<arch>[:tag|file] | torchscript:<file>[:side] | checkpoint:<file>
    name: Optional[str] = None       # embedding name under <workdir>/embed/; default: a slug of the model spec
    batch_size: int = 64
    num_workers: int = 1             # DataLoader processes decoding and preprocessing
    device: str = "auto"             # auto = cuda when available
    precision: str = "auto"          # auto = bf16 autocast on CUDA, fp32 on CPU; fp32 | bf16 | fp16
    threads: int = 0                 # torch threads on CPU; 0 = all cores
    ray_actors: int = 0              # with executor=ray: 0 = one actor per GPU, or one per CPU without GPUs
    ray_gpus_per_actor: Optional[float] = None  # null = 1 when the cluster has GPUs, else 0


@dataclass
class ShardsConfig:
    """Curated webdataset shards."""

    out: Optional[str] = None        # default: <workdir>/shards
    max_size: int = 512 * 2**20      # bytes per shard
    max_count: int = 10_000          # samples per shard
    shuffle_seed: Optional[int] = 0  # null keeps id order
    select: Optional[str] = None     # extra boolean column that must be true ("column" or "stage:column")


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
    shards: ShardsConfig = field(default_factory=ShardsConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a YAML file, then `key.sub=value` overrides; unknown keys raise."""
    merged = OmegaConf.structured(Config)
    if path:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the workdir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object or dataclass."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
