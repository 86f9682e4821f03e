"""Local verification of copy candidates (dedup.verify local) by jobs over buckets of embedding rows, as
the copy graph's own rounds (curate.copy_graph_parts): jobs run by any Mapper (local calls, or Ray tasks on
a shared disk) and exchange messages through files, so the caller holds O(parts + buckets + verification
jobs), never a hash, a candidate or a verdict per record.

Rounds (files under the stage's `_graph` folder):
1. hash, a job per slice of an embedding part: each usable row's image (valid, and it decodes) hashed by
   its content and its mirror (ShardImages.content_hashes); the hashes sent to value partitions, each
   row's global ingest row saved for the verification jobs.
2. values, a job per value partition (one per row bucket): equal hashes collapsed to their first (the
   content hash of the smallest row, before any mirror), which is linked to the others (distance 0), as
   curate.hashing.phash_pairs does over all content and mirror hashes at once.
3. search, a job per SEARCH_VALUES distinct values of a partition: each against all others within
   dedup.candidate_phash bits, pairs between the values' first rows (exact: FAISS binary range search,
   brute force: the radius defeats multi-index hashing); only each of its rows' max_pairs_per_image best
   are sent (at most that many per value, however many hashes lie within the radius), which drops only
   pairs that cannot count (`search_job`).
4. beside them, the embedding's k-NN candidates (candidate_k neighbours above candidate_cosine), sent as
   the copy graph's edges are (the caller's k-NN jobs).
5. cap, a job per row bucket: each row's candidates ranked by cost (pHash distance / 64, or 1 - cosine),
   then the other row; the best max_pairs_per_image kept on its side (the job holds its rows' best and
   one batch of messages at a time); 6. keep: a pair is kept when both its rows kept it.
7. verify, jobs of VERIFY_PAIRS_PER_JOB kept pairs (a bucket's pairs in one job without a mapper): local
   features decide; a pair too flat to judge is linked when its cosine is > the threshold; the links sent
   as the copy graph's edges.

The kept pairs and the verified edges are the ones curate.verify.candidate_pairs and verify_image_pairs
give over the whole pool held in one process (tests/pipelines/test_copy_verify.py), except that hashes
are searched among usable rows only: there, an unusable row with the same hash as usable ones could stand
for them and take their candidates with it. No job sees all of a pair's copies, so the candidates are
counted as found and sent by the search jobs and as messages to the cap jobs, not as distinct pairs (the
messages also depend on how the k-NN queries were cut into ranges: a pair found from both ends' ranges
comes twice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.copy_graph_parts import EDGE, bucket_of, receive, send, write_edges

HASH = pa.schema([("value", pa.uint64()), ("at", pa.int64())])  # at: the row, or n + row for a mirror hash
CAND = pa.schema([("u", pa.int64()), ("v", pa.int64()), ("cost", pa.float64())])
PAIR = pa.schema([("u", pa.int64()), ("v", pa.int64())])
HASH_ROWS_PER_JOB = 16384  # images decoded and hashed per job (at most one part's)
VERIFY_PAIRS_PER_JOB = 2048  # kept pairs verified per job
SEARCH_CHUNK = 4096  # hashes a search job queries at once at most
SEARCH_RESULTS = 1 << 22  # pairs one range search should return (near hashes can be many: fewer queries then)
SEARCH_VALUES = 1 << 18  # distinct hashes a search job queries (against all): the search's jobs side by side


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """The value partition of each hash (a multiplicative mix, so near hashes spread)."""
    mixed = np.asarray(values, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(partitions)).astype(np.int64)


def _paths(work: Path, step: str, names) -> list[Path]:
    return [work / step / f"{name}.arrow" for name in names]


def hash_job(work: str, ingest_dir: str, n: int, partitions: int, k: int, ingest_part: str, emb_part: str,
             valid_file: str, ingest_offset: int, row0: int, lo: int, hi: int) -> float:
    """Round 1 for rows lo .. hi - 1 of embedding part k (its first global row row0): content and mirror
    hashes of its usable rows sent to the value partitions; on the part's first job, the global ingest row
    of each of the part's rows saved (`inrows`). Returns the seconds spent hashing."""
    from curate.parts import atomic_path
    from pipelines.aligned import emb_positions
    from pipelines.copy_images import ShardImages

    w = Path(work)
    ingest_rows = emb_positions(ingest_part, emb_part)[1] + ingest_offset
    if lo == 0:
        (w / "inrows").mkdir(parents=True, exist_ok=True)
        with atomic_path(w / "inrows" / f"{k:06d}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, ingest_rows)
    usable = np.load(valid_file)[lo:hi]
    with ShardImages(ingest_dir, ingest_rows[lo:hi][usable]) as images:
        ph, mirror, decoded, seconds = images.content_hashes()
    rows = (np.flatnonzero(usable) + row0 + lo)[decoded]
    values = np.concatenate([ph[decoded], mirror[decoded]])
    at = np.concatenate([rows, rows + n])
    send(w / "hash" / f"{k:06d}_{lo:012d}.arrow", pa.table([values, at], schema=HASH),
         partition_of(values, partitions), partitions)
    return seconds


def _send_candidates(path: Path, u: np.ndarray, v: np.ndarray, cost: np.ndarray, bounds: np.ndarray) -> int:
    """Candidates (u, v, cost) between different rows, sent to both rows' buckets."""
    keep = u != v
    u, v, cost = u[keep], v[keep], np.asarray(cost, dtype=np.float64)[keep]
    table = pa.table([np.concatenate([u, v]), np.concatenate([v, u]), np.concatenate([cost, cost])], schema=CAND)
    send(path, table, bucket_of(bounds, table.column("u").to_numpy()), len(bounds) - 1)
    return int(keep.sum())


def values_job(work: str, hash_files: list[str], n: int, bounds: np.ndarray, p: int) -> int:
    """Round 2 for value partition p: its distinct values with their first hash (`values`), and every other
    hash of a value linked to the first at cost 0. Returns the distinct values."""
    w = Path(work)
    t = receive([Path(f) for f in hash_files], p, HASH)
    value, at = t.column("value").to_numpy(), t.column("at").to_numpy()
    order = np.lexsort((at, value))
    value, at = value[order], at[order]
    first = np.ones(len(value), dtype=bool)
    first[1:] = value[1:] != value[:-1]
    rep = at[first][np.cumsum(first) - 1]
    send(w / "values" / f"{p:06d}.arrow", pa.table([value[first], at[first]], schema=HASH),
         np.zeros(int(first.sum()), dtype=np.int64), 1)
    _send_candidates(w / "cand" / f"star{p:06d}.arrow", rep[~first] % n, at[~first] % n,
                     np.zeros(int((~first).sum())), bounds)
    return int(first.sum())


MERGE_ROWS = 1 << 20  # candidates gathered before they are ranked with the rows' best so far


class _Best:
    """Each row's best max_pairs candidates (mine, other, cost; rows 0 .. n - 1) over batches: one per other
    row at its lowest cost, ranked by (cost, other row), ranked again with the best so far whenever as many
    have gathered as it holds. The best of a union is the best of the parts' best, so it holds its rows'
    best plus one batch, however many candidates pass through."""

    def __init__(self, max_pairs: int, n: int) -> None:
        self.max_pairs, self.n, self.pending = max_pairs, n, []
        self.best = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def add(self, mine: np.ndarray, other: np.ndarray, cost: np.ndarray) -> None:
        keep = mine != other  # a row's content hash near its own mirror's is no candidate
        self.pending.append((mine[keep].astype(np.int64), other[keep].astype(np.int64),
                             np.asarray(cost, dtype=np.float64)[keep]))
        if sum(len(x[0]) for x in self.pending) >= max(MERGE_ROWS, len(self.best[0])):
            self._merge()

    def _merge(self) -> None:
        from curate.verify import best_per_pair, row_ranks

        if self.pending:
            mine, other, cost = best_per_pair(*(np.concatenate([x[c] for x in (self.best, *self.pending)])
                                                for c in range(3)), self.n)
            keep = row_ranks(mine, other, cost) < self.max_pairs
            self.best, self.pending = (mine[keep], other[keep], cost[keep]), []

    def result(self) -> tuple[np.ndarray, ...]:
        self._merge()
        return self.best


def search_job(work: str, max_distance: int, max_pairs: int, n: int, bounds: np.ndarray, partitions: int,
               p: int, lo: int, hi: int) -> tuple[int, int]:
    """Round 3 for values lo .. hi - 1 of value partition p: each against every distinct value of all
    partitions within max_distance bits (FAISS binary range search, one partition at a time), a found pair
    costing distance / 64 between the values' first rows; sent: each of their rows' best max_pairs. A pair
    is found from both ends, and each end's job sees all of that end's pHash pairs through that hash: a
    pair sent by neither is among the best of neither row (those found rank before it there too), so it is
    not kept and takes no row's place in the ranking. A job sends at most max_pairs pairs per value.
    Returns the pairs found and those sent."""
    import faiss

    from curate.hashing import as_codes

    w = Path(work)
    a = receive(_paths(w, "values", [f"{p:06d}"]), 0, HASH)
    va, ra = a.column("value").to_numpy()[lo:hi], a.column("at").to_numpy()[lo:hi] % n
    best, found_all = _Best(max_pairs, n), 0
    for q in range(partitions if len(va) and max_distance > 0 else 0):
        b = a if q == p else receive(_paths(w, "values", [f"{q:06d}"]), 0, HASH)
        rb = b.column("at").to_numpy() % n
        index = faiss.IndexBinaryFlat(64)
        index.add(as_codes(b.column("value").to_numpy()))
        s, chunk = 0, 256
        while s < len(va):  # query chunks sized so that a search returns about SEARCH_RESULTS pairs
            lims, dist, found = index.range_search(as_codes(va[s:s + chunk]), min(max_distance, 64) + 1)
            query = np.repeat(np.arange(s, min(s + chunk, len(va))), np.diff(lims).astype(np.int64))
            other = found != query + lo if q == p else np.ones(len(found), dtype=bool)  # not the value itself
            found_all += int(other.sum())
            best.add(ra[query[other]], rb[found[other]], dist[other] / 64.0)
            s += chunk
            chunk = int(np.clip(chunk * SEARCH_RESULTS / max(len(found), 1), 1, SEARCH_CHUNK))
    mine, far, cost = best.result()
    return found_all, _send_candidates(w / "cand" / f"near{p:06d}_{lo:012d}.arrow", mine, far, cost, bounds)


def cap_job(work: str, files: list[str], knn_files: list[str], bounds: np.ndarray, max_pairs: int,
            b: int) -> tuple[int, int]:
    """Round 5 for row bucket b: each of its rows' best max_pairs candidates (one per other row, at its
    lowest cost, ranked by (cost, other row); read a file at a time, `_Best`) sent to the pair's smaller
    row's bucket. Returns the messages received and the pairs this side kept."""
    w = Path(work)
    best, received = _Best(max_pairs, int(bounds[-1])), 0
    for path, schema in [(Path(f), CAND) for f in files] + [(Path(f), EDGE) for f in knn_files]:
        t = receive([path], b, schema)
        cost = t.column("cost").to_numpy() if schema is CAND else 1.0 - t.column("sim").to_numpy().astype(np.float64)
        best.add(t.column("u").to_numpy(), t.column("v").to_numpy(), cost)
        received += len(t)
    mine, other, _ = best.result()
    u, v = np.minimum(mine, other), np.maximum(mine, other)
    send(w / "capped" / f"{b:06d}.arrow", pa.table([u, v], schema=PAIR), bucket_of(bounds, u), len(bounds) - 1)
    return received, len(u)


def keep_job(work: str, buckets: int, b: int) -> int:
    """Round 6 for row bucket b: the pairs (smaller row here) both rows kept, sorted, saved (`kept`)."""
    w = Path(work)
    t = receive(_paths(w, "capped", [f"{s:06d}" for s in range(buckets)]), b, PAIR)
    u, v = t.column("u").to_numpy(), t.column("v").to_numpy()
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    twice = np.zeros(len(u), dtype=bool)
    twice[1:] = (u[1:] == u[:-1]) & (v[1:] == v[:-1])  # a pair kept by both sides comes twice
    u, v = u[twice], v[twice]
    send(w / "kept" / f"{b:06d}.arrow", pa.table([u, v], schema=PAIR), np.zeros(len(u), dtype=np.int64), 1)
    return len(u)


def verify_job(work: str, ingest_dir: str, emb_dir: str, starts: np.ndarray, settings, threshold: float,
               bounds: np.ndarray, b: int, lo: int, hi: int) -> dict:
    """Round 7: kept pairs lo .. hi - 1 of bucket b verified (images read by their ingest rows, which the
    parts' `inrows` files hold; `starts`: the parts' first rows); verified pairs, and pairs too flat to judge
    whose cosine is > threshold, sent as edges (share, or cosine). Returns the verification's stats."""
    from curate.dedup import as_parts, pair_sims
    from pipelines.copy_images import verify_job as verify_rows

    w = Path(work)
    t = receive(_paths(w, "kept", [f"{b:06d}"]), 0, PAIR).slice(lo, hi - lo)
    i, j = t.column("u").to_numpy(), t.column("v").to_numpy()
    used = np.union1d(i, j)
    part = np.searchsorted(starts, used, side="right") - 1
    ingest_rows = np.empty(len(used), dtype=np.int64)
    for k in np.unique(part):
        sel = part == k
        inrows = np.load(w / "inrows" / f"{int(k):06d}.npy", mmap_mode="r")
        ingest_rows[sel] = inrows[used[sel] - starts[k]]
    res = verify_rows((ingest_dir,), settings, used, np.zeros(len(used), dtype=np.int64), ingest_rows, i, j)
    parts = as_parts(emb_dir)
    sims = pair_sims(parts, res.i, parts, res.j)
    flat = res.abstained & (sims > threshold)
    take = res.verified | flat
    write_edges(w / "edges" / f"{b:06d}_{lo:012d}.arrow",
                (res.i[take], res.j[take], np.where(res.verified, res.share, sims)[take].astype(np.float32)), bounds)
    return {**res.stats, "linked": int(res.verified.sum()), "flat": int(flat.sum())}


def _merge_stats(stats: list[dict]) -> dict:
    """The verification jobs' stats added up (as curate.verify.merge_results does, but for "images":
    distinct images are not counted across jobs)."""
    out: dict = {"pairs": sum(s["pairs"] for s in stats), "verified": sum(s["verified"] for s in stats),
                 "pieces": len(stats)}
    for key in ("features_computed", "seconds", "feature_seconds", "match_seconds"):
        out[key] = round(sum(s.get(key, 0) for s in stats), 3)
    out["ms_per_pair"] = round(1000 * out["seconds"] / max(out["pairs"], 1), 2)
    reasons: dict[str, int] = {}
    for s in stats:
        for k, v in s.get("reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    out["reasons"] = dict(sorted(reasons.items()))
    out["abstained"] = sum(s["abstained"] for s in stats)
    return out


def verified_edge_files(work: str | Path, layout, ingest_offsets: np.ndarray, valid_files: list[str],
                        knn_files: list[str], bounds: np.ndarray, dc, settings, threshold: float, emb_dir: str,
                        ingest_dir: str, mapper=None) -> tuple[list[str], dict]:
    """Rounds 1-3 and 5-7 (the caller wrote the k-NN candidates to `knn_files` with write_edges): the edge
    files for curate.copy_graph_parts.group_edge_files, and the manifest's record of the verification
    (candidates, content_hash_seconds, verify_stats, linked). `layout`: pipelines.aligned.EmbeddingLayout;
    `ingest_offsets`: the ingest parts' first global rows; `dc`: the dedup settings."""
    from curate.parts import map_in_order

    w = Path(work)
    n, buckets = int(bounds[-1]), len(bounds) - 1
    partitions = max(1, buckets)
    jobs = []
    for k in range(len(layout.emb_parts)):
        size = int(layout.sizes[k])
        for lo in range(0, max(size, 1), HASH_ROWS_PER_JOB):  # an empty part's job saves its (empty) inrows
            jobs.append((k, str(layout.ingest_parts[k]), str(layout.emb_parts[k]), valid_files[k],
                         int(ingest_offsets[k]), int(layout.offsets[k]), lo, min(lo + HASH_ROWS_PER_JOB, size)))
    hash_files = [str(w / "hash" / f"{job[0]:06d}_{job[6]:012d}.arrow") for job in jobs]
    hash_seconds = sum(map_in_order(mapper, hash_job, jobs, (str(w), str(ingest_dir), n, partitions)))
    distinct = map_in_order(mapper, values_job, [(p,) for p in range(partitions)], (str(w), hash_files, n, bounds))
    sjobs = [(p, lo, min(lo + SEARCH_VALUES, distinct[p])) for p in range(partitions)
             for lo in range(0, distinct[p], SEARCH_VALUES)]
    searched = map_in_order(mapper, search_job, sjobs,
                            (str(w), dc.candidate_phash, dc.max_pairs_per_image, n, bounds, partitions))
    cand = [str(w / "cand" / f"star{p:06d}.arrow") for p in range(partitions)] + \
        [str(w / "cand" / f"near{p:06d}_{lo:012d}.arrow") for p, lo, _ in sjobs]
    capped = map_in_order(mapper, cap_job, [(b,) for b in range(buckets)],
                          (str(w), cand, [str(f) for f in knn_files], bounds, dc.max_pairs_per_image))
    kept = map_in_order(mapper, keep_job, [(b,) for b in range(buckets)], (str(w), buckets))
    # tasks of VERIFY_PAIRS_PER_JOB pairs side by side; here, a bucket's pairs in one job (one feature cache:
    # an image's features computed once, not once per piece)
    size = [VERIFY_PAIRS_PER_JOB if mapper is not None else max(1, k) for k in kept]
    vjobs = [(b, lo, min(lo + size[b], kept[b])) for b in range(buckets) for lo in range(0, kept[b], size[b])]
    stats = map_in_order(mapper, verify_job, vjobs, (str(w), str(ingest_dir), str(emb_dir),
                                                     np.asarray(layout.offsets[:-1]), settings, threshold, bounds))
    files = [str(w / "edges" / f"{b:06d}_{lo:012d}.arrow") for b, lo, _ in vjobs]
    info = {"candidates": {"found_by_search": sum(found for found, _ in searched),
                           "sent_by_search": sum(sent for _, sent in searched),
                           "messages": sum(m for m, _ in capped), "kept": sum(kept),
                           "max_pairs_per_image": dc.max_pairs_per_image},
            "content_hash_seconds": round(hash_seconds, 2), "verify_stats": _merge_stats(stats),
            "linked": {"verified": sum(s["linked"] for s in stats), "too_flat_cosine": sum(s["flat"] for s in stats)}}
    return files, info


def whole_pool(cfg, ingest_dir: str | Path, emb_dir: str | Path, threshold: float) -> dict:
    """The same verification over the whole pool in one process (what the dedup stage ran before these
    jobs): content hashes, pHash and k-NN candidates, curate.verify.candidate_pairs' cap and
    verify_image_pairs. The reference tests/pipelines/test_copy_verify.py and bench/copy_verify.py compare
    the jobs with. Returns the edges, the cap's stats, the VerifyResult, the usable rows' pHash candidates
    (i, j) and their content and mirror hashes."""
    from curate.dedup import as_parts, pair_sims, valid_rows
    from curate.verify import candidate_pairs, embedding_candidates, phash_candidates
    from pipelines.aligned import RowMap
    from pipelines.copy_images import content_hashes, verify_image_pairs, verify_settings

    dc = cfg.dedup
    parts = as_parts(str(emb_dir))
    valid = valid_rows(parts)
    emb_rows = RowMap(ingest_dir, emb_dir).emb_rows
    ph, mirror, decoded, _ = content_hashes(ingest_dir, emb_rows)
    i, j, cost = phash_candidates(ph, dc.candidate_phash, mirror)
    usable = decoded & valid
    take = usable[i] & usable[j]
    knn = embedding_candidates(str(emb_dir), dc.candidate_k, dc.candidate_cosine, valid=valid)
    ci, cj, stats = candidate_pairs(parts.n, knn, (i[take], j[take], cost[take]),
                                    max_pairs_per_image=dc.max_pairs_per_image)
    res = verify_image_pairs([(ingest_dir, emb_rows)], ci, cj, verify_settings(cfg))
    sims = pair_sims(parts, res.i, parts, res.j)
    link = res.verified | (res.abstained & (sims > threshold))
    edges = (res.i[link], res.j[link], np.where(res.verified, res.share, sims)[link].astype(np.float32))
    return {"edges": edges, "stats": stats, "result": res, "hashed": (i[take], j[take]),
            "codes": np.concatenate([ph[usable], mirror[usable]])}
