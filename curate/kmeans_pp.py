"""Greedy k-means++ seeding with the rows cut into shards: the loop on one process, the distance work on
the shards (in the process, or one Ray actor per shard over a cluster, on a GPU when the actor has one:
TorchPlusPlusShard, the same calls in torch).

Each step of greedy k-means++ (scikit-learn's `_kmeans_plusplus`; ssl-data-curation's
`distributed_kmeans_plusplus_init` does the same over GPUs) draws a few candidates by D^2 sampling,
keeps the one that lowers the potential most and lowers every point's D^2 (squared distance to its
nearest centre) to it. The rows are cut into shards of `shard_rows` consecutive rows: a setting that
decides the result, whatever runs the shards. A shard holds its rows, their squared norms, their D^2
and its running sum of D^2. One shard answers three calls per step, as the single-process loop computes:

- `score(candidates)`: per candidate, the shard's potential were it added: sum of min(D^2, d^2), chunk by chunk;
- `commit(centre)`: D^2 <- min(D^2, d^2 to the centre); returns the shard's total (the last running sum);
- `resolve(residuals)`: the rows where the running sum passes each residual (searchsorted, right), and
  their vectors (the next step's candidates).

Several shards answer two, to save a round trip a step when they are Ray actors: `score(candidates,
keep=True)` also keeps the D^2 each candidate would leave (rows x candidates float64, ~120 B a row at
k = 500k), and `advance(best, residuals)` takes the best one's and resolves; the shard totals of the
draw are then the best candidate's scores.

A candidate is drawn as in the single-process loop (a uniform times the total potential, searched in the
running sum of D^2) in two stages: the shard in the running sum of the shard totals, then the row in the
shard's own. With one shard every number is the single-process loop's, so the centres are byte-identical;
with several, the draws differ only by rounding (the same distribution), and local and Ray shards give
the same centres (the same arithmetic per shard, added in shard order).

Per step the driver exchanges a few candidate vectors with the shards; the D^2 of the points stay on
the shards. A shard lost with its node (`ShardLost`) restarts the seeding from the
first centre on fresh shards: the draws are seeded, so the centres are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

PP_SHARD_ROWS = 262_144  # rows per k-means++ shard: up to this many points, one shard (the single-process loop)
PP_RESTARTS = 3  # fresh starts after a lost shard before the error is raised


class ShardLost(RuntimeError):
    """A shard's process died (its node lost): the seeding starts again on fresh shards."""


