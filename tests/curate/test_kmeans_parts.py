"""k-means state held part by part: the streamed resampling draw picks the rows the whole-array one picks,
PartVectors read what the arrays hold, and a tree whose level-1 labels live in a directory of parts (the
cluster stage's layout) equals the in-memory tree bit for bit, also when resumed after a kill mid-pass."""

import json

import numpy as np
import pytest

from curate.kmeans import ArrayVectors, kmeans, local_step_fn
from curate.kmeans_parts import (
    Assignment,
    PartVectors,
    chunk_sizes,
    complement_rows,
    sample_per_cluster_parts,
)
from curate.kmeans_tree import LevelSpec, hierarchical_kmeans, resampling_step, sample_per_cluster


@pytest.fixture(autouse=True)
def one_thread(one_faiss_thread):
    """faiss on one thread for every test here (see conftest)."""


def blobs(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    x = centres[rng.integers(0, k, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def split(labels: np.ndarray, dists: np.ndarray, sizes: list[int]) -> Assignment:
    out = Assignment(sizes)
    for i, (a, b) in enumerate(zip(out.offsets[:-1], out.offsets[1:])):
        out.put(i, labels[a:b], dists[a:b])
    return out


@pytest.mark.parametrize("sizes", [[50], [5, 0, 13, 1, 31], [1] * 50])
@pytest.mark.parametrize("size", [1, 3, 100])
def test_streamed_sample_equals_whole_arrays(sizes, size):
    rng = np.random.default_rng(len(sizes) + size)
    labels = rng.choice([0, 1, 2, 4, 5, 6], size=50).astype(np.int32)  # cluster 3 (and 7) empty
    dists = rng.integers(0, 4, 50).astype(np.float32) / 4  # many ties: broken by row
    parts = split(labels, dists, sizes)
    closest = sample_per_cluster(labels, dists, 8, size, "c", 0)
    assert np.array_equal(sample_per_cluster_parts(parts, 8, size, "c", None), closest)
    for seed in ([4, 0], [9, 1, 2]):
        whole = sample_per_cluster(labels, dists, 8, size, "r", seed)
        assert np.array_equal(sample_per_cluster_parts(parts, 8, size, "r", np.random.default_rng(seed)), whole)
    if size == 3:
        assert len(closest) == sum(min(3, c) for c in np.bincount(labels))  # the draw is not vacuous


def test_complement_rows_equals_setdiff():
    rng = np.random.default_rng(0)
    for n in (1, 7, 200):
        taken = np.sort(rng.choice(n, size=rng.integers(0, n), replace=False))
        rest = np.setdiff1d(np.arange(n), taken)
        assert np.array_equal(complement_rows(taken, np.arange(len(rest))), rest)


def test_resampling_top_up_draws_what_the_whole_array_code_drew():
    """Too few samples (empty clusters): the top-up is rng.choice over the rows not sampled, as before."""
    x = blobs(600, 8, 5, seed=1)
    labels = (np.arange(600) % 3).astype(np.int32)  # 3 of 10 clusters used: 3 samples, 7 topped up
    dists = np.random.default_rng(2).random(600).astype(np.float32)
    spec = LevelSpec(10, 4, resampling_steps=2, sample_size=1, sampling="c")
    data = ArrayVectors(x)
    c, out, inertia = resampling_step(data, split(labels, dists, [250, 250, 100]), spec, [0, 1, 2, 1],
                                      local_step_fn(data, 250))
    rows = sample_per_cluster(labels, dists, 10, 1, "c", [0, 1, 2, 1, 0])
    rest = np.setdiff1d(np.arange(600), rows)
    extra = np.random.default_rng([0, 1, 2, 1, 1]).choice(rest, size=7, replace=False)
    expected = kmeans(x[np.sort(np.concatenate([rows, extra]))], 10, 4, seed=[0, 1, 2, 1, 2])
    assert len(rows) == 3 and np.array_equal(c, expected.centroids)
    assert out.sizes.tolist() == [250, 250, 100] and len(out.arrays()[0]) == 600


def test_assignment_directory_parts_and_ranges(tmp_path):
    labels = np.arange(10, dtype=np.int32)
    dists = labels.astype(np.float32) / 2
    disk = Assignment([4, 0, 6], tmp_path / "a")
    assert not disk.complete()
    disk.put(0, labels[:4], dists[:4])
    disk.put(2, labels[4:], dists[4:])
    assert disk.complete() and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "dists-00000.npy", "dists-00002.npy", "labels-00000.npy", "labels-00002.npy"]
    again = Assignment([4, 0, 6], tmp_path / "a")
    for a, b in [(0, 10), (3, 5), (4, 4), (5, 10), (0, 1)]:
        got = again.range(a, b)
        assert np.array_equal(got[0], labels[a:b]) and np.array_equal(got[1], dists[a:b])
    assert np.array_equal(again.counts(12), np.bincount(labels, minlength=12))
    with pytest.raises(ValueError, match="holds 6 points"):
        disk.put(2, labels[:5], dists[:5])
    assert chunk_sizes(10, 4).tolist() == [4, 4, 2] and chunk_sizes(8, 4).tolist() == [4, 4]


def test_part_vectors_read_the_listed_rows(tmp_path):
    x = blobs(300, 6, 3, seed=3)
    keep = [np.arange(0, 100, 3), None, np.array([], dtype=np.int64), np.array([0, 49])]
    bounds = [0, 100, 180, 230, 300]
    paths, positions, want = [], [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(tmp_path / f"part-{i:05d}.npy", x[a:b])
        paths.append(tmp_path / f"part-{i:05d}.npy")
        if keep[i] is None:
            positions.append(None)
            want.append(x[a:b])
        else:
            np.save(tmp_path / f"rows-{i:05d}.npy", keep[i])
            positions.append(tmp_path / f"rows-{i:05d}.npy")
            want.append(x[a:b][keep[i]])
    want = np.concatenate(want).astype(np.float32)
    v = PartVectors(paths, positions)
    assert v.n == len(want) and v.part_sizes.tolist() == [34, 80, 0, 2]
    assert np.array_equal(v.rows(0, v.n), want) and np.array_equal(v.rows(30, 40), want[30:40])
    rows = np.array([115, 0, 33, 34, 34, 114])
    assert np.array_equal(v.take(rows), want[rows])
    assert np.array_equal(np.vstack([b for _, b in v.chunks(7)]), want)


TREES = {
    "resample": [LevelSpec(30, 5, resampling_steps=3, sample_size=6, sampling="c"), LevelSpec(5, 5, 2, 2, "r")],
    "random": [LevelSpec(25, 5, resampling_steps=2, sample_size=4, sampling="r"), LevelSpec(4, 4)],
    "split": [LevelSpec(24, 5, split=3), LevelSpec(4, 5, resampling_steps=2, sample_size=3)],
    "within": [LevelSpec(24, 5, split=3, split_assign="within"), LevelSpec(4, 5)],
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_over_part_files_equals_the_in_memory_tree(tmp_path, name):
    x = blobs(1500, 8, 6, seed=4)
    valid = np.flatnonzero(np.random.default_rng(5).random(1500) > 0.1)
    paths, positions = [], []
    for i, (a, b) in enumerate([(0, 400), (400, 420), (420, 1500)]):
        np.save(tmp_path / f"part-{i:05d}.npy", x[a:b])
        rows = valid[(valid >= a) & (valid < b)] - a
        np.save(tmp_path / f"rows-{i:05d}.npy", rows)
        paths.append(tmp_path / f"part-{i:05d}.npy")
        positions.append(tmp_path / f"rows-{i:05d}.npy")
    v = PartVectors(paths, positions)
    levels = TREES[name]
    ref = hierarchical_kmeans(x[valid], levels, seed=7, chunk_size=97)
    got = hierarchical_kmeans(v, levels, seed=7, chunk_size=97, checkpoint_dir=tmp_path / "ck")
    assert got.level1.dir is not None and not got.level1._mem  # the labels live in files, chunk by chunk
    assert len(list(got.level1.dir.glob("labels-*.npy"))) == len(chunk_sizes(len(valid), 97))
    assert not list((tmp_path / "ck").glob("split_l1"))  # split mode's scratch files are gone
    assert np.array_equal(got.paths(), ref.paths()) and got.sq_dists.tobytes() == ref.sq_dists.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got.centroids, ref.centroids))
    assert got.objectives == ref.objectives


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_pass", [1, 2, 3])  # level 1: the fit's last pass, each resampling reassignment
def test_kill_mid_pass_then_resume_gives_the_same_tree(tmp_path, kill_pass):
    """A run killed while a pass writes its parts (some written, the step not finished) resumes to the same
    result; the partial directory is rewritten, never read."""
    x = blobs(1200, 8, 5, seed=6)
    levels = [LevelSpec(20, 4, resampling_steps=3, sample_size=5, sampling="r"), LevelSpec(4, 4, 2, 2)]
    ref = hierarchical_kmeans(x, levels, seed=1, chunk_size=100)
    base = local_step_fn(ArrayVectors(x), 100)
    calls = []

    class Dying(Assignment):
        def put(self, i, labels, dists):
            if i == 5:
                raise Killed
            super().put(i, labels, dists)

    def step(centroids, out=None):
        calls.append(out is not None)
        if out is not None and sum(calls) == kill_pass:
            doomed = Dying(out.sizes, out.dir)
            base(centroids, doomed)
        return base(centroids, out)

    with pytest.raises(Killed):
        hierarchical_kmeans(x, levels, seed=1, chunk_size=100, checkpoint_dir=tmp_path, step_fn=step)
    assert len(list(tmp_path.glob(f"assign_l1_step{kill_pass - 1}/labels-*.npy"))) == 5  # killed half-way
    again = hierarchical_kmeans(x, levels, seed=1, chunk_size=100, checkpoint_dir=tmp_path)
    assert np.array_equal(again.paths(), ref.paths()) and again.sq_dists.tobytes() == ref.sq_dists.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again.centroids, ref.centroids))
    assert again.objectives == ref.objectives


