"""Tests for curate.dedup: k-NN edges, components, copy dedup keepers/groups, decontamination."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.decontam import DECONTAM_THRESHOLD, decontaminate, eval_matches
from curate.dedup import (
    SLACK,
    CopyDedupRefused,
    SafetyLimits,
    check_safety,
    LargeComponentWarning,
    components,
    copy_dedup,
    knn_edges,
    merge_edges,
    union_find,
)
from curate.index import EmbeddingParts, IndexSpec
from pipelines.synth import blurred, make_image, reencode, resized

# Thresholds chosen per embedder for the planted-copy tests (mild resize / JPEG / blur copies),
# since DINOv2's 0.6 is meant for a trained model. The centred 16x16 pixels of distinct generated
# images correlate up to ~0.8 (at 0.6 this pool's pair precision is ~0.95); the randomly
# initialised ViT maps every image near one direction (distinct images reach ~0.97, at 0.6 it
# merges everything). Planted copies stay above 0.99 for both.
PIXELS_THRESHOLD = 0.9
VIT_THRESHOLD = 0.99
VIT_SIDE = 64  # ViT input side: small, to keep the test fast on CPU


@pytest.fixture(autouse=True)
def one_thread(one_faiss_thread):
    """faiss on one thread for every test here (see conftest)."""


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pixels_embed():
    """The pixels:16 baseline as an images -> unit vectors callable."""
    from curate.embedders import load_embedder

    emb = load_embedder("pixels:16")

    def embed(images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            y = emb.model(torch.stack([emb.transform(im.convert("RGB")) for im in images]))
        return torch.nn.functional.normalize(y.float(), dim=-1).numpy()

    return embed


def vit_embed(seed: int = 0):
    """A randomly initialised timm test_vit with its own preprocessing, as a callable."""
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=VIT_SIDE).eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, VIT_SIDE, VIT_SIDE)}, model=model))

    def embed(images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            y = model(torch.stack([transform(im.convert("RGB")) for im in images]))
        return torch.nn.functional.normalize(y.float(), dim=-1).numpy()

    return embed


def mild_copy(img: Image.Image, kind: int, rng: np.random.Generator) -> Image.Image:
    """An edit both embedders catch: resize, JPEG re-encode, light blur, or resize + JPEG."""
    if kind == 0:
        return resized(img, float(rng.uniform(0.75, 1.3)))
    if kind == 1:
        return Image.open(io.BytesIO(reencode(img, int(rng.integers(40, 85))))).convert("RGB")
    if kind == 2:
        return blurred(img, float(rng.uniform(0.5, 1.0)))
    small = resized(img, float(rng.uniform(0.8, 1.2)))
    return Image.open(io.BytesIO(reencode(small, 70))).convert("RGB")


@pytest.fixture(scope="module")
def pool():
    """48 generated originals, 1-2 mild copies of the first 24, rows shuffled; ids are random hex."""
    rng = np.random.default_rng(7)
    images, originals, truth = [], [], []
    for g in range(48):
        img = make_image(100 + g, (int(rng.integers(96, 160)), int(rng.integers(72, 128))))
        images.append(img)
        originals.append(img)
        truth.append(g)
        for c in range(int(rng.integers(1, 3)) if g < 24 else 0):
            images.append(mild_copy(img, (g + c) % 4, rng))
            truth.append(g)
    order = rng.permutation(len(images))
    images = [images[r] for r in order]
    truth = np.array(truth)[order]
    ids = [f"{v:016x}" for v in rng.integers(0, 2**63, len(images))]
    pixels = np.array([im.width * im.height for im in images])
    return {"images": images, "originals": originals, "truth": truth, "ids": ids, "pixels": pixels,
            "pixels_vec": pixels_embed()(images), "vit_vec": vit_embed()(images)}


def same_group_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of rows (r < s) that share a label (labels < 0 are alone)."""
    out = set()
    for lab in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == lab)
        out.update((int(a), int(b)) for x, a in enumerate(rows) for b in rows[x + 1 :])
    return out


