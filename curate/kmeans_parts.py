"""Per-point k-means state held part by part, so that a driver holds O(parts + clusters), not O(points).

`Assignment`: the labels (int32) and squared distances (float32) of every point of a level, one pair
per part, in memory or as `labels-XXXXX.npy` / `dists-XXXXX.npy` files in a directory (written by the
process that ran the part's pass, a Ray task or this one). `PartVectors`: float16 embedding parts
(memory-mapped per read), each optionally restricted to some of its rows (positions in a .npy file),
seen as one matrix with parts. `sample_per_cluster_parts`: the resampling draw of
`kmeans_tree.sample_per_cluster`, the same rows, read part by part with O(clusters x size) state.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from curate.parts import atomic_path


def _name(kind: str, i: int) -> str:
    return f"{kind}-{i:05d}.npy"


def mapped_base(a: np.ndarray) -> np.memmap | None:
    """The np.memmap an array is (or views), None for an array in memory."""
    while a is not None and not isinstance(a, np.memmap):
        a = getattr(a, "base", None)
        if not isinstance(a, np.ndarray):
            return None
    return a


def drop_pages(a: np.ndarray) -> None:
    """Unmap the file pages of a memory-mapped part just read (the page cache keeps them), so
    that the resident set stays about one chunk instead of growing to the whole file."""
    mm = getattr(mapped_base(a), "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


WRITE_ROWS = 1 << 16  # rows of a memory-mapped array copied per write


def npy_header(fh, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The .npy header of a C-order array of this shape and dtype (its bytes follow)."""
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": tuple(shape)})