def test_checkpointed_tree_maps_its_centroids_from_disk_with_the_bytes_of_the_in_memory_tree(tmp_path):
    """With a checkpoint directory every level's centroids are memory-mapped from their checkpoint (level 1's
    split-mode centroids gathered from the buckets' files, never all in memory); the tree is the in-memory one."""
    x = blobs(900, 8, 5, seed=2)
    levels = [LevelSpec(30, 3, split=4, split_assign="within"), LevelSpec(5, 3, resampling_steps=2, sample_size=3)]
    ref = hierarchical_kmeans(x, levels, seed=3, chunk_size=128)
    got = hierarchical_kmeans(x, levels, seed=3, chunk_size=128, checkpoint_dir=tmp_path / "ckpt")
    assert all(isinstance(c, np.memmap) for c in got.centroids)
    assert [c.tobytes() for c in got.centroids] == [c.tobytes() for c in ref.centroids]
    assert np.array_equal(got.paths(), ref.paths()) and got.objectives == ref.objectives
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "centroids_l1_step0.npy" in left and not [n for n in left if n.startswith("split_l1")]  # scratch gone


def test_resume_from_whole_array_checkpoints_of_before(tmp_path):
    """A run checkpointed by the code before parts (assign_l1_step{S}.npy) resumes to the same tree."""
    x = blobs(900, 8, 5, seed=8)
    levels = [LevelSpec(15, 4, resampling_steps=3, sample_size=4), LevelSpec(3, 4)]
    ref = hierarchical_kmeans(x, levels, seed=2, chunk_size=200, checkpoint_dir=tmp_path / "new")
    killed, old = tmp_path / "k", tmp_path / "old"
    old.mkdir()

    class Stop(Exception):
        pass

    def hook(level, step):
        if (level, step) == (1, 1):
            raise Stop

    with pytest.raises(Stop):
        hierarchical_kmeans(x, levels, seed=2, chunk_size=200, checkpoint_dir=killed, on_checkpoint=hook)
    labels, dists = Assignment(chunk_sizes(900, 200), killed / "assign_l1_step1").arrays()
    np.save(old / "assign_l1_step1.npy", labels)
    np.save(old / "dists_l1_step1.npy", dists)
    np.save(old / "centroids_l1_step1.npy", np.load(killed / "centroids_l1_step1.npy"))
    (old / "state.json").write_text((killed / "state.json").read_text())
    assert json.loads((old / "state.json").read_text())["step"] == 1
    again = hierarchical_kmeans(x, levels, seed=2, chunk_size=200, checkpoint_dir=old)
    assert np.array_equal(again.paths(), ref.paths()) and again.objectives == ref.objectives
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again.centroids, ref.centroids))