@pytest.mark.parametrize("embedder,threshold", [("pixels_vec", PIXELS_THRESHOLD), ("vit_vec", VIT_THRESHOLD)])
def test_planted_copies_found(pool, embedder, threshold):
    # this pool plants copies of half its originals: 44% of it is removed, past the default refusal
    res = copy_dedup(pool[embedder], pool["ids"], pool["pixels"], threshold=threshold, limits=None)
    found, truth = same_group_pairs(res.group), same_group_pairs(pool["truth"])
    hits = len(found & truth)
    assert hits / len(truth) >= 0.95, (embedder, hits, len(truth), len(found))
    assert hits / max(len(found), 1) >= 0.95, (embedder, hits, len(truth), len(found))
    for group in res.groups.to_pylist():
        rows = [pool["ids"].index(m) for m in group["members"]]
        best = min(rows, key=lambda r: (-pool["pixels"][r], pool["ids"][r]))
        assert group["keeper"] == pool["ids"][best]
        assert sum(res.keep[rows]) == 1 and res.keep[best]
        assert all(res.dup_of[r] == group["keeper"] for r in rows if r != best)
    dropped = sum(res.groups["size"].to_pylist()) - res.groups.num_rows
    assert res.stats["dropped"] == len(pool["ids"]) - res.keep.sum() == dropped


def test_default_threshold_pixels_recall(pool):
    """At DINOv2's 0.6 the pixel baseline still finds every planted copy (its precision is lower)."""
    res = copy_dedup(pool["pixels_vec"], pool["ids"], pool["pixels"], limits=None)
    truth = same_group_pairs(pool["truth"])
    assert truth <= same_group_pairs(res.group)


