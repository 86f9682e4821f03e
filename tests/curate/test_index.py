import json

import faiss
import numpy as np
import pytest

import curate.index as ci
from curate.index import (
    EmbeddingParts,
    IndexSpec,
    MemoryBudgetError,
    VectorIndex,
    build_index,
    estimate_memory,
    resolve_spec,
)

DIM = 32
SIZES = (1500, 2000, 1700)  # three parts; boundaries at rows 1500 and 3500
K = 10
TIE = 1e-5  # float32 sums in another order may swap neighbours closer than this


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """L2-normalised float32 points around random unit centres (noise of norm ~spread)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim))


@pytest.fixture(autouse=True)
def one_thread():
    """faiss on one thread: the small builds here are slower with OpenMP on a busy 2-core box."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield before
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Parts directory, all rows as float64 (from the float16 files), queries and exact top-K."""
    root = tmp_path_factory.mktemp("embed")
    x16 = clustered(sum(SIZES), DIM, 40, seed=1).astype(np.float16)
    start = 0
    for i, size in enumerate(SIZES):
        np.save(root / f"part-{i:05d}.npy", x16[start : start + size])
        start += size
    np.save(root / "notes.npy", np.zeros((3, DIM), np.float16))  # not a part: ignored
    (root / "part-00000.parquet").write_bytes(b"")  # row-aligned records, not read here
    boundary = np.array([0, 1499, 1500, 3499, 3500, len(x16) - 1])
    rng = np.random.default_rng(2)
    rows = np.concatenate([boundary, rng.choice(len(x16), 120, replace=False)])
    near = x16[rng.choice(len(x16), 80, replace=False)] + 0.5 * rng.standard_normal((80, DIM)) / np.sqrt(DIM)
    queries = np.concatenate([x16[rows].astype(np.float32), unit(near)])
    x64 = x16.astype(np.float64)
    sims = queries.astype(np.float64) @ x64.T
    order = np.lexsort((np.broadcast_to(np.arange(len(x64)), sims.shape), -sims), axis=1)[:, :K]
    return {"dir": root, "x64": x64, "queries": queries, "rows": rows, "sims": sims, "top": order}


def assert_exact(data, sims, ids):
    """ids equal the brute-force top-K up to float ties; sims equal the true sims."""
    true = data["sims"]
    top = data["top"]
    q = np.arange(len(top))[:, None]
    np.testing.assert_allclose(sims, true[q, top], atol=TIE)
    np.testing.assert_allclose(sims, true[q, ids], atol=TIE)
    differ = ids != top
    assert np.all(np.abs(true[q, ids] - true[q, top])[differ] < TIE)


def recall(data, ids) -> float:
    """Mean recall@K of ids against the exact top-K."""
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, data["top"])]))


def test_parts_are_listed_in_order_and_chunks_cover_every_row_once(data):
    parts = EmbeddingParts(data["dir"])
    assert [p.name for p in parts.paths] == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    assert (parts.n, parts.dim, len(parts)) == (sum(SIZES), DIM, sum(SIZES))
    for chunk_rows in (700, 1500, 10_000):
        chunks = list(parts.chunks(chunk_rows))
        starts = [s for s, _ in chunks]
        assert starts == list(range(0, parts.n, chunk_rows))
        assert all(c.dtype == np.float32 and len(c) <= chunk_rows for _, c in chunks)
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), data["x64"].astype(np.float32))
    assert isinstance(parts.part(1), np.memmap)


def test_sample_is_deterministic_and_reads_the_right_rows(data):
    parts = EmbeddingParts(data["dir"])
    a, b, c = parts.sample(500, seed=3), parts.sample(500, seed=3), parts.sample(500, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ids = parts.sample_ids(500, seed=3)
    assert len(np.unique(ids)) == 500 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(a, data["x64"][ids].astype(np.float32))
    assert len(parts.sample(10**9, seed=0)) == parts.n


def test_parts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no part-XXXXX.npy"):
        EmbeddingParts(tmp_path)
    with pytest.raises(ValueError, match="disagree"):
        EmbeddingParts([np.zeros((2, 4), np.float16), np.zeros((2, 5), np.float16)])


def test_flat_knn_is_exact_across_part_boundaries(data):
    index = build_index(data["dir"], IndexSpec(kind="flat"))
    assert (index.kind, index.ntotal, index.dim) == ("flat", sum(SIZES), DIM)
    sims, ids = index.knn(data["queries"], K, chunk=37)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (len(data["queries"]), K)
    assert_exact(data, sims, ids)
    n_rows = len(data["rows"])
    np.testing.assert_array_equal(ids[:n_rows, 0], data["rows"])  # each stored row finds itself first


def test_ivf_flat_probing_every_list_equals_exact(data):
    index = build_index(data["dir"], IndexSpec(kind="ivf_flat", nlist=16, nprobe=16))
    assert index.nprobe == 16
    assert_exact(data, *index.knn(data["queries"], K))


@pytest.mark.parametrize(
    "spec, floor",
    [
        (IndexSpec(kind="ivf_flat"), 0.95),  # auto nlist / nprobe; measured 0.996
        (IndexSpec(kind="ivf_pq", nlist=32, nprobe=8, pq_m=16, pq_bits=6), 0.7),  # measured 0.80
        (IndexSpec(kind="hnsw", hnsw_m=16, ef_search=64), 0.97),  # measured 0.9995
    ],
    ids=["ivf_flat", "ivf_pq", "hnsw"],
)
def test_approximate_recall_at_10(data, spec, floor):
    index = build_index(data["dir"], spec)
    _, ids = index.knn(data["queries"], K)
    assert recall(data, ids) >= floor


def test_flat_range_returns_exactly_the_pairs_above_the_threshold(data):
    index = build_index(data["dir"], IndexSpec(kind="flat"))
    threshold = 0.6
    lims, sims, ids = index.range(data["queries"], threshold, chunk=50)
    assert lims.dtype == np.int64 and len(lims) == len(data["queries"]) + 1 and lims[0] == 0
    assert lims[-1] == len(sims) == len(ids)
    true = data["sims"]
    assert lims[-1] > 10 * len(data["queries"])  # a real test: thousands of pairs
    for i in range(len(data["queries"])):
        got = ids[lims[i] : lims[i + 1]]
        s = sims[lims[i] : lims[i + 1]]
        assert np.all(np.diff(s) <= 0)  # best first
        want = set(np.flatnonzero(true[i] > threshold + TIE))
        maybe = set(np.flatnonzero(np.abs(true[i] - threshold) <= TIE))
        assert want <= set(got) <= want | maybe
        assert np.all(s > threshold)  # strict, as faiss range_search for inner product


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_save_load_round_trip(data, tmp_path, kind):
    spec = IndexSpec(kind=kind, nlist=16, pq_bits=6, hnsw_m=16)
    index = build_index(data["dir"], spec)
    if kind.startswith("ivf"):
        index.nprobe = 5
    index.ef_search = 40
    before = index.knn(data["queries"], K)
    path = tmp_path / "sub" / "index.faiss"
    index.save(path)
    meta = json.loads((tmp_path / "sub" / "index.faiss.json").read_text())
    assert (meta["kind"], meta["ntotal"], meta["dim"]) == (kind, sum(SIZES), DIM)
    loaded = VectorIndex.load(path)
    assert loaded.spec == index.spec and loaded.ntotal == index.ntotal
    after = loaded.knn(data["queries"], K)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["index.faiss", "index.faiss.json"]


def test_load_refuses_a_missing_or_mismatched_sidecar(tmp_path):
    x = np.eye(4, dtype=np.float32)
    build_index(x, IndexSpec(kind="flat")).save(tmp_path / "a.faiss")
    build_index(x[:3], IndexSpec(kind="flat")).save(tmp_path / "b.faiss")
    (tmp_path / "b.faiss.json").replace(tmp_path / "a.faiss.json")
    with pytest.raises(ValueError, match="do not belong together"):
        VectorIndex.load(tmp_path / "a.faiss")
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "b.faiss")


def test_memory_budget_error_is_clear_and_raised_before_any_work(data):
    need = estimate_memory(IndexSpec(kind="flat"), sum(SIZES), DIM)
    assert need == sum(SIZES) * DIM * 4
    with pytest.raises(MemoryBudgetError) as err:
        build_index(data["dir"], IndexSpec(kind="flat", memory_budget_bytes=need - 1))
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert f"{need:,} bytes" in message and f"{need - 1:,} bytes" in message
    assert "ivf_pq" in message and "dimension" in message and "raise memory_budget_bytes" in message
    with pytest.raises(MemoryBudgetError, match="lower pq_m or pq_bits"):
        resolve_spec(IndexSpec(kind="ivf_pq", memory_budget_bytes=1000), 10**6, 256)


def test_auto_rules_and_estimates():
    gib = 1 << 30
    assert resolve_spec(IndexSpec(), 1000, 768).kind == "flat"
    assert resolve_spec(IndexSpec(), 199_999, 768).kind == "flat"
    big = resolve_spec(IndexSpec(), 1_000_000, 768)
    assert (big.kind, big.nlist, big.train_size) == ("ivf_flat", 4000, 160_000)
    assert big.nprobe == ci.auto_nprobe(4000)
    ivf_bytes = estimate_memory(big, 1_000_000, 768)
    assert ivf_bytes == 1_000_000 * (768 * 4 + 8) + 4000 * 768 * 4
    small_budget = resolve_spec(IndexSpec(memory_budget_bytes=2 * gib), 1_000_000, 768)
    assert small_budget.kind == "ivf_pq" and 768 % small_budget.pq_m == 0
    assert small_budget.pq_m == 192  # the largest sub-quantizer count (<= dim/4) that fits
    tight = resolve_spec(IndexSpec(memory_budget_bytes=100 << 20), 1_000_000, 768)
    assert tight.kind == "ivf_pq" and estimate_memory(tight, 1_000_000, 768) <= 100 << 20
    assert resolve_spec(IndexSpec(memory_budget_bytes=200 << 20), 100_000, 768).kind == "ivf_pq"
    with pytest.raises(MemoryBudgetError):  # would need codes coarser than 32 dims per sub-quantizer
        resolve_spec(IndexSpec(memory_budget_bytes=30 << 20), 1_000_000, 768)
    assert ci.auto_nlist(1) == 1 and ci.auto_nlist(1000) == 25 and ci.auto_nlist(10**6) == 4000
    assert estimate_memory(IndexSpec(kind="hnsw", hnsw_m=32), 1000, 64) > 1000 * 64 * 4 + 1000 * 64 * 4
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexSpec(kind="lsh")


def test_auto_builds_ivf_above_the_threshold_and_reports_large_estimates(data, monkeypatch):
    messages = []
    monkeypatch.setattr(ci, "LARGE_ESTIMATE_BYTES", 0)
    index = build_index(data["dir"], IndexSpec(auto_flat_max_n=1000), log=messages.append)
    assert index.kind == "ivf_flat" and index.spec.nlist == ci.auto_nlist(sum(SIZES))
    assert len(messages) == 1 and "ivf_flat index of 5,200 x 32 will take about" in messages[0]
    assert build_index(data["dir"], IndexSpec(), log=messages.append).kind == "flat"


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_builds_are_deterministic(data, kind, one_thread):
    if kind == "ivf_flat":  # also with several threads (ivf_pq's many tiny k-means are slow so here)
        faiss.omp_set_num_threads(max(one_thread, 2))
    spec = IndexSpec(kind=kind, nlist=16, nprobe=4, pq_bits=6, hnsw_m=16, seed=7)
    chunk_rows = None if kind == "hnsw" else 999  # an HNSW graph depends on the add order of chunks
    a, b = build_index(data["dir"], spec), build_index(data["dir"], spec, chunk_rows=chunk_rows)
    assert np.array_equal(faiss.serialize_index(a.cpu_index()), faiss.serialize_index(b.cpu_index()))
    for x, y in zip(a.knn(data["queries"], K), b.knn(data["queries"], K)):
        np.testing.assert_array_equal(x, y)
    if kind != "hnsw":
        other = build_index(data["dir"], IndexSpec(kind=kind, nlist=16, nprobe=4, pq_bits=6, seed=8))
        assert not np.array_equal(faiss.serialize_index(a.cpu_index()), faiss.serialize_index(other.cpu_index()))


def test_gpu_request_falls_back_to_cpu_cleanly():
    messages = []
    index = build_index(np.eye(8, dtype=np.float16), IndexSpec(kind="flat", use_gpu=True), log=messages.append)
    if not ci.gpu_available():
        assert not index.on_gpu and any("GPU requested" in m for m in messages)
    assert index.knn(np.eye(8)[:2], 1)[1].ravel().tolist() == [0, 1]


def test_knn_edge_cases():
    index = build_index(np.eye(4, dtype=np.float32), IndexSpec(kind="flat"))
    sims, ids = index.knn(np.eye(4)[0], 6)  # one 1-D query; k > ntotal
    assert ids[0, 0] == 0 and ids[0, 4:].tolist() == [-1, -1] and np.all(np.isneginf(sims[0, 4:]))
    with pytest.raises(ValueError, match="shape"):
        index.knn(np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="0 rows"):
        build_index(np.zeros((0, 4), np.float32), IndexSpec(kind="flat"))
    lims, sims, ids = index.range(np.zeros((0, 4), np.float32), 0.5)
    assert lims.tolist() == [0] and len(sims) == len(ids) == 0
