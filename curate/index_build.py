"""Building blocks of the vector index: the index spec, memory estimates and the rules that turn
"auto" settings into concrete ones (the embedding reader lives in curate/vectors.py).

`curate.index` re-exports everything public here; import from there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace


from curate.vectors import EmbeddingParts, default_chunk_rows  # noqa: F401 (re-exported)

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
AUTO_FLAT_MAX_N = 200_000  # auto: exact flat search below this many vectors, IVF at or above
LARGE_ESTIMATE_BYTES = 1 << 30  # estimates above this are reported before a build
MIN_TRAIN_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid
TRAIN_PER_LIST = 40  # auto train_size: this many sampled vectors per IVF list
MAX_AUTO_TRAIN = 1_000_000  # auto train_size never exceeds this


class MemoryBudgetError(RuntimeError):
    """The index would need more memory than IndexSpec.memory_budget_bytes allows."""


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