def planted_vectors(n: int = 3000, dim: int = 64, groups: int = 150, seed: int = 0):
    """Random unit vectors with planted groups of 2-5 near copies (cosine ~0.9); group label per row."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, dim)))
    label = np.full(n, -1)
    row = 0
    for g in range(groups):
        size = int(rng.integers(2, 6))
        base = x[row]
        x[row : row + size] = unit(base + 0.35 * rng.standard_normal((size, dim)) / np.sqrt(dim))
        label[row : row + size] = g
        row += size
    perm = rng.permutation(n)
    return x[perm], label[perm]


def write_parts(root, x: np.ndarray, sizes: list[int], status: list[str] | None = None) -> None:
    """float16 part-XXXXX.npy files with row-aligned Parquet statuses."""
    status = status or ["ok"] * len(x)
    start = 0
    for p, size in enumerate(sizes):
        np.save(root / f"part-{p:05d}.npy", x[start : start + size].astype(np.float16))
        pq.write_table(pa.table({"id": [f"r{r}" for r in range(start, start + size)],
                                 "status": status[start : start + size]}), root / f"part-{p:05d}.parquet")
        start += size


def test_edges_match_brute_force(tmp_path):
    x, _ = planted_vectors(600, 16, 40)
    write_parts(tmp_path, x, [250, 350])
    i, j, sim = knn_edges(tmp_path, k=600, threshold=0.6)
    x64 = x.astype(np.float16).astype(np.float64)
    full = x64 @ x64.T
    bi, bj = np.nonzero(np.triu(full > 0.6, 1))
    assert np.array_equal(i, bi) and np.array_equal(j, bj)
    assert np.allclose(sim, full[bi, bj], atol=1e-6)
    assert np.all(i < j) and np.all(sim > 0.6)


def test_threshold_is_strict():
    x = np.zeros((3, 4), np.float32)
    x[0, 0] = 1
    x[1] = 0.5  # cosine with row 0 is exactly 0.5
    x[2, 1:3] = (0.75, -0.75)  # orthogonal to both (norm aside: only the dot product matters)
    assert len(knn_edges(x, k=2, threshold=0.5)[0]) == 0
    assert list(zip(*knn_edges(x, k=2, threshold=0.49)[:2])) == [(0, 1)]


def test_invalid_rows_form_no_edges(tmp_path):
    x, label = planted_vectors(400, 32, 30)
    g0 = np.flatnonzero(label == label[label >= 0][0])
    x[g0[0]] = 0  # a failed embedding: zero vector
    status = ["ok"] * len(x)
    status[g0[1]] = "embed_error"  # failed by status, vector still looks like a copy
    write_parts(tmp_path, x, [100, 300], status)
    i, j, _ = knn_edges(tmp_path, k=16, threshold=0.6)
    touched = set(i) | set(j)
    assert g0[0] not in touched and g0[1] not in touched
    res = copy_dedup(tmp_path, [f"r{r}" for r in range(len(x))])
    assert res.keep[g0[:2]].all() and (res.group[g0[:2]] == -1).all()
    assert res.stats["invalid"] == 2
    pq.write_table(res.groups, tmp_path / "groups.parquet")
    assert pq.read_table(tmp_path / "groups.parquet").equals(res.groups)
    records = res.records()
    assert records.column_names == ["id", "keep", "dup_of", "dup_group", "dup_max_sim"]
    assert records.num_rows == len(x) and records["dup_max_sim"].null_count == (np.isnan(res.max_sim)).sum()


def test_deterministic_across_chunks_splits_and_parts(tmp_path):
    x, _ = planted_vectors()
    n = len(x)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_parts(tmp_path / "a", x, [n])
    write_parts(tmp_path / "b", x, [700, 1, 1299, 1000])
    one = knn_edges(tmp_path / "a", k=16, threshold=0.6)
    assert len(one[0]) > 150
    for other in (knn_edges(tmp_path / "b", k=16, threshold=0.6, chunk=97),
                  merge_edges(*[knn_edges(tmp_path / "b", k=16, threshold=0.6, query_rows=r)
                                for r in [(0, 1000), (1000, 1001), (1001, n)]])):
        for a, b in zip(one, other):
            assert np.array_equal(a, b)


def test_same_result_whatever_the_input_order():
    x, _ = planted_vectors()
    rng = np.random.default_rng(3)
    ids = np.array([f"{v:08x}" for v in rng.integers(0, 2**31, len(x))])
    pixels = rng.integers(1, 4, len(x)) * 1000
    a = copy_dedup(x, ids, pixels, k=16)
    perm = rng.permutation(len(x))
    b = copy_dedup(x[perm], ids[perm], pixels[perm], k=16, chunk=333)
    assert a.groups.equals(b.groups)
    assert np.array_equal(a.keep[perm], b.keep) and np.array_equal(a.group[perm], b.group)
    assert [a.dup_of[r] for r in perm] == b.dup_of
    assert np.array_equal(a.max_sim[perm], b.max_sim, equal_nan=True)


def test_ivf_with_all_lists_probed_equals_flat():
    x, _ = planted_vectors(2000, 32, 100)
    flat = knn_edges(x, k=16, threshold=0.6, index_spec=IndexSpec(kind="flat"))
    ivf = knn_edges(x, k=16, threshold=0.6, index_spec=IndexSpec(kind="ivf_flat", nlist=8, nprobe=8))
    for a, b in zip(flat, ivf):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_union_find_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    m = int(rng.integers(0, 2 * n))
    i, j = rng.integers(0, n, m), rng.integers(0, n, m)
    if seed % 2:  # long chains as well, in reverse order
        chain = np.arange(n - 1)[::-1]
        i, j = np.concatenate([i, chain + 1]), np.concatenate([j, chain])
    expected = components(n, i, j, "scipy")
    assert np.array_equal(components(n, i, j, "union_find", chunk=int(rng.integers(1, 500))), expected)
    assert np.array_equal(union_find(n, [(i, j)]), expected)
    assert expected[0] == 0 and np.all(np.diff(np.maximum.accumulate(expected)) <= 1)


def chain(length: int, dim: int = 128, step_cos: float = 0.7, seed: int = 0) -> np.ndarray:
    """A random walk on the sphere: consecutive cosine step_cos, two steps apart about step_cos**2."""
    rng = np.random.default_rng(seed)
    out = [unit(rng.standard_normal((1, dim)))[0]]
    for _ in range(length - 1):
        u = rng.standard_normal(dim)
        u -= (u @ out[-1]) * out[-1]
        out.append(step_cos * out[-1] + np.sqrt(1 - step_cos**2) * u / np.linalg.norm(u))
    return np.array(out, dtype=np.float32)


def test_large_component_warning_on_a_chain():
    rng = np.random.default_rng(1)
    x = np.concatenate([chain(40), unit(rng.standard_normal((200, 128)))])
    ids = [f"{r:04d}" for r in range(len(x))]
    with pytest.warns(LargeComponentWarning, match="40 records"):
        res = copy_dedup(x, ids, max_component=10, limits=None)
    assert res.warning and res.stats["largest_component"] == 40
    assert res.groups.num_rows == 1 and res.groups["size"][0].as_py() == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert copy_dedup(x, ids, max_component=40, limits=None).warning is None


def test_decontaminate_planted_vectors():
    """Eval images at cosine 0.5 (between 0.45 and 0.6) to one pool row and below 0.45 to its
    component's other members; the other 256-d vectors are random (|cosine| < 0.3)."""
    rng = np.random.default_rng(5)
    dim = 256
    pool = unit(rng.standard_normal((3000, dim)))

    def at(cos: float, base: np.ndarray, away: np.ndarray) -> np.ndarray:
        """A unit vector with the given cosine to base and orthogonal to every row of away."""
        q, _ = np.linalg.qr(np.concatenate([base[None], away]).T)
        u = rng.standard_normal(dim)
        u -= q @ (q.T @ u)
        return cos * base + np.sqrt(1 - cos**2) * u / np.linalg.norm(u)

    for g in range(10):  # components: rows 10g+1, 10g+2 at cosine 0.7 to row 10g
        for m in (1, 2):
            pool[10 * g + m] = at(0.7, pool[10 * g], pool[:0])
    ids = [f"p{r:05d}" for r in range(len(pool))]
    dedup = copy_dedup(pool, ids, k=16)
    assert dedup.stats["groups"] == 10 and set(dedup.groups["size"].to_pylist()) == {3}

    planted = [at(0.5, pool[0], pool[1:3]), at(0.5, pool[21], pool[[20, 22]]), at(0.5, pool[500], pool[:0])]
    ev = unit(np.stack([*planted, *rng.standard_normal((20, dim))]))
    ev_ids = [f"e{r}" for r in range(len(ev))]
    empty = (unit(rng.standard_normal((5, dim))), list("abcde"))
    res = decontaminate(pool, ids, dedup.group, {"val": (ev, ev_ids), "empty": empty})
    removed = res.removed["val"].to_pylist()
    expected = {"p00000": "direct", "p00001": "component", "p00002": "component", "p00021": "direct",
                "p00020": "component", "p00022": "component", "p00500": "direct"}
    assert {r["pool_id"]: r["reason"] for r in removed} == expected
    assert [r["pool_id"] for r in removed] == sorted(expected)
    assert res.pairs["val"].column("pool_id").to_pylist() == ["p00000", "p00021", "p00500"]
    assert res.pairs["val"].column("eval_id").to_pylist() == ["e0", "e1", "e2"]
    assert np.allclose(res.pairs["val"].column("sim").to_numpy(), 0.5, atol=1e-5)
    assert res.removed["empty"].num_rows == 0
    assert set(np.flatnonzero(~res.keep)) == {0, 1, 2, 20, 21, 22, 500}
    assert res.reason[1] == "component" and res.reason[500] == "direct" and res.reason[3] is None
    assert res.stats["total"]["removed"] == 7 and res.stats["total"]["threshold"] == DECONTAM_THRESHOLD
    knn = decontaminate(pool, ids, dedup.group, {"val": (ev, ev_ids)}, k=50)
    assert knn.removed["val"].equals(res.removed["val"])