def sq_to(x: np.ndarray, sq: np.ndarray, c: np.ndarray, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Squared distances of the rows of x to the rows of c, chunk of rows by chunk of rows (float64)."""
    csq = np.einsum("ij,ij->i", c, c)
    for a in range(0, len(x), chunk_size):
        block = sq[a : a + chunk_size, None] - 2 * (x[a : a + chunk_size] @ c.T) + csq[None]
        yield a, np.maximum(block, 0, dtype=np.float64)


class PlusPlusShard:
    """Consecutive rows of the seeding's points and their D^2 (inf until the first centre)."""

    def __init__(self, x: np.ndarray, chunk_size: int, blas_threads: int | None = None) -> None:
        if blas_threads is not None:  # an actor's own process: limit its BLAS once, for all its calls
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(limits=blas_threads, user_api="blas")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.sq = np.einsum("ij,ij->i", self.x, self.x)
        self.d2 = np.full(len(self.x), np.inf)
        self.cum = np.zeros(0)
        self.kept: np.ndarray | None = None  # the scored candidates' D^2, several shards only
        self.chunk = chunk_size

    def score(self, candidates: np.ndarray, keep: bool = False) -> np.ndarray:
        """float64 [c]: the shard's potential with each candidate added; with `keep`, the D^2 each candidate
        would leave are kept (m x c float64) for `advance`."""
        potential = np.zeros(len(candidates))
        self.kept = np.empty((len(self.x), len(candidates))) if keep else None
        for a, block in sq_to(self.x, self.sq, candidates, self.chunk):
            low = np.minimum(block, self.d2[a : a + len(block), None])
            potential += low.sum(axis=0)
            if keep:
                self.kept[a : a + len(block)] = low
        return potential

    def advance(self, best: int, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add scored candidate `best` to the centres (its kept D^2), then `resolve` the residuals."""
        self.d2, self.kept = self.kept[:, best].copy(), None
        self.cum = np.cumsum(self.d2)
        return self.resolve(residuals)

    def commit(self, centre: np.ndarray) -> float:
        """Add centre ([1, d]) to the centres; the shard's total potential after it."""
        for a, block in sq_to(self.x, self.sq, centre, self.chunk):
            np.minimum(self.d2[a : a + len(block)], block[:, 0], out=self.d2[a : a + len(block)])
        self.cum = np.cumsum(self.d2)
        return float(self.cum[-1])

    def resolve(self, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows (clipped to the shard) where the running sum of D^2 passes each residual, and their vectors."""
        rows = np.minimum(np.searchsorted(self.cum, residuals, side="right"), len(self.x) - 1)
        return rows, self.x[rows]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows]


class TorchPlusPlusShard:
    """PlusPlusShard on a torch device (a GPU: the shard's rows, D^2 and running sum stay in its memory). The
    same arithmetic in the same precisions (float32 products, float64 D^2 and sums), but a GPU's matrix
    products and running sums round differently from numpy's, so GPU shards' centres differ from CPU
    shards' by rounding (the same distribution)."""

    def __init__(self, x: np.ndarray, chunk_size: int, device: str = "cuda") -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)
        self.sq = (self.x * self.x).sum(dim=1)
        self.d2 = torch.full((len(self.x),), float("inf"), dtype=torch.float64, device=self.device)
        self.cum = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.kept = None
        self.chunk = chunk_size

    def _sq_to(self, c: np.ndarray):
        c = self.torch.as_tensor(np.ascontiguousarray(c, dtype=np.float32), device=self.device)
        csq = (c * c).sum(dim=1)
        for a in range(0, len(self.x), self.chunk):
            block = self.sq[a : a + self.chunk, None] - 2 * (self.x[a : a + self.chunk] @ c.T) + csq[None]
            yield a, block.double().clamp_min(0)

    def score(self, candidates: np.ndarray, keep: bool = False) -> np.ndarray:
        potential = self.torch.zeros(len(candidates), dtype=self.torch.float64, device=self.device)
        self.kept = self.torch.empty((len(self.x), len(candidates)), dtype=self.torch.float64,
                                     device=self.device) if keep else None
        for a, block in self._sq_to(candidates):
            low = self.torch.minimum(block, self.d2[a : a + len(block), None])
            potential += low.sum(dim=0)
            if keep:
                self.kept[a : a + len(block)] = low
        return potential.cpu().numpy()

    def advance(self, best: int, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.d2, self.kept = self.kept[:, best].clone(), None
        self.cum = self.torch.cumsum(self.d2, dim=0)
        return self.resolve(residuals)

    def commit(self, centre: np.ndarray) -> float:
        for a, block in self._sq_to(centre):
            self.d2[a : a + len(block)] = self.torch.minimum(self.d2[a : a + len(block)], block[:, 0])
        self.cum = self.torch.cumsum(self.d2, dim=0)
        return float(self.cum[-1])

    def resolve(self, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.torch.as_tensor(np.asarray(residuals, dtype=np.float64), device=self.device)
        rows = self.torch.searchsorted(self.cum, r, right=True).clamp_max(len(self.x) - 1)
        return rows.cpu().numpy(), self.x[rows].cpu().numpy()

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.x[self.torch.as_tensor(rows, device=self.device)].cpu().numpy()


def cuda_available() -> bool:
    """Whether this process sees a CUDA device torch can use (without importing torch when not installed)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the trainer
        return False
    return torch.cuda.is_available()


class DeviceShard:
    """One shard in the process that holds it (a Ray actor): on the GPU the process sees when `gpu` and one is
    there (TorchPlusPlusShard), else in numpy on `blas_threads` threads (PlusPlusShard)."""

    def __init__(self, x: np.ndarray, chunk_size: int, blas_threads: int | None = None, gpu: bool = False) -> None:
        self.impl = TorchPlusPlusShard(x, chunk_size, "cuda") if gpu and cuda_available() else \
            PlusPlusShard(x, chunk_size, blas_threads)

    def on_gpu(self) -> bool:
        return isinstance(self.impl, TorchPlusPlusShard)

    def score(self, candidates: np.ndarray, keep: bool = False) -> np.ndarray:
        return self.impl.score(candidates, keep)

    def advance(self, best: int, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.impl.advance(best, residuals)

    def commit(self, centre: np.ndarray) -> float:
        return self.impl.commit(centre)

    def resolve(self, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.impl.resolve(residuals)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self.impl.rows(rows)


class ShardGroup(Protocol):
    """The shards of one seeding; every call answers in shard order."""

    def score(self, candidates: np.ndarray, keep: bool = False) -> list[np.ndarray]: ...

    def commit(self, centre: np.ndarray) -> list[float]: ...

    def resolve(self, asks: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]: ...

    def advance(self, best: int, asks: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]: ...

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...

    # optional: seed_all(bounds, k, d, rng, trials) -> centres, the whole loop run by the shards themselves


ShardFactory = Callable[[Sequence[np.ndarray], int], ShardGroup]  # (the shards' rows, chunk_size) -> group


@dataclass(frozen=True)
class PlusPlus:
    """How k-means++ runs: rows per shard (decides the centres) and what runs the shards (None: this process)."""

    shard_rows: int = PP_SHARD_ROWS
    shards: ShardFactory | None = None


class LocalShards:
    """The shards in this process (their rows are views of the caller's array); `make` builds one shard
    (PlusPlusShard, or e.g. a TorchPlusPlusShard on a device)."""

    def __init__(self, parts: Sequence[np.ndarray], chunk_size: int, make: Callable = PlusPlusShard) -> None:
        self.shards = [make(p, chunk_size) for p in parts]

    def score(self, candidates: np.ndarray, keep: bool = False) -> list[np.ndarray]:
        return [s.score(candidates, keep) for s in self.shards]

    def advance(self, best: int, asks: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {i: s.advance(best, asks[i]) for i, s in enumerate(self.shards)}

    def commit(self, centre: np.ndarray) -> list[float]:
        return [s.commit(centre) for s in self.shards]

    def resolve(self, asks: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {s: self.shards[s].resolve(r) for s, r in asks.items()}

    def rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        return self.shards[shard].rows(rows)

    def close(self) -> None:
        self.shards = []


def shard_bounds(m: int, shard_rows: int) -> np.ndarray:
    """int64 [S + 1]: row offsets of ceil(m / shard_rows) shards of near-equal size."""
    if shard_rows < 1:
        raise ValueError(f"k-means++ shards need >= 1 row each (cluster.pp_shard_rows), got {shard_rows}")
    s = max(1, -(-m // shard_rows))
    return np.array([m * i // s for i in range(s + 1)], dtype=np.int64)


def draw(rng: np.random.Generator, totals: np.ndarray, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """The next candidates by D^2 sampling over shards whose potentials run to `totals` (cumulative, > 0 at
    the end): each draw's shard and its residual within that shard's running sum of D^2."""
    t = rng.random(trials) * totals[-1]
    which = np.minimum(np.searchsorted(totals, t, side="right"), len(totals) - 1)
    return which, t - np.concatenate([[0.0], totals[:-1]])[which]


def _seed_once(group: ShardGroup, bounds: np.ndarray, k: int, d: int, rng: np.random.Generator,
               trials: int) -> np.ndarray:
    m, n_shards = int(bounds[-1]), len(bounds) - 1
    centers = np.empty((k, d), dtype=np.float32)
    first = int(rng.integers(m))
    shard = int(np.searchsorted(bounds, first, side="right") - 1)
    cand = group.rows(shard, np.array([first - bounds[shard]]))
    fused = n_shards > 1  # two calls a step: score (keeping the D^2), then advance (commit + resolve)
    for i in range(k):
        potential = np.zeros(len(cand))
        scores = group.score(cand, fused)
        for p in scores:  # in shard order: one shard gives its own sums exactly
            potential += p
        best = int(np.argmin(potential))
        centers[i] = cand[best]
        if fused:
            if i + 1 == k:
                break
            totals = np.cumsum([float(p[best]) for p in scores])  # each shard's potential with `best` added
        else:
            totals = np.cumsum(group.commit(cand[best : best + 1]))
            if i + 1 == k:
                break
        if totals[-1] > 0:
            which, residual = draw(rng, totals, trials)
            asks = {int(s): residual[which == s] for s in (range(n_shards) if fused else np.unique(which))}
            got = group.advance(best, asks) if fused else group.resolve(asks)
            cand = np.empty((trials, d), dtype=np.float32)
            for s, (_, vecs) in got.items():
                cand[which == s] = vecs
        else:  # every point sits on a centre: any point
            if fused:
                group.advance(best, {s: np.zeros(0) for s in range(n_shards)})
            row = int(rng.integers(m, size=1)[0])
            shard = int(np.searchsorted(bounds, row, side="right") - 1)
            cand = group.rows(shard, np.array([row - bounds[shard]]))
    return centers


def sharded_plusplus(x: np.ndarray, k: int, rng_of: Callable[[], np.random.Generator], chunk_size: int,
                     n_candidates: int | None = None, shard_rows: int = PP_SHARD_ROWS,
                     shards: ShardFactory | None = None) -> np.ndarray:
    """k greedy k-means++ centres of the rows of x (float32 [m, d]), the rows cut into shards of at most
    `shard_rows` rows, run by `shards` (LocalShards when None, or when there is one shard); rng_of() gives
    the seeded generator of one attempt (a lost shard restarts from it)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = len(x)
    if k > m:
        raise ValueError(f"k-means++ needs at least k={k} points, got {m}")
    trials = n_candidates or 2 + int(np.log(k))
    bounds = shard_bounds(m, shard_rows)
    parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    make = shards if shards is not None and len(parts) > 1 else LocalShards  # one shard: nothing to spread
    for attempt in range(PP_RESTARTS + 1):
        group = make(parts, chunk_size)
        try:
            seed_all = getattr(group, "seed_all", None)  # shards that run the loop themselves (kmeans_pp_spmd)
            if seed_all is not None:
                return seed_all(bounds, k, x.shape[1], rng_of(), trials)
            return _seed_once(group, bounds, k, x.shape[1], rng_of(), trials)
        except ShardLost:
            if attempt == PP_RESTARTS:
                raise
        finally:
            group.close()
    raise AssertionError("unreachable")
