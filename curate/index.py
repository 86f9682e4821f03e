"""Vector index over the embedding parts: build (flat, IVF-Flat, IVF-PQ, HNSW), k-NN and range
search, save/load. Rows are identified by their global row number in part order.

Similarity is the inner product, i.e. the cosine for the L2-normalised embeddings (and queries).
A faiss GPU is used when asked for or, by default, when one is there; everything works on CPU.
On CPU the same inputs, spec and seed give the same index and results on every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from curate.index_build import (
    AUTO_FLAT_MAX_N,
    KINDS,
    LARGE_ESTIMATE_BYTES,
    EmbeddingParts,
    IndexSpec,
    MemoryBudgetError,
    auto_nlist,
    auto_nprobe,
    estimate_memory,
    format_bytes,
    resolve_spec,
)
from curate.vectors import RowSubset

__all__ = [
    "AUTO_FLAT_MAX_N",
    "KINDS",
    "EmbeddingParts",
    "IndexSpec",
    "MemoryBudgetError",
    "VectorIndex",
    "auto_nlist",
    "auto_nprobe",
    "build_index",
    "estimate_memory",
    "gpu_available",
    "resolve_spec",
]

GPU_MAX_K = 2048  # faiss GPU limit on k and nprobe; beyond it the search runs on the CPU copy
FORMAT_VERSION = 1
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"curate.index: {message}", file=sys.stderr, flush=True)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _want_gpu(spec: IndexSpec, log: Log) -> bool:
    """Whether to put this index on a GPU: spec.use_gpu, None meaning "if one is there"."""
    if spec.kind == "hnsw":
        if spec.use_gpu:
            log("faiss has no GPU HNSW index; using the CPU")
        return False
    available = gpu_available()
    if spec.use_gpu and not available:
        log("GPU requested but faiss sees none (or is the CPU build); using the CPU")
    return available if spec.use_gpu is None else bool(spec.use_gpu and available)


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, object]:
    """Clone index onto GPU 0; returns the GPU index and the resources that must outlive it."""
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index, faiss.GpuClonerOptions()), resources


@contextlib.contextmanager
def _omp_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` OpenMP threads in faiss (None: unchanged)."""
    previous = faiss.omp_get_max_threads()
    if count is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """Empty (untrained) CPU faiss index for a resolved spec."""
    ip = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, ip)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if spec.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, spec.pq_bits, ip)
        index.pq.cp.seed = spec.seed
    index.cp.seed = spec.seed
    index.cp.spherical = True  # unit-norm centroids: the right k-means for cosine similarity
    return index


def _fill(index: faiss.Index, parts: EmbeddingParts | RowSubset, spec: IndexSpec, chunk_rows: int | None) -> None:
    """Train index on the deterministic sample (if it needs training), then add every row in order."""
    if not index.is_trained:
        index.train(parts.sample(spec.train_size or parts.n, spec.seed))
    single = spec.kind == "hnsw" and spec.deterministic
    with _omp_threads(1 if single else None):
        for _, chunk in parts.chunks(chunk_rows):
            index.add(chunk)