def test_decontaminate_eval_folder_of_images(pool):
    """An evaluation folder holding mild copies of 5 pool originals plus unrelated images (pixels)."""
    rng = np.random.default_rng(11)
    embed = pixels_embed()
    dedup = copy_dedup(pool["pixels_vec"], pool["ids"], pool["pixels"], threshold=PIXELS_THRESHOLD, limits=None)
    planted = [0, 3, 30, 31, 40]  # truth labels: 0 and 3 have copies in the pool, the rest not
    eval_images = [mild_copy(pool["originals"][g], g % 4, rng) for g in planted]
    eval_images += [make_image(9000 + s) for s in range(10)]
    ev = embed(eval_images)
    res = decontaminate(pool["pixels_vec"], pool["ids"], dedup.group,
                        {"folder": (ev, [f"e{r}" for r in range(len(ev))])}, threshold=PIXELS_THRESHOLD)
    expected = {pool["ids"][r] for r in np.flatnonzero(np.isin(pool["truth"], planted))}
    assert set(res.removed["folder"].column("pool_id").to_pylist()) == expected
    assert set(res.pairs["folder"].column("eval_id").to_pylist()) == {f"e{r}" for r in range(len(planted))}
    assert (~res.keep).sum() == len(expected)


def test_refuses_a_chaining_result_and_names_the_settings():
    rng = np.random.default_rng(1)
    x = np.concatenate([chain(40), unit(rng.standard_normal((200, 128)))])
    ids = [f"{r:04d}" for r in range(len(x))]
    with pytest.raises(CopyDedupRefused) as err:
        copy_dedup(x, ids, max_component=1000)
    msg = str(err.value)
    assert "\n" not in msg and "largest component 40 of 240 records (16.7% > max_component_share 0.01)" in msg
    assert "max_component_share >= 0.167" in msg and "max_removed_share" not in msg
    assert err.value.stats["largest_component"] == 40 and err.value.stats["dropped"] == 39
    res = copy_dedup(x, ids, limits=SafetyLimits(max_component_share=0.17))
    assert res.stats["largest_component"] == 40


