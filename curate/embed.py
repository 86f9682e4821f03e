"""Embedding stage: decode raw-shard images in DataLoader workers, run a model in batches, write
float16 L2-normalised parts row-aligned with a Parquet part of ids and statuses.

Output, per ingest part k: `part-k.npy` (float16 [n, dim]) and `part-k.parquet` (id, status,
error). A sample that fails to decode keeps its row, with a zero vector and a reason, so ids and
vectors stay aligned and the run never stops for one bad file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from curate.images import to_rgb
from curate.parts import atomic_path, part_name, write_table_atomic
from curate.tars import TarReader


@dataclass(frozen=True)
class EmbedSettings:
    """Batching and device settings (defaults are sensible on CPU and GPU)."""

    batch_size: int = 64
    num_workers: int = 1      # DataLoader processes decoding and preprocessing
    device: str = "auto"      # auto = cuda when available
    precision: str = "auto"   # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    threads: int = 0          # torch intra-op threads on CPU; 0 = all cores (decoding is cheap next to a ViT forward)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RawImages(torch.utils.data.Dataset):
    """Images read by offset from raw shards and preprocessed; failures become (zeros, reason)."""

    def __init__(self, root: str | os.PathLike, rows: Sequence[dict], transform: Callable, shape: tuple[int, ...]):
        self.root, self.rows, self.transform, self.shape = str(root), list(rows), transform, shape
        self._reader: TarReader | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if self._reader is None:
            self._reader = TarReader(self.root)
        r = self.rows[i]
        try:
            data = self._reader.read(r["raw_shard"], r["raw_offset"], r["nbytes"])
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = to_rgb(img)
            x = self.transform(rgb)
            if tuple(x.shape) != self.shape:
                raise ValueError(f"transform gave shape {tuple(x.shape)}, expected {self.shape}")
            return x, ""
        except Exception as exc:  # one bad sample must not stop the run
            return torch.zeros(self.shape), f"{type(exc).__name__}: {exc}"[:200]


def autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _loader(dataset: RawImages, settings: EmbedSettings, device: torch.device,
            part_sizes: Sequence[int]) -> torch.utils.data.DataLoader:
    """Batches restart at every part boundary, so a part gets the same batches whether it is embedded
    alone (a resumed run, a Ray actor) or among others (bit-identical results on any device)."""
    batches, start = [], 0
    for size in part_sizes:
        batches += [list(range(b, min(b + settings.batch_size, start + size)))
                    for b in range(start, start + size, settings.batch_size)]
        start += size
    workers = settings.num_workers if len(dataset) else 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=device.type == "cuda")


def _setup(settings: EmbedSettings) -> torch.device:
    device = resolve_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    return device


def _batches(rows: Sequence[dict], raw_root: str | os.PathLike, model: torch.nn.Module, transform: Callable,
             settings: EmbedSettings, device: torch.device, part_sizes: Sequence[int] | None = None):
    """Yield (float16 vectors, errors) per batch, in row order."""
    probe = transform(Image.new("RGB", (64, 48)))
    dataset = RawImages(raw_root, rows, transform, tuple(probe.shape))
    loader = _loader(dataset, settings, device, part_sizes if part_sizes is not None else [len(rows)])
    channels_last = device.type == "cuda" and probe.dim() == 3
    with torch.inference_mode(), autocast(device, settings.precision):
        for x, errs in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = torch.nn.functional.normalize(model(x).float(), dim=-1)
            feats[torch.tensor([bool(e) for e in errs], device=feats.device)] = 0.0
            yield feats.cpu().numpy().astype(np.float16), list(errs)


def embed_rows(rows: Sequence[dict], raw_root: str | os.PathLike, model: torch.nn.Module, transform: Callable,
               dim: int, settings: EmbedSettings = EmbedSettings()) -> tuple[np.ndarray, list[str]]:
    """Embed the images of `rows` (raw_shard, raw_offset, nbytes); returns float16 [n, dim] and errors."""
    device = _setup(settings)
    chunks, errors = [np.zeros((0, dim), dtype=np.float16)], []
    for vecs, errs in _batches(rows, raw_root, model, transform, settings, device):
        chunks.append(vecs)
        errors.extend(errs)
    return np.concatenate(chunks), errors


def embed_parts(jobs: Sequence[tuple[int, list[dict]]], raw_root: str | os.PathLike, out_dir: str | os.PathLike,
                model: torch.nn.Module, transform: Callable, dim: int, settings: EmbedSettings = EmbedSettings(),
                on_part: Callable[[int, int], None] | None = None) -> int:
    """Embed several parts through one DataLoader (workers start once); each part is written when
    its last row is done. Returns the number of failed samples."""
    device = _setup(settings)
    flat = [r for _, rows in jobs for r in rows]
    queue = list(jobs)[::-1]
    failed = 0
    vec_buf: list[np.ndarray] = [np.zeros((0, dim), dtype=np.float16)]
    err_buf: list[str] = []

    def write_ready() -> None:
        nonlocal vec_buf, err_buf, failed
        while queue and len(err_buf) >= len(queue[-1][1]):
            k, rows = queue.pop()
            n = len(rows)
            vecs = np.concatenate(vec_buf)
            write_part(out_dir, k, [r["id"] for r in rows], vecs[:n], err_buf[:n])
            failed += sum(1 for e in err_buf[:n] if e)
            vec_buf, err_buf = [vecs[n:]], err_buf[n:]
            if on_part:
                on_part(k, n)

    write_ready()
    for vecs, errs in _batches(flat, raw_root, model, transform, settings, device, [len(r) for _, r in jobs]):
        vec_buf.append(vecs)
        err_buf.extend(errs)
        write_ready()
    return failed


def write_part(out_dir: str | os.PathLike, index: int, ids: Sequence[str], vectors: np.ndarray,
               errors: Sequence[str]) -> None:
    """Write one embedding part: the .npy first, then the .parquet that marks it done."""
    out = Path(out_dir)
    if len(ids) != len(vectors) or len(ids) != len(errors):
        raise ValueError("ids, vectors and errors must have one row each")
    with atomic_path(out / part_name(index).replace(".parquet", ".npy")) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float16))
    table = pa.table({"id": pa.array(list(ids), type=pa.string()),
                      "status": pa.array(["embed_error" if e else "ok" for e in errors], type=pa.string()),
                      "error": pa.array([e or None for e in errors], type=pa.string())})
    write_table_atomic(table, out / part_name(index))


def part_done(out_dir: str | os.PathLike, index: int) -> bool:
    """A part is done when its Parquet (written after its .npy) exists."""
    return (Path(out_dir) / part_name(index)).exists()
