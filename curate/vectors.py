"""The one reader of embeddings: ordered float16 parts (`part-XXXXX.npy`, memory-mapped) seen as one
n x dim matrix, read as float32 a chunk or a set of rows at a time, never loaded whole. Used by the
index, k-means, copy detection, balancing and seed retrieval.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from curate.parts import list_parts

DEFAULT_CHUNK_BYTES = 64 << 20  # float32 bytes per chunk handed out by EmbeddingParts.chunks


class EmbeddingParts:
    """Ordered float16 embedding parts seen as one n x dim matrix, read only when asked for.

    `source`: a directory of part-XXXXX.npy files (memory-mapped, in part order) or 2-D arrays.
    """

    def __init__(self, source: str | os.PathLike | np.ndarray | Sequence[np.ndarray]) -> None:
        self.paths: list[Path] = []
        self._arrays: list[np.ndarray] | None = None
        if isinstance(source, (str, os.PathLike)):
            directory = Path(source)
            if not directory.is_dir():
                raise FileNotFoundError(f"embedding directory not found: {directory}")
            self.paths = list_parts(directory, ".npy")
            if not self.paths:
                raise FileNotFoundError(f"no part-XXXXX.npy embedding files in {directory}")
            shapes = [_npy_shape(p) for p in self.paths]
        else:
            arrays = [source] if isinstance(source, np.ndarray) else list(source)
            if not arrays:
                raise ValueError("EmbeddingParts needs at least one array")
            self._arrays = arrays
            shapes = [(a.shape, a.dtype) for a in arrays]
        dims = set()
        for i, (shape, dtype) in enumerate(shapes):
            if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
                raise ValueError(f"embedding part {self._name(i)} must be a 2-D float array, got {shape} {dtype}")
            dims.add(int(shape[1]))
        if len(dims) != 1:
            raise ValueError(f"embedding parts disagree on the dimension: {sorted(dims)}")
        self.dim: int = dims.pop()
        self.sizes = np.array([s[0] for s, _ in shapes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n: int = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def _name(self, i: int) -> str:
        return str(self.paths[i]) if self.paths else f"#{i}"

    def part(self, i: int) -> np.ndarray:
        """Part i as stored (a read-only memory map for files), not converted."""
        if self._arrays is not None:
            return self._arrays[i]
        return np.load(self.paths[i], mmap_mode="r")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Global rows [start, stop) as a new float32 array (may span several parts)."""
        start, stop = max(0, start), min(self.n, stop)
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        for i in range(max(first, 0), len(self.sizes)):
            if pos >= stop:
                break
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi <= pos:
                continue
            take = min(hi, stop) - pos
            out[pos - start : pos - start + take] = self.part(i)[pos - lo : pos - lo + take]
            pos += take
        return out

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_row, float32 rows) covering every row once, in order, chunk_rows at a time."""
        step = chunk_rows or default_chunk_rows(self.dim)
        if step < 1:
            raise ValueError("chunk_rows must be at least 1")
        for start in range(0, self.n, step):
            yield start, self.rows(start, start + step)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.chunks()

    def sample_ids(self, n: int, seed: int) -> np.ndarray:
        """Sorted global row numbers of a deterministic uniform sample of min(n, self.n) rows."""
        return _sample_ids(self.n, n, seed)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """float32 rows of sample_ids(n, seed), in row order, read part by part (not all loaded)."""
        return self.take(self.sample_ids(n, seed))

    def take(self, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """Copies of the given global rows (any order, repeats allowed), each part read once."""
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(uniq), self.dim), dtype=dtype)
        owner = np.searchsorted(self.offsets, uniq, side="right") - 1
        bounds = np.searchsorted(owner, np.arange(len(self.sizes) + 1), side="left")
        for i in range(len(self.sizes)):
            a, b = int(bounds[i]), int(bounds[i + 1])
            if a < b:
                out[a:b] = self.part(i)[uniq[a:b] - self.offsets[i]]
        return out[inverse.reshape(-1)]


    def subset(self, rows: np.ndarray) -> RowSubset:
        """The given global rows (sorted, unique) seen as a matrix of their own, read lazily."""
        return RowSubset(self, rows)


class RowSubset:
    """Some rows of an EmbeddingParts (e.g. the valid ones) with the same reading interface."""

    def __init__(self, base: EmbeddingParts, rows: np.ndarray) -> None:
        self.base, self.row_ids = base, np.asarray(rows, dtype=np.int64)
        self.n, self.dim = len(self.row_ids), base.dim

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Subset rows [start, stop) as float32."""
        return self.base.take(self.row_ids[max(0, start):min(self.n, stop)])

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_row, float32 rows) over the subset, in order."""
        step = chunk_rows or default_chunk_rows(self.dim)
        for start in range(0, self.n, step):
            yield start, self.rows(start, start + step)

    def take(self, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """Copies of the given subset rows (any order, repeats allowed)."""
        return self.base.take(self.row_ids[np.asarray(rows, dtype=np.int64)], dtype)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """float32 rows of a deterministic uniform sample of min(n, self.n) subset rows (as EmbeddingParts.sample
        of the same rows held in memory)."""
        return self.take(_sample_ids(self.n, n, seed))


def _sample_ids(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a deterministic uniform sample of min(n, total) of `total` rows."""
    n = min(max(int(n), 0), total)
    if n == total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read from its header only."""
    arr = np.load(path, mmap_mode="r")
    return arr.shape, arr.dtype


def default_chunk_rows(dim: int) -> int:
    """Rows per chunk so that one float32 chunk is about DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(dim, 1)))