def test_refusal_limits_exact():
    base = {"n": 1000, "largest_component": 16, "dropped": 300, "threshold": 0.5}
    check_safety(base)  # 16 <= max(1% of 1000, 16) and 300 <= 30%
    with pytest.raises(CopyDedupRefused, match=r"largest component 17 of 1,000 records \(1.7% > "):
        check_safety({**base, "largest_component": 17})
    with pytest.raises(CopyDedupRefused, match=r"301 of 1,000 records removed \(30.1% > max_removed_share 0.3\)"):
        check_safety({**base, "dropped": 301})
    check_safety({**base, "dropped": 301}, SafetyLimits(max_removed_share=0.5))
    check_safety({**base, "largest_component": 1000, "n": 100_000})  # 1% of a big pool
    with pytest.raises(CopyDedupRefused, match="largest component 1,001 of 100,000"):
        check_safety({**base, "largest_component": 1001, "n": 100_000})


def test_many_pairs_refused_by_removed_share():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((300, 64)))
    x[200:300] = unit(x[:100] + 0.01 * rng.standard_normal((100, 64)))  # 100 copies: a third of the pool
    ids = [f"{r:04d}" for r in range(300)]
    with pytest.raises(CopyDedupRefused, match=r"100 of 300 records removed \(33.3% > max_removed_share 0.3\)"):
        copy_dedup(x, ids, threshold=0.9)
    assert copy_dedup(x, ids, threshold=0.9, limits=None).stats["dropped"] == 100


def _brute_pairs(pool: np.ndarray, ok: np.ndarray, ev: np.ndarray, threshold: float, k: int | None):
    """Reference for eval_matches: float64 cosines of every valid pair, above threshold - SLACK, then
    each evaluation row's k best (sim descending, pool row ascending)."""
    sims = ev.astype(np.float64) @ pool.astype(np.float64).T
    sims[:, ~ok] = -np.inf
    pairs = set()
    for e, row in enumerate(sims):
        hits = np.flatnonzero(row > threshold - SLACK)
        if k is not None:
            hits = hits[np.lexsort((hits, -row[hits]))][:k]
        pairs |= {(int(p), e) for p in hits}
    return pairs


