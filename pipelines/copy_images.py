"""Images behind embedding rows, for the copy stages: decoded by seek from the raw shards (for local
verification, content hashes and calibration), and the pool calibration of a copy threshold. Content
hashes and verification run as jobs (Ray tasks with executor ray) that read only the ingest parts
holding their rows."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.parts import read_table
from pipelines.aligned import RowMap
from pipelines.config import Config
from pipelines.framework import stage_dir


class ShardImages:
    """Decoded images of an ingest directory's rows (row r of `rows`), read by seek; use as a context."""

    def __init__(self, ingest_dir: str | Path, rows: np.ndarray | None = None) -> None:
        from curate.tars import TarReader

        columns = ["raw_shard", "raw_offset", "nbytes"]
        table = read_table(ingest_dir, columns) if rows is None else _rows_of(ingest_dir, rows, columns)
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


def _rows_of(ingest_dir: str | Path, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Columns of the given global ingest rows (any order), reading only the parts that hold them."""
    layout = RowMap(ingest_dir)  # the parts and their first global rows (from Parquet metadata)
    parts, offsets = layout.parts, layout.offsets
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= offsets[-1]):
        raise IndexError(f"ingest rows out of range 0..{offsets[-1] - 1} in {ingest_dir}")
    part = np.searchsorted(offsets, rows, side="right") - 1
    pieces, where = [], []
    for k in np.unique(part):
        sel = np.flatnonzero(part == k)
        pieces.append(pq.read_table(parts[k], columns=columns).take(pa.array(rows[sel] - offsets[k])))
        where.append(sel)
    if not pieces:
        return pq.read_table(parts[0], columns=columns).slice(0, 0) if parts else pa.table({c: [] for c in columns})
    table = pa.concat_tables(pieces, promote_options="permissive")
    return table.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


HASH_ROWS_PER_JOB = 4096  # pool images decoded and hashed per job (a Ray task with executor ray)
VERIFY_PAIRS_PER_JOB = 2048  # candidate pairs verified per Ray task


def hash_rows(ingest_dir: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """ShardImages.content_hashes of the given global ingest rows (one job)."""
    with ShardImages(ingest_dir, rows) as images:
        return images.content_hashes()


def content_hashes(ingest_dir: str | Path, rows: np.ndarray, mapper=None,
                   rows_per_job: int = HASH_ROWS_PER_JOB) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Content and mirrored pHashes of the images at global ingest rows `rows`, which decoded, and the
    seconds spent (summed over jobs): jobs of consecutive rows, run by `mapper` (a curate Mapper: Ray
    tasks with executor ray) or here, one after the other; the same values either way."""
    from curate.parts import map_in_order

    rows = np.asarray(rows, dtype=np.int64)
    jobs = [(rows[lo:lo + rows_per_job],) for lo in range(0, len(rows), rows_per_job)]
    out = map_in_order(mapper, hash_rows, jobs, (str(ingest_dir),))
    if not out:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, bool), 0.0
    return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
            np.concatenate([o[2] for o in out]), float(sum(o[3] for o in out)))


def verify_job(ingest_dirs: tuple[str, ...], settings, used: np.ndarray, source: np.ndarray,
               ingest_rows: np.ndarray, i: np.ndarray, j: np.ndarray):
    """verify_pairs on pairs of rows (i, j), with the image of row used[t] (sorted, covering every row of
    the pairs) read from global ingest row ingest_rows[t] of ingest_dirs[source[t]] (one job)."""
    from contextlib import ExitStack

    from curate.verify import verify_pairs

    pos = np.zeros(len(used), dtype=np.int64)  # position of each used row among its source's rows
    for k in range(len(ingest_dirs)):
        pos[source == k] = np.arange(int((source == k).sum()))
    with ExitStack() as stack:
        images = [stack.enter_context(ShardImages(d, ingest_rows[source == k])) for k, d in enumerate(ingest_dirs)]

        def load(r: int) -> Image.Image:
            t = int(np.searchsorted(used, r))
            return images[source[t]].load(int(pos[t]))

        return verify_pairs(i, j, load, settings)


def verify_image_pairs(sources: list[tuple[str | Path, np.ndarray]], i: np.ndarray, j: np.ndarray, settings,
                       mapper=None, pairs_per_job: int = VERIFY_PAIRS_PER_JOB):
    """Local verification of candidate pairs (i, j) of rows numbered over `sources` one after the other:
    source k = (ingest dir, the global ingest row of each of its rows); e.g. the pool (its embedding's
    ingest rows), then an evaluation set. Without a mapper, one job over all pairs here (one feature
    cache); with one (Ray tasks), the pairs sorted by (min row, max row) and cut into jobs of
    pairs_per_job. Verdicts are the same either way (`curate.verify.merge_results`); only
    features_computed and timings differ."""
    from curate.parts import map_in_order
    from curate.verify import merge_results, verify_pairs

    rows = [np.asarray(r, dtype=np.int64) for _, r in sources]
    all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    source = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r in rows])
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    a, b = np.minimum(i, j), np.maximum(i, j)
    if not len(a):  # no pairs: an empty result with the usual stats
        return verify_pairs(a, b, lambda r: None, settings)
    order = np.lexsort((b, a))
    size = len(order) if mapper is None else max(pairs_per_job, 1)
    jobs = []
    for lo in range(0, len(order), size):
        sel = order[lo:lo + size]
        used = np.union1d(a[sel], b[sel])
        jobs.append((used, source[used], all_rows[used], a[sel], b[sel]))
    return merge_results(map_in_order(mapper, verify_job, jobs, (tuple(str(d) for d, _ in sources), settings)), order)


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
    ingest = stage_dir(cfg, "ingest")
    with ShardImages(ingest, RowMap(ingest, emb_dir).emb_rows[chosen]) as images:  # the sample's rows only
        originals = [images.load(k) for k in range(len(chosen))]
    return originals, make_calibration_set(originals, seed=0)