def build_index(
    data: EmbeddingParts | RowSubset | str | os.PathLike | np.ndarray | Sequence[np.ndarray],
    spec: IndexSpec | None = None,
    *,
    chunk_rows: int | None = None,
    log: Log | None = None,
) -> VectorIndex:
    """Index every row of `data` (parts directory, EmbeddingParts, a RowSubset of one, or arrays): train IVF/PQ on a
    seeded sample, add chunk by chunk from the memory maps (an HNSW graph depends on chunk_rows).
    Raises MemoryBudgetError before any work."""
    log = log or _stderr
    parts = data if isinstance(data, (EmbeddingParts, RowSubset)) else EmbeddingParts(data)
    if parts.n == 0:
        raise ValueError("no embeddings to index (0 rows)")
    spec = resolve_spec(spec or IndexSpec(), parts.n, parts.dim)
    estimate = estimate_memory(spec, parts.n, parts.dim)
    if estimate > LARGE_ESTIMATE_BYTES:
        log(f"{spec.kind} index of {parts.n:,} x {parts.dim} will take about {format_bytes(estimate)}")
    if _want_gpu(spec, log):
        try:
            gpu, resources = _to_gpu(_new_index(spec, parts.dim))
            if hasattr(gpu, "cp"):
                gpu.cp.seed = spec.seed
                gpu.cp.spherical = True
            _fill(gpu, parts, spec, chunk_rows)
            return VectorIndex(None, spec, gpu=gpu, gpu_resources=resources)
        except (RuntimeError, AttributeError) as exc:
            log(f"GPU build failed ({exc}); building on the CPU instead")
    index = _new_index(spec, parts.dim)
    _fill(index, parts, spec, chunk_rows)
    return VectorIndex(index, spec)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file saved next to an index file (`<path>.json`)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class VectorIndex:
    """A built faiss index whose ids are global row numbers, plus its resolved spec.

    nprobe (IVF) and ef_search (HNSW) live in the spec: saved, applied on load and every search.
    """

    def __init__(
        self,
        index: faiss.Index | None,
        spec: IndexSpec,
        *,
        gpu: faiss.Index | None = None,
        gpu_resources: object | None = None,
    ) -> None:
        if index is None and gpu is None:
            raise ValueError("VectorIndex needs a CPU or a GPU faiss index")
        self._cpu = index
        self._gpu = gpu
        self._gpu_resources = gpu_resources
        self.spec = spec
        if index is not None:
            self._apply(index, faiss.ParameterSpace())

    @property
    def _main(self) -> faiss.Index:
        return self._gpu if self._gpu is not None else self._cpu

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self._main.ntotal)

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._main.d)

    @property
    def kind(self) -> str:
        """Concrete index kind ("flat", "ivf_flat", "ivf_pq" or "hnsw")."""
        return self.spec.kind

    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU copy."""
        return self._gpu is not None

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for other kinds)."""
        return self.spec.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        """Set nprobe (clamped to 1..nlist)."""
        if self.spec.nlist is None:
            raise ValueError(f"nprobe applies to IVF indexes, not {self.kind}")
        self.spec = replace(self.spec, nprobe=max(1, min(int(value), self.spec.nlist)))

    @property
    def ef_search(self) -> int:
        """HNSW search breadth (ignored by other kinds)."""
        return self.spec.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        """Set the HNSW search breadth."""
        self.spec = replace(self.spec, ef_search=max(1, int(value)))

    def cpu_index(self) -> faiss.Index:
        """The CPU faiss index (copied from the GPU once, then cached, for a GPU-built index)."""
        if self._cpu is None:
            self._cpu = faiss.index_gpu_to_cpu(self._gpu)
        self._apply(self._cpu, faiss.ParameterSpace())
        return self._cpu

    def _apply(self, index: faiss.Index, space: object) -> None:
        """Set nprobe / efSearch from the spec on one faiss index."""
        if self.kind in ("ivf_flat", "ivf_pq"):
            space.set_index_parameter(index, "nprobe", int(self.spec.nprobe))
        elif self.kind == "hnsw":
            index.hnsw.efSearch = int(self.spec.ef_search)

    def _search_index(self, k: int) -> faiss.Index:
        """The index to search: the GPU one unless k or nprobe is over the GPU limit."""
        if self._gpu is not None and k <= GPU_MAX_K and (self.spec.nprobe or 0) <= GPU_MAX_K:
            self._apply(self._gpu, faiss.GpuParameterSpace())
            return self._gpu
        return self.cpu_index()

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (q, {self.dim}), got {q.shape}")
        return np.ascontiguousarray(q, dtype=np.float32)

    def knn(self, queries: np.ndarray, k: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows per query: (sims float32 [q, k], ids int64 [q, k]), best first.

        Searched `chunk` queries at a time. Missing results (k > ntotal) have id -1, sim -inf.
        """
        if k < 1 or chunk < 1:
            raise ValueError("k and chunk must be at least 1")
        q = self._queries(queries)
        index = self._search_index(k)
        sims = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), chunk):
            stop = min(start + chunk, len(q))
            sims[start:stop], ids[start:stop] = index.search(q[start:stop], k)
        sims[ids < 0] = -np.inf
        return sims, ids

    def range(
        self, queries: np.ndarray, threshold: float, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims int64 [q+1], sims float32, ids int64) of every row with sim > threshold (strict,
        as faiss range_search); query i owns [lims[i], lims[i+1]), best first. Approximate for
        IVF/HNSW (probed lists only); runs on the CPU copy, as faiss GPU has no range search."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        q = self._queries(queries)
        index = self.cpu_index()
        lims_out, sims_out, ids_out, total = [np.zeros(1, dtype=np.int64)], [], [], 0
        for start in range(0, len(q), chunk):
            lims, sims, ids = index.range_search(q[start : start + chunk], float(threshold))
            lims = lims.astype(np.int64)
            owner = np.repeat(np.arange(len(lims) - 1), np.diff(lims))
            order = np.lexsort((ids, -sims, owner))
            sims_out.append(sims[order].astype(np.float32, copy=False))
            ids_out.append(ids[order].astype(np.int64, copy=False))
            lims_out.append(lims[1:] + total)
            total += int(lims[-1])
        lims = np.concatenate(lims_out)
        empty_f, empty_i = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        sims = np.concatenate(sims_out) if sims_out else empty_f
        ids = np.concatenate(ids_out) if ids_out else empty_i
        return lims, sims, ids

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (faiss.write_index) and `<path>.json` (spec, ntotal, dim), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "spec": self.spec.to_dict(),
            "faiss_version": faiss.__version__,
        }
        token = uuid.uuid4().hex[:8]
        tmp_index = path.with_name(f".{path.name}.tmp-{token}")
        sidecar = sidecar_path(path)
        tmp_meta = sidecar.with_name(f".{sidecar.name}.tmp-{token}")
        try:
            faiss.write_index(self.cpu_index(), str(tmp_index))
            tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_index, path)
            os.replace(tmp_meta, sidecar)
        finally:
            tmp_index.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, use_gpu: bool | None = None, log: Log | None = None) -> VectorIndex:
        """Read an index saved by save(); use_gpu None follows the saved spec (None: GPU if there)."""
        path = Path(path)
        sidecar = sidecar_path(path)
        if not path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(f"index {path} or its sidecar {sidecar.name} is missing")
        meta = json.loads(sidecar.read_text())
        spec = IndexSpec.from_dict(meta["spec"])
        index = faiss.read_index(str(path))
        if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
            raise ValueError(
                f"{path} holds {index.ntotal} x {index.d} vectors but {sidecar.name} says "
                f"{meta['ntotal']} x {meta['dim']}: the two files do not belong together"
            )
        wanted = spec if use_gpu is None else replace(spec, use_gpu=use_gpu)
        if _want_gpu(wanted, log or _stderr):
            try:
                gpu, resources = _to_gpu(index)
                return cls(index, spec, gpu=gpu, gpu_resources=resources)
            except (RuntimeError, AttributeError) as exc:
                (log or _stderr)(f"could not move the index to the GPU ({exc}); using the CPU")
        return cls(index, spec)
