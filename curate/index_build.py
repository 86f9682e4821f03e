"""Building blocks of the vector index: memory-mapped embedding parts, the index spec, memory
estimates and the rules that turn "auto" settings into concrete ones.

`curate.index` re-exports everything public here; import from there.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

PART_RE = re.compile(r"^part-(\d{5,})\.npy$")
KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
AUTO_FLAT_MAX_N = 200_000  # auto: exact flat search below this many vectors, IVF at or above
LARGE_ESTIMATE_BYTES = 1 << 30  # estimates above this are reported before a build
DEFAULT_CHUNK_BYTES = 64 << 20  # float32 bytes per chunk handed out by EmbeddingParts.chunks
MIN_TRAIN_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid
TRAIN_PER_LIST = 40  # auto train_size: this many sampled vectors per IVF list
MAX_AUTO_TRAIN = 1_000_000  # auto train_size never exceeds this


class MemoryBudgetError(RuntimeError):
    """The index would need more memory than IndexSpec.memory_budget_bytes allows."""


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
            named = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PART_RE.match(p.name))]
            self.paths = [p for _, p in sorted(named)]
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
        n = min(max(int(n), 0), self.n)
        if n == self.n:
            return np.arange(self.n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.n, size=n, replace=False)).astype(np.int64)

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


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read from its header only."""
    arr = np.load(path, mmap_mode="r")
    return arr.shape, arr.dtype


