"""k-means++ over shards (curate/kmeans_pp.py): one shard is the single-process loop byte for byte, several
draw from the same distribution, and a lost shard restarts the seeding with the same centres."""

from __future__ import annotations

import numpy as np
import pytest

from curate.kmeans import kmeans_plusplus
from curate.kmeans_pp import LocalShards, ShardLost, shard_bounds, sharded_plusplus


def _single_process_plusplus(x: np.ndarray, k: int, seed, chunk_size: int) -> np.ndarray:
    """The loop as it was before shards (session 22's curate.kmeans._kmeans_plusplus), the reference."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = len(x)
    trials = 2 + int(np.log(k))
    rng = np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)
    sq = np.einsum("ij,ij->i", x, x)

    def sq_to(c):
        csq = np.einsum("ij,ij->i", c, c)
        for a in range(0, m, chunk_size):
            block = sq[a : a + chunk_size, None] - 2 * (x[a : a + chunk_size] @ c.T) + csq[None]
            yield a, np.maximum(block, 0, dtype=np.float64)

    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    d2 = np.full(m, np.inf)
    pick = np.array([int(rng.integers(m))])
    for i in range(k):
        potential = np.zeros(len(pick))
        for a, block in sq_to(x[pick]):
            potential += np.minimum(block, d2[a : a + len(block), None]).sum(axis=0)
        best = int(pick[int(np.argmin(potential))])
        centers[i] = x[best]
        for a, block in sq_to(x[best : best + 1]):
            np.minimum(d2[a : a + len(block)], block[:, 0], out=d2[a : a + len(block)])
        if i + 1 == k:
            break
        cum = np.cumsum(d2)
        if cum[-1] > 0:
            pick = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), m - 1)
        else:
            pick = rng.integers(m, size=1)
    return centers


def _potential(x: np.ndarray, c: np.ndarray) -> float:
    d = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
    return float(np.maximum(d, 0).min(1).sum())


@pytest.mark.parametrize("m,d,k,chunk,seed", [(500, 8, 20, 64, 0), (1500, 32, 64, 1000, [3, 1, 2]), (97, 3, 97, 16, 5)])
def test_one_shard_is_the_single_process_loop_byte_for_byte(m, d, k, chunk, seed):
    x = np.random.default_rng(m).normal(size=(m, d)).astype(np.float32)
    x[m // 2 :: 7] = x[0]  # repeated rows: ties and zero distances
    want = _single_process_plusplus(x, k, seed, chunk)
    assert kmeans_plusplus(x, k, seed, chunk_size=chunk).tobytes() == want.tobytes()
    assert kmeans_plusplus(x, k, seed, chunk_size=chunk, shard_rows=m).tobytes() == want.tobytes()


def test_one_shard_when_every_point_sits_on_a_centre():
    x = np.repeat(np.eye(3, dtype=np.float32), 40, axis=0)  # 3 distinct points, k 5: the potential reaches 0
    want = _single_process_plusplus(x, 5, 1, 16)
    assert kmeans_plusplus(x, 5, 1, chunk_size=16).tobytes() == want.tobytes()
    several = kmeans_plusplus(x, 5, 1, chunk_size=16, shard_rows=25)  # 5 shards, zero totals among them
    assert {tuple(r) for r in several} == {tuple(r) for r in np.eye(3, dtype=np.float32)}


def test_shards_pick_distinct_data_rows_with_the_potential_of_one_shard():
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=6, size=(40, 16))
    x = (centres[rng.integers(40, size=4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    ratios = []
    for seed in range(5):
        one = kmeans_plusplus(x, 40, seed, chunk_size=512)
        many = kmeans_plusplus(x, 40, seed, chunk_size=512, shard_rows=700)  # 6 shards of 666-667 rows
        assert len({r.tobytes() for r in many}) == 40 and all(r.tobytes() in rows for r in many)
        ratios.append(_potential(x, many) / _potential(x, one))
    assert 0.8 < float(np.mean(ratios)) < 1.25, ratios  # the same distribution: no systematic loss


def test_shard_bounds_cut_near_equal_consecutive_rows():
    assert shard_bounds(10, 4).tolist() == [0, 3, 6, 10]
    assert shard_bounds(8, 8).tolist() == [0, 8]
    assert shard_bounds(1, 262144).tolist() == [0, 1]
    with pytest.raises(ValueError, match="pp_shard_rows"):
        shard_bounds(10, 0)


class _LosesAShard(LocalShards):
    """Local shards whose first group loses a shard at its 5th step (as a Ray actor dies with its node)."""

    made = 0

    def __init__(self, parts, chunk_size):
        super().__init__(parts, chunk_size)
        type(self).made += 1
        self.first, self.steps = type(self).made == 1, 0

    def advance(self, best, asks):
        self.steps += 1
        if self.first and self.steps == 5:
            raise ShardLost("shard 1's node is gone")
        return super().advance(best, asks)


def test_a_lost_shard_restarts_the_seeding_with_the_same_centres():
    x = np.random.default_rng(1).normal(size=(900, 8)).astype(np.float32)

    def seeded():
        return np.random.default_rng(4)

    want = sharded_plusplus(x, 30, seeded, 128, shard_rows=300)
    _LosesAShard.made = 0
    got = sharded_plusplus(x, 30, seeded, 128, shard_rows=300, shards=_LosesAShard)
    assert _LosesAShard.made == 2 and got.tobytes() == want.tobytes()


class _Counts(LocalShards):
    calls: list = []

    def score(self, candidates, keep=False):
        self.calls.append("score+keep" if keep else "score")
        return super().score(candidates, keep)

    def commit(self, centre):
        self.calls.append("commit")
        return super().commit(centre)

    def advance(self, best, asks):
        self.calls.append("advance")
        return super().advance(best, asks)


def test_several_shards_take_two_calls_a_step_and_one_shard_stays_in_the_process():
    """Ray actors pay a round trip per call: several shards score (keeping the D^2) and advance; one shard (in
    the process) scores, commits and resolves as the single-process loop."""
    x = np.random.default_rng(3).normal(size=(600, 4)).astype(np.float32)

    def seeded():
        return np.random.default_rng(0)

    _Counts.calls = []
    sharded_plusplus(x, 10, seeded, 64, shard_rows=200, shards=_Counts)
    assert _Counts.calls == ["score+keep", "advance"] * 9 + ["score+keep"]
    _Counts.calls = []
    sharded_plusplus(x, 10, seeded, 64, shard_rows=600, shards=_Counts)
    assert _Counts.calls == []  # one shard: LocalShards itself, whatever the factory


def test_torch_shards_give_the_numpy_shards_centres():
    """The GPU shard's arithmetic, run by torch on the CPU here: the same calls and precisions as the numpy
    shard, so the same draws and centres (a GPU's products and sums round differently: not asserted here)."""
    from functools import partial

    from curate.kmeans_pp import DeviceShard, TorchPlusPlusShard

    x = np.random.default_rng(5).normal(size=(1200, 16)).astype(np.float32)

    def seeded():
        return np.random.default_rng(7)

    def torch_group(parts, chunk):
        return LocalShards(parts, chunk, make=partial(TorchPlusPlusShard, device="cpu"))

    for shard_rows in (400, 1200):  # three shards (score + advance), and one shard driven as several
        want = sharded_plusplus(x, 40, seeded, 96, shard_rows=shard_rows)
        got = sharded_plusplus(x, 40, seeded, 96, shard_rows=shard_rows, shards=torch_group)
        assert np.array_equal(got, want) and len({r.tobytes() for r in got}) == 40
    one = torch_group([x], 96)  # one shard through commit and resolve, as the single-process loop calls it
    ref = LocalShards([x], 96)
    for c in (x[3:4], x[900:901]):
        assert one.commit(c) == pytest.approx(ref.commit(c), rel=1e-6)  # float32 products: BLAS rounding
    residuals = np.array([0.0, 1.5, ref.shards[0].cum[-1] * 0.7])
    assert np.array_equal(one.resolve({0: residuals})[0][0], ref.resolve({0: residuals})[0][0])
    import torch

    assert DeviceShard(x, 96, gpu=True).on_gpu() == torch.cuda.is_available()  # a GPU asked: used when there
    assert not DeviceShard(x, 96, gpu=False).on_gpu()  # no GPU asked: numpy, whatever the machine has