def _split_fit_before(data, spec, seed, step, chunk_size, within=None):
    """split_fit as it was before its jobs (session 21): a chunks x splits count table on the driver, each
    split's rows gathered chunk by chunk and its k-means run in this process; kept as the reference."""
    from curate.kmeans_split import apportion

    sizes = chunk_sizes(data.n, chunk_size)
    coarse_out = Assignment(sizes)
    coarse = kmeans(data, spec.split, spec.n_iters, init=spec.init, seed=[*seed, 0],
                    init_sample_size=spec.init_sample_size, chunk_size=chunk_size, step_fn=step, out=coarse_out)
    counts = np.zeros((len(sizes), spec.split), dtype=np.int64)
    orders = []
    for i, offset, labels, _ in coarse_out:
        orders.append(np.argsort(labels, kind="stable").astype(np.int64) + offset)
        counts[i] = np.bincount(labels, minlength=spec.split)
    starts = np.concatenate([np.zeros((len(sizes), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    ks = apportion(counts.sum(axis=0), spec.n_clusters)
    parts, inside, first = [], {}, 0
    for j in np.flatnonzero(ks):
        rows = np.concatenate([orders[i][starts[i, j] : starts[i, j + 1]] for i in np.flatnonzero(counts[:, j])])
        sub = kmeans(data.take(rows), int(ks[j]), spec.n_iters, init=spec.init, seed=[*seed, 1, int(j)],
                     init_sample_size=spec.init_sample_size, chunk_size=chunk_size)
        parts.append(sub.centroids)
        inside[int(j)] = ((sub.labels + first).astype(np.int32), sub.sq_dists)
        first += int(ks[j])
    if within is not None:
        at = np.concatenate([np.zeros((1, spec.split), np.int64), np.cumsum(counts, axis=0)])
        for i in range(len(sizes)):
            labels, dists = np.empty(sizes[i], dtype=np.int32), np.empty(sizes[i], dtype=np.float32)
            local = orders[i] - int(np.sum(sizes[:i]))
            for j in np.flatnonzero(counts[i]):
                lab, dist = inside[int(j)]
                where = local[starts[i, j] : starts[i, j + 1]]
                labels[where], dists[where] = lab[at[i, j] : at[i + 1, j]], dist[at[i, j] : at[i + 1, j]]
            within.put(i, labels, dists)
    return np.concatenate(parts), coarse.objective, counts.sum(axis=0)


@pytest.mark.parametrize("bucket_points,route_chunks,scratch", [(10**9, 64, False), (60, 2, False), (60, 2, True),
                                                                (1, 1, True), (400, 3, True)])
def test_split_mode_in_buckets_of_splits_equals_the_split_by_split_fit(tmp_path, monkeypatch, bucket_points,
                                                                        route_chunks, scratch):
    """Split mode's jobs (routing by buckets of splits, one k-means job per bucket, within labels gathered per
    chunk; files or memory; one bucket, many, one split each) give the bytes of the split-by-split fit."""
    from curate import kmeans_split
    from curate.kmeans_split import split_fit

    monkeypatch.setattr(kmeans_split, "BUCKET_POINTS", (bucket_points, bucket_points))
    monkeypatch.setattr(kmeans_split, "ROUTE_CHUNKS", route_chunks)
    x = ArrayVectors(blobs(1300, 8, 7, seed=9).astype(np.float32))
    spec = LevelSpec(40, 4, split=9, split_assign="within")
    chunk = 101
    ref_within = Assignment(chunk_sizes(x.n, chunk))
    ref = _split_fit_before(x, spec, [3, 1], local_step_fn(x, chunk), chunk, ref_within)
    got_within = Assignment(chunk_sizes(x.n, chunk), tmp_path / "within" if scratch else None)
    calls = []

    def mapper(fn, jobs, shared=()):  # a Mapper that records the jobs it runs (the stage passes Ray's)
        calls.append((fn.__name__, len(jobs)))
        for i, job in enumerate(list(jobs)[::-1]):  # out of order, as tasks finish
            yield len(jobs) - 1 - i, fn(*shared, *job)

    got = split_fit(x, spec, [3, 1], local_step_fn(x, chunk), chunk, within=got_within,
                    scratch=tmp_path / "scratch" if scratch else None, mapper=mapper)
    assert got[0].tobytes() == ref[0].tobytes() and got[1] == ref[1]
    for i in range(len(ref_within)):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got_within.get(i), ref_within.get(i)))
    assert [name for name, _ in calls] == (["route_chunks", "fit_bucket", "within_chunk"] if scratch else [])
    if scratch:  # jobs: chunks / route_chunks routings, one fit per bucket (9 splits), one gather per chunk
        n_chunks = len(chunk_sizes(x.n, chunk))
        buckets = len(kmeans_split.split_buckets(ref[2], bucket_points)) - 1
        assert (buckets == 9) if bucket_points < 100 else (1 < buckets < 9)  # one split each, or several
        assert [n for _, n in calls] == [-(-n_chunks // route_chunks), buckets, n_chunks]
        # the centroids came through the buckets' files, gathered on disk beside the scratch: mapped, not held
        assert isinstance(got[0], np.memmap) and (tmp_path / "scratch-centroids.npy").exists()
    assert not (tmp_path / "scratch").exists()


def test_write_npy_copies_a_mapped_array_by_blocks_into_the_bytes_of_np_save(tmp_path, monkeypatch):
    import io

    from curate import kmeans_parts
    from curate.kmeans_parts import mapped_base, write_npy

    monkeypatch.setattr(kmeans_parts, "WRITE_ROWS", 7)  # blocks that do not divide the rows
    a = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    m = np.load(tmp_path / "a.npy", mmap_mode="r")
    for arr in (m, np.ascontiguousarray(m), m[3:41], a):
        want, got = io.BytesIO(), io.BytesIO()
        np.save(want, np.asarray(arr))
        write_npy(got, arr)
        assert got.getvalue() == want.getvalue()
    assert mapped_base(np.ascontiguousarray(m)) is m and mapped_base(a) is None


def test_refits_read_from_a_file_give_the_tree_of_refits_in_memory(tmp_path, monkeypatch):
    """A refit's points written by blocks (save_rows_npy: np.save's bytes of the rows taken at once) and passed
    over from the file give the same tree as the refits held in memory."""
    import io

    from curate import kmeans_parts
    from curate.kmeans_parts import PartVectors, save_rows_npy

    monkeypatch.setattr(kmeans_parts, "WRITE_ROWS", 7)  # blocks that do not divide the rows
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    rows = np.sort(rng.choice(300, 40, replace=False))
    want = io.BytesIO()
    np.save(want, x[rows])
    save_rows_npy(tmp_path / "r.npy", ArrayVectors(x).take, rows, 6)
    assert (tmp_path / "r.npy").read_bytes() == want.getvalue()

    levels = [LevelSpec(20, n_iters=3, resampling_steps=3, sample_size=4, sampling="r"),
              LevelSpec(5, n_iters=3, resampling_steps=2, sample_size=2)]
    made = []

    def refit(level, step, data, r):
        path = tmp_path / f"refit_l{level}_s{step}.npy"
        save_rows_npy(path, data.take, r, data.dim)
        made.append((level, step, len(r)))
        y = PartVectors([path])
        return y, local_step_fn(y, 16)

    ref = hierarchical_kmeans(x, levels, seed=3, chunk_size=16)
    got = hierarchical_kmeans(x, levels, seed=3, chunk_size=16, refit_fn=refit)
    assert [(lv, s) for lv, s, _ in made] == [(1, 1), (1, 2), (2, 1)]
    assert all(m >= k for (lv, _, m), k in zip(made, (20, 20, 5)))
    for a, b in zip(ref.centroids, got.centroids):
        assert np.array_equal(a, b)
    assert np.array_equal(ref.paths(), got.paths()) and ref.objectives == got.objectives