def write_npy(fh, array: np.ndarray) -> None:
    """np.save, except that a memory-mapped array is copied WRITE_ROWS rows at a time with its pages dropped
    after each (the resident set stays a block, not the file: level 1's centroids are 41 GB at paper scale)."""
    if mapped_base(array) is None or array.ndim == 0:
        np.save(fh, array)
        return
    npy_header(fh, array.shape, array.dtype)
    for a in range(0, len(array), WRITE_ROWS):
        fh.write(np.ascontiguousarray(array[a : a + WRITE_ROWS]).tobytes())
        drop_pages(array)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save through a temporary file and an atomic rename (a reader never sees half a file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write_npy(fh, array)


def save_rows_npy(path: str | os.PathLike, take, rows: np.ndarray, dim: int) -> None:
    """The float32 rows `take(rows[a:b])` gives, WRITE_ROWS at a time, as one .npy written atomically (e.g. a
    resampling refit's points for Ray tasks to read: the writer holds one block, not the sample)."""
    rows = np.asarray(rows, dtype=np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        npy_header(fh, (len(rows), int(dim)), np.dtype(np.float32))
        for a in range(0, len(rows), WRITE_ROWS):
            fh.write(np.ascontiguousarray(take(rows[a : a + WRITE_ROWS]), dtype=np.float32).tobytes())


def write_assignment_part(directory: str | os.PathLike, i: int, labels: np.ndarray, dists: np.ndarray) -> None:
    """Part i of an Assignment directory: labels (int32) and squared distances (float32), each atomically."""
    d = Path(directory)
    save_npy_atomic(d / _name("dists", i), np.asarray(dists, dtype=np.float32))
    save_npy_atomic(d / _name("labels", i), np.asarray(labels, dtype=np.int32))


def read_assignment_part(directory: str | os.PathLike, i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, squared distances) of part i of an Assignment directory (empty arrays for an empty part)."""
    if size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    d = Path(directory)
    labels, dists = np.load(d / _name("labels", i)), np.load(d / _name("dists", i))
    if len(labels) != size or len(dists) != size:
        raise ValueError(f"{d} part {i}: {len(labels)} labels, {len(dists)} distances, expected {size}")
    return labels, dists


class Assignment:
    """Labels and squared distances of every point, per part (sizes), in memory or in a directory."""

    def __init__(self, sizes: Sequence[int] | np.ndarray, directory: str | os.PathLike | None = None) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dir = Path(directory) if directory is not None else None
        self._mem: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of_arrays(cls, labels: np.ndarray, dists: np.ndarray) -> Assignment:
        """One in-memory part holding the given arrays."""
        out = cls([len(labels)])
        out.put(0, labels, dists)
        return out

    def put(self, i: int, labels: np.ndarray, dists: np.ndarray) -> None:
        """Store part i (written atomically when the assignment lives in a directory)."""
        if len(labels) != self.sizes[i] or len(dists) != self.sizes[i]:
            raise ValueError(f"part {i} holds {self.sizes[i]} points, got {len(labels)} labels, {len(dists)} distances")
        if self.dir is None:
            self._mem[i] = (np.asarray(labels, dtype=np.int32), np.asarray(dists, dtype=np.float32))
        else:
            write_assignment_part(self.dir, i, labels, dists)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, squared distances) of part i."""
        if self.dir is None or self.sizes[i] == 0:
            return self._mem[i] if self.sizes[i] else read_assignment_part(None, i, 0)
        return read_assignment_part(self.dir, i, int(self.sizes[i]))

    def range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, squared distances) of global rows [start, stop), read from the parts that hold them."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        got = []
        for i in range(max(first, 0), len(self.sizes)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            if hi > start:
                labels, dists = self.get(i)
                a, b = max(start, lo) - lo, min(stop, hi) - lo
                got.append((labels[a:b], dists[a:b]))
        if not got:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])

    def complete(self) -> bool:
        """Whether every non-empty part is there."""
        return all(self.sizes[i] == 0 or (i in self._mem if self.dir is None else
                                          (self.dir / _name("labels", i)).exists()
                                          and (self.dir / _name("dists", i)).exists())
                   for i in range(len(self.sizes)))

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(part, first global row, labels, dists) of every part, in order."""
        for i in range(len(self.sizes)):
            yield (i, int(self.offsets[i]), *self.get(i))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All labels and distances as two arrays (O(points): for in-memory callers)."""
        if len(self.sizes) == 1:
            return self.get(0)
        got = [self.get(i) for i in range(len(self.sizes))]
        return (np.concatenate([g[0] for g in got]) if got else np.zeros(0, np.int32),
                np.concatenate([g[1] for g in got]) if got else np.zeros(0, np.float32))

    def counts(self, k: int) -> np.ndarray:
        """Points per cluster (int64 [k])."""
        total = np.zeros(k, dtype=np.int64)
        for _, _, labels, _ in self:
            total += np.bincount(labels, minlength=k)
        return total