def default_chunk_rows(dim: int) -> int:
    """Rows per chunk so that one float32 chunk is about DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(dim, 1)))


@dataclass(frozen=True)
class IndexSpec:
    """What index to build and how to search it; None fields are chosen from n and dim.

    The metric is always the inner product (the cosine, as the embeddings are L2-normalised).
    """

    kind: str = "auto"  # "auto" | "flat" | "ivf_flat" | "ivf_pq" | "hnsw" (see resolve_spec)
    nlist: int | None = None  # IVF lists; None: round(4 * sqrt(n)), at most n // 39, at least 1
    nprobe: int | None = None  # IVF lists visited per query; None: see auto_nprobe
    pq_m: int | None = None  # PQ sub-quantizers (must divide dim); None: largest divisor in dim/32..dim/4 that fits
    pq_bits: int = 8  # bits per PQ code
    hnsw_m: int = 32  # HNSW links per node
    ef_search: int = 64  # HNSW search breadth
    ef_construction: int = 80  # HNSW construction breadth
    train_size: int | None = None  # vectors sampled to train IVF/PQ; None: 40 per list (and PQ's need)
    metric: str = "ip"  # only inner product is supported
    use_gpu: bool | None = None  # None: use a faiss GPU when one is there
    memory_budget_bytes: int | None = None  # None: no limit
    seed: int = 0  # training sample and k-means seed
    deterministic: bool = True  # HNSW: single-threaded add, the only way its graph is reproducible
    auto_flat_max_n: int = AUTO_FLAT_MAX_N

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.metric not in ("ip", "inner_product", "cosine"):
            raise ValueError(f"only the inner-product metric is supported, got {self.metric!r}")
        for name in ("nlist", "nprobe", "pq_m", "train_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must be in 1..16, got {self.pq_bits}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IndexSpec:
        """Inverse of to_dict; unknown keys are ignored (files written by newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def auto_nlist(n: int) -> int:
    """Default IVF list count: round(4 * sqrt(n)), capped so every list gets >= 39 training points."""
    return max(1, min(round(4 * math.sqrt(max(n, 1))), n // MIN_TRAIN_PER_LIST))


def auto_nprobe(nlist: int) -> int:
    """Default lists visited per query: nlist / 64, at least 16 (or nlist when smaller)."""
    return min(nlist, max(16, math.ceil(nlist / 64)))


def _pq_m_candidates(dim: int) -> list[int]:
    """Divisors of dim from dim/4 down to dim/32 (coarser codes are useless), largest first."""
    divisors = [m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0]
    return [m for m in divisors if m >= dim // 32] or divisors


def _concrete(spec: IndexSpec, kind: str, n: int, dim: int) -> IndexSpec:
    """spec with `kind` and every None sizing field filled in (no budget check)."""
    nlist = spec.nlist or auto_nlist(n)
    nlist = min(nlist, max(n, 1))
    pq_m = spec.pq_m
    if kind == "ivf_pq" and pq_m is None:
        pq_m = _pq_m_candidates(dim)[0]
        if spec.memory_budget_bytes is not None:
            for m in _pq_m_candidates(dim):
                pq_m = m
                if _estimate(replace(spec, kind=kind, nlist=nlist, pq_m=m), n, dim) <= spec.memory_budget_bytes:
                    break
    train = spec.train_size
    if train is None:
        need = TRAIN_PER_LIST * nlist
        if kind == "ivf_pq":
            need = max(need, MIN_TRAIN_PER_LIST * 2**spec.pq_bits)
        train = min(n, max(need, 1), MAX_AUTO_TRAIN)
    ivf = kind in ("ivf_flat", "ivf_pq")
    return replace(
        spec,
        kind=kind,
        nlist=nlist if ivf else None,
        nprobe=min(spec.nprobe or auto_nprobe(nlist), nlist) if ivf else None,
        pq_m=pq_m if kind == "ivf_pq" else None,
        train_size=min(train, max(n, 1)) if ivf else None,
    )


def _estimate(spec: IndexSpec, n: int, dim: int) -> int:
    """Index bytes for a concrete spec (see estimate_memory)."""
    vectors = n * dim * 4
    if spec.kind == "flat":
        return vectors
    if spec.kind == "hnsw":
        # level 0 holds 2*M links per node, upper levels about M/(M-1) more; plus offsets and levels
        links = 2 * spec.hnsw_m + math.ceil(spec.hnsw_m / max(spec.hnsw_m - 1, 1))
        return vectors + n * (links * 4 + 8 + 4)
    centroids = (spec.nlist or 1) * dim * 4
    if spec.kind == "ivf_flat":
        return vectors + n * 8 + centroids
    if spec.kind == "ivf_pq":
        code = math.ceil((spec.pq_m or 1) * spec.pq_bits / 8)
        codebooks = dim * 2**spec.pq_bits * 4
        return n * (code + 8) + codebooks + centroids
    raise ValueError(f"no memory estimate for kind {spec.kind!r}")


def estimate_memory(spec: IndexSpec, n: int, dim: int) -> int:
    """Approximate bytes the index holds for n x dim vectors ("auto" resolved first; the
    transient training sample is not counted). flat n*d*4; ivf_flat + n*8 ids + centroids;
    ivf_pq n*(code+8) + codebooks + centroids; hnsw n*d*4 + ~n*(2M+1)*4 links."""
    return _estimate(resolve_spec(spec, n, dim, check_budget=False), n, dim)


def _budget_error(spec: IndexSpec, n: int, dim: int, estimate: int) -> MemoryBudgetError:
    hint = (
        "lower pq_m or pq_bits, reduce the embedding dimension, or raise memory_budget_bytes"
        if spec.kind == "ivf_pq"
        else "use kind='ivf_pq' (or 'auto'), reduce the embedding dimension, or raise memory_budget_bytes"
    )
    what = f"ivf_pq (pq_m={spec.pq_m}, pq_bits={spec.pq_bits})" if spec.kind == "ivf_pq" else spec.kind
    return MemoryBudgetError(
        f"the {what} index of {n:,} x {dim} vectors needs about {format_bytes(estimate)} "
        f"({estimate:,} bytes), over the memory budget of {format_bytes(spec.memory_budget_bytes or 0)} "
        f"({spec.memory_budget_bytes:,} bytes); {hint}"
    )


def resolve_spec(spec: IndexSpec, n: int, dim: int, check_budget: bool = True) -> IndexSpec:
    """Concrete spec for n x dim: auto is flat below auto_flat_max_n rows, else ivf_flat, and
    ivf_pq when that is over memory_budget_bytes; None sizes chosen. MemoryBudgetError when the
    result is still over budget."""
    kind = spec.kind
    budget = spec.memory_budget_bytes
    if kind == "auto":
        kind = "flat" if n < spec.auto_flat_max_n else "ivf_flat"
        if budget is not None and _estimate(_concrete(spec, kind, n, dim), n, dim) > budget:
            kind = "ivf_pq"
    out = _concrete(spec, kind, n, dim)
    if kind in ("ivf_flat", "ivf_pq") and out.train_size < out.nlist:
        raise ValueError(f"train_size={out.train_size} is below nlist={out.nlist}; raise train_size or lower nlist")
    if kind == "ivf_pq":
        if dim % out.pq_m:
            raise ValueError(f"pq_m={out.pq_m} must divide the dimension {dim}")
        if out.train_size < 2**out.pq_bits:
            raise ValueError(
                f"ivf_pq with pq_bits={out.pq_bits} needs at least {2**out.pq_bits} training vectors, "
                f"got {out.train_size}; lower pq_bits or use kind='flat'"
            )
    if check_budget and budget is not None:
        estimate = _estimate(out, n, dim)
        if estimate > budget:
            raise _budget_error(out, n, dim, estimate)
    return out


def format_bytes(nbytes: int) -> str:
    """Human-readable size (GiB / MiB / KiB / B)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