@pytest.mark.parametrize("k", [None, 3])
def test_eval_matches_streams_the_pool_by_part_and_equals_brute_force(tmp_path, k):
    """The pool in 4 part files (one row zero, one with status "error"), evaluation images near 5 pool rows
    and one near 6 pool rows at once: the streamed pairs equal a float64 brute force (range, or each
    evaluation image's k best), whatever order the parts come back in, and no pool index is built."""
    rng = np.random.default_rng(3)
    dim, sizes = 64, [50, 1, 70, 40]
    pool = unit(rng.standard_normal((sum(sizes), dim))).astype(np.float16)
    pool[7] = 0  # an embedding failure
    hub = unit(rng.standard_normal((1, dim)))[0]
    for r in (3, 55, 60, 100, 130, 150):  # six pool rows near one evaluation image
        pool[r] = unit((hub + 0.25 * unit(rng.standard_normal((1, dim)))[0])[None])[0]
    ev = unit(np.stack([hub, *(pool[r].astype(np.float64) + 0.2 * unit(rng.standard_normal((1, dim)))[0]
                              for r in (0, 7, 50, 90, 159)), *rng.standard_normal((4, dim))]))
    ev[-1] = 0  # an evaluation image that failed to embed
    offsets = np.cumsum([0, *sizes])
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        np.save(tmp_path / f"part-{i:05d}.npy", pool[lo:hi])
        status = ["ok"] * (hi - lo)
        if i == 2:
            status[10] = "error"  # pool row 61
        pq.write_table(pa.table({"status": status}), tmp_path / f"part-{i:05d}.parquet")
    ok = np.ones(len(pool), dtype=bool)
    ok[[7, 61]] = False
    parts = EmbeddingParts(str(tmp_path))
    threshold = 0.7
    expected = _brute_pairs(pool, ok, ev, threshold, k)
    assert len({p for p, e in expected if e == 0}) == (3 if k else 6) and len(expected) == (7 if k else 10)

    def reversed_map(fn, jobs, shared=()):
        for i in reversed(range(len(jobs))):
            yield i, fn(*shared, *jobs[i])

    for mapper in (None, reversed_map):
        p, e = eval_matches(parts, EmbeddingParts(ev.astype(np.float16)), threshold, k, mapper=mapper, chunk=16)
        assert set(zip(p.tolist(), e.tolist())) == expected
        assert np.all(np.diff(p * len(ev) + e) > 0)  # unique and sorted by (pool row, eval row)
    # valid= drops rows as well, and an empty evaluation set gives no pairs
    valid = np.ones(len(pool), dtype=bool)
    valid[100] = False
    p, _ = eval_matches(parts, EmbeddingParts(ev.astype(np.float16)), threshold, None, valid=valid)
    assert 100 not in p and set(p.tolist()) == {q for q, _ in _brute_pairs(pool, ok & valid, ev, threshold, None)}
    p, e = eval_matches(parts, EmbeddingParts(np.zeros((3, dim), np.float16)), threshold, k)
    assert len(p) == len(e) == 0


def test_group_edges_reads_only_the_records_that_have_an_edge():
    """The copy graph of a large pool asks for the ids and pixels of the edges' ends only, and gives each
    of them what copy_dedup gives over every record; rows outside the pool are an error."""
    from curate.dedup import group_edges

    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 16))
    x[200:260] = x[100:160] + 0.01 * rng.standard_normal((60, 16))  # 60 planted copies
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"r{v:04d}" for v in rng.permutation(400)])
    pixels = rng.integers(1, 4, 400) * 100
    whole = copy_dedup(x, ids, pixels, k=8, threshold=0.9)
    asked = []

    def node_info(rows):
        asked.append(rows.copy())
        return ids[rows], pixels[rows]

    graph = group_edges(400, whole.edges, node_info, valid=400, k=8, threshold=0.9, index_kind="flat")
    i, j, _ = whole.edges
    assert len(asked) == 1 and np.array_equal(asked[0], np.unique(np.concatenate([i, j])))
    assert len(graph.nodes) == 120 and graph.stats == whole.stats and graph.groups.equals(whole.groups)
    assert np.array_equal(graph.keep, whole.keep[graph.nodes]) and np.array_equal(graph.group, whole.group[graph.nodes])
    rows, keepers = graph.dropped()
    assert [whole.dup_of[r] for r in rows] == keepers.tolist() and whole.stats["dropped"] == len(rows) == 60
    with pytest.raises(ValueError, match="outside"):
        group_edges(250, whole.edges, node_info)  # the copies sit at rows 200-259