class PartedRows:
    """Parts seen as one matrix, in order: rows, chunks and take over `part_rows`; subclasses set dim,
    n and offsets (first global row of each part, then n)."""

    dim: int
    n: int
    offsets: np.ndarray

    def part_rows(self, i: int, a: int = 0, b: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 copies of part i's rows [a, b) (or of its rows `rows`, part-local), in order."""
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Global rows [start, stop) as a new float32 array (may span parts)."""
        start, stop = max(0, start), min(self.n, stop)
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        for i in range(len(self.offsets) - 1):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            a0, a1 = max(start, lo), min(stop, hi)
            if a0 < a1:
                out[a0 - start : a1 - start] = self.part_rows(i, a0 - lo, a1 - lo)
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, float32 block) covering every row once, in order."""
        if size < 1:
            raise ValueError("chunk size must be at least 1")
        for start in range(0, self.n, size):
            yield start, self.rows(start, min(self.n, start + size))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of the given global rows, in the order given (each part read once)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        bounds = np.searchsorted(srt, self.offsets)
        for i in range(len(self.offsets) - 1):
            b0, b1 = int(bounds[i]), int(bounds[i + 1])
            if b0 < b1:
                out[order[b0:b1]] = self.part_rows(i, rows=srt[b0:b1] - self.offsets[i])
        return out


class PartVectors(PartedRows):
    """float16 (or float32) .npy parts, each optionally restricted to the rows listed in a .npy of positions,
    seen as one matrix whose parts are those rows. Every read memory-maps the files it needs and lets go of
    them, so the resident set is one read, not the files."""

    def __init__(self, paths: Sequence[str | os.PathLike], positions: Sequence[str | os.PathLike | None] | None = None,
                 sizes: Sequence[int] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.positions = [None if p is None else Path(p) for p in (positions or [None] * len(self.paths))]
        if len(self.positions) != len(self.paths):
            raise ValueError("one positions file (or None) per part")
        if not self.paths:
            raise ValueError("PartVectors needs at least one part")
        shapes = [np.load(p, mmap_mode="r").shape for p in self.paths]
        dims = {int(s[1]) for s in shapes}
        if len(dims) != 1:
            raise ValueError(f"parts disagree on the dimension: {sorted(dims)}")
        self.dim: int = dims.pop()
        if sizes is None:
            sizes = [s[0] if q is None else len(np.load(q, mmap_mode="r")) for s, q in zip(shapes, self.positions)]
        self.part_sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.part_sizes)]).astype(np.int64)
        self.n: int = int(self.offsets[-1])

    def part_rows(self, i: int, a: int = 0, b: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 copies of part i's rows [a, b) (or of its rows `rows`, part-local), in order."""
        sel = np.arange(a, int(self.part_sizes[i]) if b is None else b) if rows is None else np.asarray(rows)
        x = np.load(self.paths[i], mmap_mode="r")
        if self.positions[i] is not None:
            sel = np.load(self.positions[i], mmap_mode="r")[sel]
        if rows is None and self.positions[i] is None:
            return np.asarray(x[a:b], dtype=np.float32)
        return np.asarray(x[np.asarray(sel, dtype=np.int64)], dtype=np.float32)


def chunk_sizes(n: int, chunk_size: int) -> np.ndarray:
    """The layout of a level's Assignment: one part per chunk of `chunk_size` rows that a pass reads (the last
    one shorter), so that every process that runs a chunk, here or in a Ray task, writes exactly its part."""
    if chunk_size < 1:
        raise ValueError("chunk size must be at least 1")
    sizes = np.full(n // chunk_size, chunk_size, dtype=np.int64)
    return np.append(sizes, n % chunk_size) if n % chunk_size else sizes


def sample_per_cluster_parts(assignment: Assignment, k: int, size: int, sampling: str,
                             rng: np.random.Generator | None) -> np.ndarray:
    """Sorted rows of up to `size` points per cluster, the closest ('c') or those of the smallest random key
    ('r': rng.random per point, drawn in row order), ties by row: the rows `sample_per_cluster` picks, read
    part by part with at most k x size candidates held."""
    if sampling not in ("c", "r"):
        raise ValueError(f"unknown sampling {sampling!r} (c | r)")
    keep_key = np.zeros(0, dtype=np.float32 if sampling == "c" else np.float64)
    keep_row = np.zeros(0, dtype=np.int64)
    keep_label = np.zeros(0, dtype=np.int32)
    for _, offset, labels, dists in assignment:
        key = dists if sampling == "c" else rng.random(len(labels))
        keys = np.concatenate([keep_key, key.astype(keep_key.dtype, copy=False)])
        rows = np.concatenate([keep_row, np.arange(offset, offset + len(labels), dtype=np.int64)])
        labs = np.concatenate([keep_label, np.asarray(labels, dtype=np.int32)])
        order = np.lexsort((rows, keys, labs))
        counts = np.bincount(labs, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        kept = order[np.arange(len(order)) - starts[labs[order]] < size]
        keep_key, keep_row, keep_label = keys[kept], rows[kept], labs[kept]
    return np.sort(keep_row)


def complement_rows(taken: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The positions-th integers (0-based) of [0, n) that are not in `taken` (sorted, unique), without
    listing that complement: what np.setdiff1d(np.arange(n), taken)[positions] gives."""
    shifted = np.asarray(taken, dtype=np.int64) - np.arange(len(taken), dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    return positions + np.searchsorted(shifted, positions, side="right")
