"""Images behind embedding rows, for the copy stages: decoded by seek from the raw shards (for local
verification, content hashes and calibration), and the pool calibration of a copy threshold."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.parts import read_table
from pipelines.aligned import RowMap
from pipelines.config import Config
from pipelines.framework import stage_dir


class ShardImages:
    """Decoded images of an ingest directory's rows (row r of `rows`), read by seek; use as a context."""

    def __init__(self, ingest_dir: str | Path, rows: np.ndarray | None = None) -> None:
        from curate.tars import TarReader

        table = read_table(ingest_dir, ["raw_shard", "raw_offset", "nbytes"])
        if rows is not None:
            table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        self.shard = table.column("raw_shard").to_pylist()
        self.offset = table.column("raw_offset").to_pylist()
        self.nbytes = table.column("nbytes").to_pylist()
        self.reader = TarReader(ingest_dir)

    def __len__(self) -> int:
        return len(self.shard)

    def __enter__(self) -> "ShardImages":
        self.reader.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.reader.__exit__(*exc)

    def load(self, r: int) -> Image.Image:
        """RGB image of row r (EXIF orientation applied); raises on bytes that do not decode."""
        from PIL import ImageOps

        from curate.images import to_rgb

        if self.shard[r] is None:
            raise ValueError("no stored bytes")
        with Image.open(io.BytesIO(self.reader.read(self.shard[r], self.offset[r], self.nbytes[r]))) as img:
            return to_rgb(ImageOps.exif_transpose(img)).copy()

    def content_hashes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """pHash of every row's content (flat borders trimmed) and of its mirror, which rows decoded,
        and the seconds spent: candidate hashes that find padded and mirrored copies."""
        from curate.hashing import phash_u64
        from curate.verify import trim_borders

        n = len(self)
        ph, mirror, ok = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool)
        t0 = time.perf_counter()
        for r in range(n):
            try:
                img = trim_borders(self.load(r))
            except Exception:  # noqa: BLE001 - an undecodable row is left out of hash candidates
                continue
            ph[r], mirror[r], ok[r] = phash_u64(img), phash_u64(img.transpose(Image.FLIP_LEFT_RIGHT)), True
        return ph, mirror, ok, time.perf_counter() - t0


def verify_mode(cfg: Config) -> str:
    """"local" or "none": dedup.verify, where auto is local unless the embedding is a copy descriptor."""
    mode = cfg.dedup.verify
    if mode not in ("auto", "local", "none"):
        raise ValueError(f"dedup.verify must be auto, local or none, got {mode!r}")
    return ("none" if cfg.dedup.copy_descriptor else "local") if mode == "auto" else mode


def verify_settings(cfg: Config):
    """curate.verify settings from the dedup config."""
    from curate.verify import VerifySettings

    return VerifySettings(max_side=cfg.dedup.verify_max_side, max_features=cfg.dedup.verify_max_features)


def pool_images(cfg: Config, emb_dir: Path) -> ShardImages:
    """The pool images behind the rows of the embedding in emb_dir."""
    return ShardImages(stage_dir(cfg, "ingest"), RowMap(stage_dir(cfg, "ingest"), emb_dir).emb_rows)


def embedder_fn(cfg: Config, model: str):
    """The embedding model as images -> L2-normalised float32 [n, d] (batched, cfg.embed device/precision)."""
    import torch

    from curate.embed import autocast, resolve_device
    from pipelines.embedding import load_embedder

    device = resolve_device(cfg.embed.device)
    emb = load_embedder(model, device)

    def embed(images: list) -> np.ndarray:
        out = []
        with torch.inference_mode(), autocast(device, cfg.embed.precision):
            for s in range(0, len(images), cfg.embed.batch_size):
                x = torch.stack([emb.transform(im) for im in images[s:s + cfg.embed.batch_size]]).to(device)
                out.append(torch.nn.functional.normalize(emb.model(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    return embed


def calibration_sample(cfg: Config, emb_dir: Path, valid: np.ndarray) -> tuple[list, list]:
    """A seeded sample of cfg.dedup.calibrate_sample valid pool images and their edited copies."""
    from curate.calibrate import make_calibration_set

    ok = np.flatnonzero(valid)
    rng = np.random.default_rng(0)
    chosen = np.sort(ok[rng.choice(len(ok), min(cfg.dedup.calibrate_sample, len(ok)), replace=False)])
    with pool_images(cfg, emb_dir) as images:
        originals = [images.load(int(r)) for r in chosen]
    return originals, make_calibration_set(originals, seed=0)
