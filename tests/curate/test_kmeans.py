import json

import numpy as np
import pytest

from curate.kmeans import (
    ArrayVectors,
    StepStats,
    accumulate,
    as_vectors,
    assign_all,
    assign_chunk,
    initial_centroids,
    kmeans,
    kmeans_plusplus,
    lloyd,
    local_step_fn,
    part_step,
    reduce_stats,
    shard_step,
    update_centroids,
)
from curate.kmeans_parts import Assignment
from curate.kmeans_tree import LevelSpec, apportion, hierarchical_kmeans, sample_per_cluster


@pytest.fixture(autouse=True)
def one_thread(one_faiss_thread):
    """faiss on one thread for every test here (see conftest)."""


def blobs(n: int, dim: int, k: int, seed: int, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """float16 L2-normalised points around k random unit centres, and the true labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    truth = rng.integers(0, k, n)
    x = centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True) + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16), truth


LEVELS = [LevelSpec(40, 8, resampling_steps=3, sample_size=20, sampling="c"), LevelSpec(8, 8, 2, 3, "r")]


def test_recovers_separated_gaussians():
    x, truth = blobs(3000, 16, 8, seed=1)
    res = kmeans(x, 8, 15, seed=0)
    pairs = {(int(t), int(f)) for t, f in zip(truth, res.labels)}
    assert len(pairs) == 8  # every true cluster maps to one found cluster, and vice versa
    assert len({f for _, f in pairs}) == 8
    assert res.labels.dtype == np.int32 and res.centroids.dtype == np.float32
    assert len(res.objective) == 16 and res.objective[-1] <= res.objective[0]


def test_float64_sums_are_exact_where_float32_drifts():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (400_000, 2)).astype(np.float16)
    labels = np.zeros(len(x), dtype=np.int32)
    sums, counts = accumulate(x, labels, 1)
    exact = (x.astype(np.float64) * 2**24).astype(np.int64).sum(axis=0)  # float16 are multiples of 2**-24
    assert sums.dtype == np.float64 and counts.dtype == np.int64 and counts[0] == len(x)
    assert np.array_equal(sums[0] * 2**24, exact.astype(np.float64))
    drift = np.abs(np.cumsum(x.astype(np.float32), axis=0)[-1] - exact / 2**24)
    assert drift.max() > 0.5  # a running float32 sum is off by whole units here
    parts = [accumulate(x[a : a + 70_001], labels[a : a + 70_001], 1)[0] for a in range(0, len(x), 70_001)]
    assert np.array_equal(sum(parts[::-1]), sums)  # and order-independent


def test_empty_clusters_are_repaired():
    x, _ = blobs(1500, 16, 3, seed=2)
    vec = as_vectors(x)
    init = np.vstack([vec.take(np.array([0, 1, 2, 3])), np.full((3, 16), 50.0, np.float32)])
    res = lloyd(x, init, 6)
    assert sorted(res.repaired[:3]) == [4, 5, 6]
    assert np.bincount(res.labels, minlength=7).min() > 0
    stats = StepStats(np.ones((3, 2)), np.array([5, 0, 3]), 0.0, np.array([0.5, -1, 0.9], np.float32),
                      np.array([7, -1, 9]))
    new, fixed = update_centroids(stats, np.zeros((3, 2), np.float32), lambda r: np.full((len(r), 2), float(r[0])))
    assert fixed == [1] and np.array_equal(new[1], [7.0, 7.0])  # farthest point of the largest cluster (0)
    assert np.allclose(new[0], 0.2) and np.allclose(new[2], 1 / 3)


def test_chunk_size_invariance_and_seeds():
    x, _ = blobs(3000, 16, 10, seed=3, noise=0.3)
    a = kmeans(x, 12, 6, seed=5, chunk_size=100)
    b = kmeans(x, 12, 6, seed=5, chunk_size=10_000)
    assert np.array_equal(a.labels, b.labels)
    assert np.abs(a.centroids - b.centroids).max() <= 1e-5
    assert np.allclose(a.objective, b.objective, rtol=1e-9)
    c = kmeans(x, 12, 6, seed=5, chunk_size=100)
    assert np.array_equal(a.centroids, c.centroids) and np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.centroids, kmeans(x, 12, 6, seed=6).centroids)
    t1 = hierarchical_kmeans(x, LEVELS, seed=1, chunk_size=100)
    t2 = hierarchical_kmeans(x, LEVELS, seed=1, chunk_size=10_000)
    assert np.array_equal(t1.paths(), t2.paths())
    assert all(np.abs(p - q).max() <= 1e-5 for p, q in zip(t1.centroids, t2.centroids))


def test_distributed_reduce_equals_local_step():
    x, _ = blobs(2500, 16, 6, seed=4, noise=0.3)
    cents = initial_centroids(as_vectors(x), 9, seed=0)
    cuts = [0, 700, 1900, 2500]  # three "workers" of unequal size

    def distributed(c: np.ndarray, out: Assignment | None = None) -> StepStats:
        outs = [shard_step(x[a:b], c, row_offset=a) for a, b in zip(cuts, cuts[1:])][::-1]
        if out is not None:  # lloyd's layout: one part per chunk of DEFAULT_CHUNK rows, here one
            out.put(0, np.concatenate([o[1] for o in outs[::-1]]), np.concatenate([o[2] for o in outs[::-1]]))
        return reduce_stats(o[0] for o in outs)

    local, lab, dist = assign_all(local_step_fn(as_vectors(x), chunk_size=512), cents, len(x), 512)
    parts = [part_step(x[a:b], cents, row_offset=a, chunk_size=100) for a, b in zip(cuts, cuts[1:])]
    merged = reduce_stats(p[0] for p in parts)
    assert np.array_equal(merged.sums, local.sums) and np.array_equal(merged.far_row, local.far_row)
    remote, rlab, rdist = assign_all(distributed, cents, len(x))
    assert np.array_equal(local.sums, remote.sums) and np.array_equal(local.counts, remote.counts)
    assert np.array_equal(local.far_row, remote.far_row) and np.array_equal(lab, rlab)
    assert np.array_equal(update_centroids(local, cents)[0], update_centroids(remote, cents)[0])
    a = lloyd(x, cents, 5)
    b = lloyd(x, cents, 5, step_fn=distributed)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)


def test_parts_directory_matches_array(tmp_path):
    x, _ = blobs(1000, 8, 4, seed=5)
    for i, (a, b) in enumerate([(0, 300), (300, 301), (301, 1000)]):
        np.save(tmp_path / f"part-{i:05d}.npy", x[a:b])
    vec = as_vectors(tmp_path)
    assert (vec.n, vec.dim) == (1000, 8)
    rows = np.array([999, 0, 300, 300, 301])
    assert np.array_equal(vec.take(rows), x[rows].astype(np.float32))
    blocks = list(vec.chunks(256))
    assert [s for s, _ in blocks] == [0, 256, 512, 768]
    assert np.array_equal(np.vstack([b for _, b in blocks]), x.astype(np.float32))
    assert np.array_equal(kmeans(vec, 4, 4).centroids, kmeans(x, 4, 4).centroids)


def test_kmeans_plusplus_and_assign():
    x, _ = blobs(500, 8, 5, seed=6)
    c1 = kmeans_plusplus(x, 5, seed=3, chunk_size=64)
    assert np.array_equal(c1, kmeans_plusplus(x, 5, seed=3))
    assert len(np.unique(c1, axis=0)) == 5
    labels, d = assign_chunk(x, c1)
    brute = ((x.astype(np.float32)[:, None, :] - c1[None]) ** 2).sum(-1)
    assert np.array_equal(labels, brute.argmin(1)) and np.allclose(d, brute.min(1), atol=1e-6)
    assert len(initial_centroids(as_vectors(x), 7, "random", seed=1)) == 7


def test_hierarchical_levels_are_consistent():
    x, _ = blobs(2000, 16, 8, seed=7, noise=0.2)
    tree = hierarchical_kmeans(x, LEVELS, seed=0)
    assert [c.shape for c in tree.centroids] == [(40, 16), (8, 16)]
    assert [len(a) for a in tree.assignments] == [2000, 40]
    paths = tree.paths()
    assert paths.shape == (2000, 2)
    assert np.array_equal(paths[:, 1], tree.assignments[1][tree.assignments[0]])
    assert np.array_equal(tree.assignments[1], assign_chunk(tree.centroids[0], tree.centroids[1])[0])
    assert np.array_equal(tree.assignments[0], assign_chunk(x, tree.centroids[0])[0])
    assert [len(o) for o in tree.objectives] == [8 + 1 + 2, 8 + 1 + 1]  # fit passes, then one per resampling


def zipf_gaussians(seed: int, largest: int = 4000, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """10 Gaussians (unit-norm centres, sd 0.15) of sizes largest * i**-2 (4000 ... 40), and their centres."""
    rng = np.random.default_rng(seed)
    sizes = np.round(largest * np.arange(1, 11) ** -2.0).astype(int)
    centres = rng.standard_normal((10, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[np.repeat(np.arange(10), sizes)] + 0.15 * rng.standard_normal((sizes.sum(), dim))
    return x.astype(np.float32), centres.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampling_spreads_centroids_over_zipf_components(seed):
    x, centres = zipf_gaussians(seed)
    k = 50  # an even split puts 5 centroids in each component

    def per_component(spec: LevelSpec) -> np.ndarray:
        tree = hierarchical_kmeans(x, [spec], seed=seed)
        assert np.array_equal(tree.assignments[0], assign_chunk(x, tree.centroids[0])[0])  # all points reassigned
        return np.bincount(assign_chunk(tree.centroids[0], centres)[0], minlength=10)

    plain = per_component(LevelSpec(k, 10))
    assert plain[0] >= 4 * k / 10  # k-means follows the density: the largest component takes ~5x its share
    assert np.array_equal(per_component(LevelSpec(k, 10, resampling_steps=1, sample_size=10)), plain)  # fit = step 1
    for mode in ("c", "r"):
        spread = per_component(LevelSpec(k, 10, resampling_steps=10, sample_size=10, sampling=mode))
        assert spread[0] <= 2 * k / 10 and spread.min() >= 1, (mode, spread)


def test_resampling_is_deterministic_and_samples_as_asked():
    x, _ = blobs(2000, 16, 5, seed=8, noise=0.3)
    runs = {}
    for mode in ("c", "r"):
        spec = [LevelSpec(30, 6, resampling_steps=3, sample_size=10, sampling=mode)]
        runs[mode] = hierarchical_kmeans(x, spec, seed=0)
        assert np.array_equal(runs[mode].centroids[0], hierarchical_kmeans(x, spec, seed=0).centroids[0])
    assert not np.allclose(runs["c"].centroids[0], runs["r"].centroids[0])
    plain = hierarchical_kmeans(x, [LevelSpec(30, 6)], seed=0)
    labels, dists = plain.assignments[0], plain.sq_dists
    rows = sample_per_cluster(labels, dists, 30, 10, "c", 0)
    counts = np.bincount(labels, minlength=30)
    assert np.array_equal(np.bincount(labels[rows], minlength=30), np.minimum(counts, 10))
    for c in range(30):  # 'c' takes the closest points of each cluster
        mine = np.flatnonzero(labels == c)
        chosen = np.intersect1d(rows, mine)
        assert dists[chosen].max() <= np.sort(dists[mine])[len(chosen) - 1]
    rand = sample_per_cluster(labels, dists, 30, 10, "r", 0)
    assert np.array_equal(np.bincount(labels[rand], minlength=30), np.minimum(counts, 10))
    assert not np.array_equal(rand, rows)
    assert np.array_equal(rand, sample_per_cluster(labels, dists, 30, 10, "r", 0))


def test_checkpoint_resume_gives_identical_results(tmp_path):
    x, _ = blobs(1500, 16, 6, seed=9, noise=0.3)
    reference = hierarchical_kmeans(x, LEVELS, seed=2)

    class Killed(Exception):
        pass

    for kill_at in [(1, 1), (2, 0)]:
        ckpt = tmp_path / f"ck{kill_at[0]}{kill_at[1]}"
        seen = []

        def hook(level: int, step: int) -> None:
            seen.append((level, step))
            if (level, step) == kill_at:
                raise Killed

        with pytest.raises(Killed):
            hierarchical_kmeans(x, LEVELS, seed=2, checkpoint_dir=ckpt, on_checkpoint=hook)
        resumed = []
        again = hierarchical_kmeans(x, LEVELS, seed=2, checkpoint_dir=ckpt,
                                    on_checkpoint=lambda lv, s: resumed.append((lv, s)))
        assert resumed and resumed[0] > kill_at  # finished steps are not redone
        assert np.array_equal(again.paths(), reference.paths())
        assert all(np.array_equal(a, b) for a, b in zip(again.centroids, reference.centroids))
        assert again.objectives == reference.objectives
    assert (ckpt / "centroids_l1_step0.npy").exists() and (ckpt / "assign_l2.npy").exists()
    # level 1's labels: one directory per step, of one file pair per chunk; only the last step's is kept
    assert sorted(p.name for p in ckpt.glob("assign_l1_step*")) == ["assign_l1_step2"]
    assert sorted(p.name for p in (ckpt / "assign_l1_step2").iterdir()) == ["dists-00000.npy", "labels-00000.npy"]
    assert json.loads((ckpt / "state.json").read_text())["level"] == 2
    with pytest.raises(ValueError, match="another run"):
        hierarchical_kmeans(x, LEVELS, seed=3, checkpoint_dir=ckpt)


def test_split_mode_and_apportion():
    ks = apportion(np.array([70, 20, 9, 1]), 10)
    assert ks.sum() == 10 and ks.min() >= 1 and ks.tolist() == [6, 2, 1, 1]
    assert apportion(np.array([5, 0, 5]), 4).tolist() == [2, 0, 2]
    x, _ = blobs(2000, 16, 4, seed=10, noise=0.3)
    spec = [LevelSpec(24, 5, resampling_steps=1, sample_size=15, split=4), LevelSpec(4, 5)]
    tree = hierarchical_kmeans(x, spec, seed=0)
    assert tree.centroids[0].shape == (24, 16)
    assert np.array_equal(tree.assignments[0], assign_chunk(x, tree.centroids[0])[0])
    assert np.array_equal(tree.centroids[0], hierarchical_kmeans(x, spec, seed=0).centroids[0])
    assert isinstance(as_vectors(tree.centroids[0]), ArrayVectors)


def test_split_within_keeps_points_in_their_split():
    """split_assign within: the same centroids as global, each point labelled by its nearest sub-centroid of
    its own split (the reference's split mode), never needing all n_clusters at once."""
    x, _ = blobs(2000, 16, 4, seed=11, noise=0.6)
    glob = hierarchical_kmeans(x, [LevelSpec(24, 5, split=4)], seed=0)
    tree = hierarchical_kmeans(x, [LevelSpec(24, 5, split=4, split_assign="within")], seed=0)
    assert np.array_equal(tree.centroids[0], glob.centroids[0])
    coarse = kmeans(x, 4, 5, seed=[0, 1, 0])
    ks = apportion(np.bincount(coarse.labels, minlength=4), 24)
    first = np.concatenate([[0], np.cumsum(ks)])
    labels = tree.assignments[0]
    split = coarse.labels
    assert ((labels >= first[split]) & (labels < first[split + 1])).all()
    for j in range(4):
        rows = np.flatnonzero(split == j)
        near, dist = assign_chunk(x[rows], tree.centroids[0][first[j]:first[j + 1]])
        assert np.array_equal(labels[rows], near + first[j])
        assert np.allclose(tree.sq_dists[rows], dist, rtol=1e-5, atol=1e-6)
    assert (labels != glob.assignments[0]).any()  # a real difference: some points sit nearer another split's centroid
    with pytest.raises(ValueError, match="cannot resample"):
        LevelSpec(24, 5, split=4, split_assign="within", resampling_steps=2, sample_size=3)


@pytest.mark.parametrize("shape", [(3000, 16, 40), (5000, 96, 12)])
def test_kmeans_plusplus_on_one_blas_thread_picks_the_same_centres(shape):
    """k-means++ runs its thin products on few BLAS threads ("auto": one here, the products are small); the
    centres equal those of one thread, of BLAS's own thread count and of several threads forced."""
    from threadpoolctl import threadpool_info, threadpool_limits

    m, d, k = shape
    x = np.random.default_rng(m).standard_normal((m, d)).astype(np.float32)
    one = kmeans_plusplus(x, k, seed=4, chunk_size=1000, blas_threads=1)
    assert one.tobytes() == kmeans_plusplus(x, k, seed=4, chunk_size=1000).tobytes()  # auto
    assert one.tobytes() == kmeans_plusplus(x, k, seed=4, chunk_size=1000, blas_threads=None).tobytes()
    assert one.tobytes() == kmeans_plusplus(x, k, seed=4, chunk_size=1000, blas_threads=4).tobytes()
    assert any(p["user_api"] == "blas" for p in threadpool_info())  # the limit has a library to act on
    with threadpool_limits(limits=2, user_api="blas"):  # the caller's setting is restored afterwards
        before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        kmeans_plusplus(x[:200], 5, seed=0)
        assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before
