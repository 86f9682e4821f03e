"""Greedy k-means++ with the loop on every shard (SPMD, as ssl-data-curation's distributed init runs it over
GPUs): each shard's process runs the same seeded loop and the shards exchange what the loop needs through two
collectives a step (torch.distributed over gloo: a few KB a step, whether the shards sit on GPUs or CPUs),
with no round trip to a driver.

A step, on every shard at once: score the candidates (keeping the D^2 each would leave); all-gather the
shards' potentials and add them in shard order (every shard gets the same sums, and the same sums as
curate.kmeans_pp's driver loop); take the best; draw the next candidates from the same seeded generator
(every shard draws the same numbers); the shard holding a drawn row puts its vector in place, and an
all-reduce of the vectors' bit patterns as int32 (zero from every other shard: an exact copy, -0.0
included) gives every shard the candidates. So the centres are the driver loop's, byte for byte.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from curate.kmeans_pp import DeviceShard, draw

COLLECTIVE_TIMEOUT_S = 600  # a shard that waits longer for the others in a collective gives up (a lost peer)


class TorchComm:
    """The two collectives over a gloo process group of one seeding (this process's rank): CPU tensors,
    whatever holds the shard (NCCL would refuse two ranks on one GPU, as shards sharing a GPU are)."""

    def __init__(self, rank: int, world: int, address: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.world = torch, dist, world
        dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))

    def all_gather(self, a: np.ndarray) -> list[np.ndarray]:
        """Every rank's array (all of one shape and dtype), in rank order."""
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        out = [self.torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return [o.numpy() for o in out]

    def exact_sum(self, a: np.ndarray) -> np.ndarray:
        """float32 rows that exactly one rank fills (the others give zeros): summed as int32 bit patterns."""
        t = self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).view(np.int32).copy())
        self.dist.all_reduce(t)
        return t.numpy().view(np.float32)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def seed_spmd(shard, rank: int, bounds: np.ndarray, k: int, d: int, rng: np.random.Generator, trials: int,
              comm) -> np.ndarray:
    """The k centres, on every rank: this rank's `shard` (a kmeans_pp shard over rows bounds[rank]..bounds[rank
    + 1]) and `comm` (all_gather, exact_sum). `rng` must be in the same state on every rank."""
    m = int(bounds[-1])
    centers = np.empty((k, d), dtype=np.float32)

    def fetch(row: int) -> np.ndarray:  # the vector of one global row, from its shard, on every rank
        v = np.zeros((1, d), dtype=np.float32)
        owner = int(np.searchsorted(bounds, row, side="right") - 1)
        if owner == rank:
            v[:] = shard.rows(np.array([row - bounds[owner]]))
        return comm.exact_sum(v)

    cand = fetch(int(rng.integers(m)))
    for i in range(k):
        scores = comm.all_gather(np.asarray(shard.score(cand, True), dtype=np.float64))
        potential = np.zeros(len(cand))
        for p in scores:  # in shard order, as the driver loop adds them
            potential += p
        best = int(np.argmin(potential))
        centers[i] = cand[best]
        if i + 1 == k:
            break
        totals = np.cumsum([float(p[best]) for p in scores])
        if totals[-1] > 0:
            which, residual = draw(rng, totals, trials)
            _, vecs = shard.advance(best, residual[which == rank])
            mine = np.zeros((trials, d), dtype=np.float32)
            mine[which == rank] = vecs
            cand = comm.exact_sum(mine)
        else:  # every point sits on a centre: any point
            shard.advance(best, np.zeros(0))
            cand = fetch(int(rng.integers(m, size=1)[0]))
    return centers


def free_address(host: str) -> str:
    """host:port with a port of `host` free now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


class SpmdShard(DeviceShard):
    """A DeviceShard that runs the whole seeding with its peers (one process per shard, e.g. a Ray actor):
    `rendezvous` on rank 0 gives the address, `join` on every rank (at once) makes the group, `seed` on
    every rank (at once) returns the centres (the same on every rank)."""

    def rendezvous(self, host: str = "127.0.0.1") -> str:
        """An address for the group on this process's machine, reachable by the peers at `host`."""
        return free_address(host)

    def join(self, rank: int, world: int, address: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> int:
        self.rank, self.comm = rank, TorchComm(rank, world, address, timeout_s)
        return rank

    def seed(self, bounds: np.ndarray, k: int, d: int, rng: np.random.Generator, trials: int) -> np.ndarray:
        try:
            return seed_spmd(self.impl, self.rank, bounds, k, d, rng, trials, self.comm)
        finally:
            self.comm.close()
