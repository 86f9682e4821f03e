"""Hash dedup split into bands, for executors that spread it over tasks; the same outcome as
curate.hashing.dedup over all records, exactly.

Map (per group of ingest parts): the ok rows go to bands: by their sha256 (equal hashes share a band)
and, for each of the max_distance + 1 disjoint bit fields of the pHash, by the field's value (two
hashes within max_distance agree on at least one field: pigeonhole). Reduce (per band): the links
inside the band (equal sha256; pHash pairs within max_distance). Every linked pair shares a band, so
the union of the bands' links has the components of `dedup`'s links; only records with a link are
gathered to choose keepers (`link_keepers`, as Arrow and numpy columns), and each part is written by its
own task (`write_outcome`).

`dedup_spilled` runs the same map/reduce in one process with the bands spilled to disk: memory is
bounded by one band (and the records that have a link), not by the pool.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.groups import arrow_id_ranks, pick_keepers
from curate.hashing import hamming_u64, phash_pairs
from curate.parts import ensure_dir, local_map, map_in_order, part_name, write_table_atomic

MIN_FIELD_BITS = 4  # narrower pHash fields would put most records in a few bands: use one band then
_EMPTY = np.empty(0, np.int64)


def phash_fields(max_distance: int) -> list[tuple[int, int]]:
    """Disjoint bit fields (shift, width) of the 64-bit pHash such that two hashes within max_distance
    agree on one of them; [] when pHash links are off, one empty field when fields would be too narrow."""
    if max_distance < 0:
        return []
    m = max_distance + 1
    if 64 // m < MIN_FIELD_BITS:
        return [(0, 0)]
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def _mix(v: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads field values and sha prefixes evenly over bands."""
    v = np.asarray(v, dtype=np.uint64)
    with np.errstate(over="ignore"):
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def band_kinds(max_distance: int, exact: bool, n_bands: int) -> list[str]:
    """The kind ("sha" or "phash") of each band `map_bands` returns, in its order: n_bands for sha256
    (when exact), then n_bands per pHash field."""
    return ["sha"] * (n_bands if exact else 0) + ["phash"] * (n_bands * len(phash_fields(max_distance)))


def map_bands(parts: Sequence[tuple[str, int]], max_distance: int, exact: bool, n_bands: int) -> list[tuple]:
    """Map step over ingest parts given as (path, global row of its first record): the ok rows split by
    band; returns one (rows, keys) pair per band of `band_kinds`."""
    rows, sha, phash = [], [], []
    for path, offset in parts:
        t = pq.read_table(path, columns=["status", "sha256", "phash"])
        ok = pc.equal(t.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool)
        pos = np.flatnonzero(ok)
        rows.append(pos.astype(np.int64) + offset)
        sha.append(np.asarray(t.column("sha256").take(pa.array(pos)).fill_null("").to_numpy(zero_copy_only=False),
                              dtype="S64"))
        phash.append(t.column("phash").take(pa.array(pos)).to_numpy(zero_copy_only=False).astype(np.uint64))
    rows_a = np.concatenate(rows) if rows else _EMPTY
    sha_a = np.concatenate(sha) if sha else np.empty(0, "S64")
    ph = np.concatenate(phash) if phash else np.empty(0, np.uint64)
    out: list[tuple] = []
    if exact:
        known = sha_a != b""
        prefix = np.ascontiguousarray(sha_a[known]).view(np.uint64).reshape(-1, 8)[:, 0]  # 8 hex digits' bytes
        out += _split(rows_a[known], sha_a[known], _mix(prefix) % np.uint64(n_bands), n_bands)
    for shift, width in phash_fields(max_distance):
        field = (ph >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        out += _split(rows_a, ph, _mix(field) % np.uint64(n_bands), n_bands)
    return out


def _split(rows: np.ndarray, keys: np.ndarray, band: np.ndarray, n_bands: int) -> list[tuple]:
    order = np.argsort(band, kind="stable")
    bounds = np.searchsorted(band[order], np.arange(n_bands + 1, dtype=np.uint64))
    return [(rows[order[a:b]], keys[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def band_links(kind: str, max_distance: int, *chunks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Reduce step of one band (its chunk from every map task): linked row pairs, by equal sha256
    (`kind` "sha") or pHash within max_distance ("phash")."""
    rows = np.concatenate([c[0] for c in chunks]) if chunks else _EMPTY
    if len(rows) < 2:
        return _EMPTY, _EMPTY
    keys = np.concatenate([c[1] for c in chunks])
    if kind == "sha":
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        src = first[inverse.reshape(-1)]
        linked = src != np.arange(len(keys))
        return rows[src[linked]], rows[linked]
    i, j, _ = phash_pairs(keys, max_distance)
    return rows[i], rows[j]


def gather_rows(path: str, positions: np.ndarray) -> dict:
    """The records at `positions` of one ingest part, to choose keepers: id (an Arrow string array: no
    Python object per record), phash and pixels."""
    t = pq.read_table(path, columns=["id", "phash", "width", "height"]).take(pa.array(positions, pa.int64()))
    pixels = (t.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
              * t.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
    return {"id": t.column("id").combine_chunks().cast(pa.string()),
            "phash": t.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64), "pixels": pixels}


def write_dup_part(ingest_part: str | os.PathLike, out: str | os.PathLike, positions: np.ndarray,
                   dup_of: Sequence[str | None], reason: Sequence[str | None], group: np.ndarray,
                   distance: np.ndarray) -> int:
    """Write one hashdedup part aligned with its ingest part (values at `positions`, the other rows
    null/-1); returns the part's ok count. The local and the Ray path both write with this."""
    t = pq.read_table(ingest_part, columns=["id", "status"])
    n = t.num_rows
    where = np.full(n, -1, dtype=np.int64)
    where[np.asarray(positions, dtype=np.int64)] = np.arange(len(positions))
    mask = where < 0
    take = pa.array(where, mask=mask, type=pa.int64())
    g = np.full(n, -1, dtype=np.int64)
    d = np.full(n, -1, dtype=np.int16)
    g[~mask], d[~mask] = np.asarray(group, np.int64)[where[~mask]], np.asarray(distance, np.int16)[where[~mask]]
    table = pa.table({"id": t.column("id"),
                      "dup_of": _strings(dup_of).take(take),
                      "dup_reason": _strings(reason).take(take),
                      "dup_group": pa.array(g), "dup_distance": pa.array(d)})
    write_table_atomic(table, out)
    return int(pc.sum(pc.equal(t.column("status"), "ok")).as_py() or 0)


def _strings(values: Sequence[str | None] | pa.Array) -> pa.Array:
    """A string Arrow array of a Python sequence or an Arrow array (taken as it is)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks().cast(pa.string())
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(list(values), type=pa.string())


class LinkedKeepers:
    """`curate.hashing.dedup`'s outcome in arrays (no Python object per record), for the records with a link
    (sorted global rows): keep flag, keeper (index into the linked records), exact (same known sha256
    as the keeper; False for keepers), group and distance as `curate.hashing.DedupResult` has them.

    sha_class[i] is the first linked record with the same known sha256 as record i (i where none: no
    hash, or a hash no other record has), as the sha256 bands' star links give it (None: exact links
    off); so the sha256 strings are never gathered."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray, sha_class: np.ndarray | None, phash: np.ndarray,
                 pixels: np.ndarray, ei: np.ndarray, ej: np.ndarray) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        self.ids, rank = arrow_id_ranks(ids)  # one large_string array: past 2 GB of ids too
        n = len(self.ids)
        index = np.int32 if n < 2**31 else np.int64
        graph = coo_matrix((np.ones(len(ei), dtype=np.int8), (ei.astype(index), ej.astype(index))),
                           shape=(n, n)).tocsr()
        _, labels = connected_components(graph, directed=False)
        del graph
        picked = pick_keepers(labels, np.asarray(pixels, dtype=np.int64), rank)
        self.keep, self.keeper, self.group = picked.keep, picked.keeper, picked.group
        codes = np.asarray(phash, dtype=np.uint64)
        self.distance = hamming_u64(codes, codes[self.keeper]).astype(np.int16)
        self.distance[self.keep] = -1
        if sha_class is None:
            self.exact = np.zeros(n, dtype=bool)
        else:
            self.exact = (sha_class == sha_class[self.keeper]) & ~self.keep

    def dup_of(self, lo: int, hi: int) -> pa.Array:
        """Keeper ids of linked records lo..hi (null for keepers)."""
        keeper = pa.array(self.keeper[lo:hi], mask=self.keep[lo:hi], type=pa.int64())
        return self.ids.take(keeper)

    def reason(self, lo: int, hi: int) -> pa.Array:
        """"exact" / "near" of linked records lo..hi (null for keepers)."""
        r = np.where(self.exact[lo:hi], "exact", "near").astype(object)
        r[self.keep[lo:hi]] = None
        return pa.array(r, type=pa.string())


def _append(path: Path, a: np.ndarray) -> None:
    with open(path, "ab") as fh:
        fh.write(np.ascontiguousarray(a).tobytes())


def dedup_spilled(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, max_distance: int, exact: bool,
                  band_rows: int = 250_000, buffer_bytes: int = 64 << 20) -> tuple[int, dict, int]:
    """Hash dedup of the ingest parts in this process, banded as the Ray executor does it, with exactly
    `curate.hashing.dedup`'s outcome over all ok records; writes one hashdedup part per ingest part into
    out_dir. Returns (ok records, dropped counts by reason, groups).

    Map: part by part, the ok rows' (global row, key) pairs go to band files under out_dir (a
    `.bands.tmp-*` folder, removed at the end; a killed run's is removed by the next one), buffered up to
    buffer_bytes. Reduce: one band at a time (about band_rows records each), its links. Then only the
    records with a link are read back (id, pHash, pixels) to choose keepers (whether a copy is exact
    comes from the sha256 links), and the parts are written one at a time. Memory: one band, the links
    and the linked records' columns (no Python object per record)."""
    out_dir = ensure_dir(out_dir)
    parts = [str(p) for p in parts]
    sizes = np.array([pq.ParquetFile(p).metadata.num_rows for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_bands = max(1, -(-int(offsets[-1]) // max(1, band_rows)))
    kinds = band_kinds(max_distance, exact, n_bands)
    spill = out_dir / f".bands.tmp-{uuid.uuid4().hex[:8]}"
    spill.mkdir()
    try:
        buffered: dict[int, list] = {}
        size = 0

        def flush() -> None:
            for b, chunks in buffered.items():
                _append(spill / f"{b}.rows", np.concatenate([c[0] for c in chunks]))
                _append(spill / f"{b}.keys", np.concatenate([c[1] for c in chunks]))
            buffered.clear()

        for k, path in enumerate(parts):
            for b, (rows, keys) in enumerate(map_bands([(path, int(offsets[k]))], max_distance, exact, n_bands)):
                if len(rows):
                    buffered.setdefault(b, []).append((rows, keys))
                    size += rows.nbytes + keys.nbytes
            if size > buffer_bytes:
                flush()
                size = 0
        flush()
        links: dict[str, tuple[list, list]] = {"sha": ([], []), "phash": ([], [])}
        for b, kind in enumerate(kinds):
            if not (spill / f"{b}.rows").exists():
                continue
            rows = np.fromfile(spill / f"{b}.rows", dtype=np.int64)
            keys = np.fromfile(spill / f"{b}.keys", dtype="S64" if kind == "sha" else np.uint64)
            (spill / f"{b}.rows").unlink()
            (spill / f"{b}.keys").unlink()
            a, c = band_links(kind, max_distance, (rows, keys))
            links[kind][0].append(a)
            links[kind][1].append(c)
            del rows, keys
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return write_outcome(parts, offsets, out_dir, *link_keepers(parts, offsets, links["sha"], links["phash"], exact))


def link_keepers(parts: Sequence[str], offsets: np.ndarray, sha_links: tuple[list, list],
                 phash_links: tuple[list, list], exact: bool,
                 mapper: Callable | None = None) -> tuple[np.ndarray, np.ndarray, LinkedKeepers]:
    """Keepers of the records with a link, from the bands' links ((left rows, right rows) lists per kind;
    the sha256 bands' links are stars: (first record of a hash, another record of it)). Only the linked
    records' id, pHash and pixels are read, part by part (`gather_rows`, through `mapper`: a
    curate.parts Mapper, None for this process). Returns (linked global rows, sorted; cuts: the linked
    records of part k are linked[cuts[k]:cuts[k + 1]]; their LinkedKeepers)."""
    sha_i, sha_j = (np.concatenate(x) if x else _EMPTY for x in sha_links)
    ei = np.concatenate([sha_i, *phash_links[0]])
    ej = np.concatenate([sha_j, *phash_links[1]])
    linked = np.unique(np.concatenate([ei, ej]))  # global rows with a link, sorted
    ei, ej = np.searchsorted(linked, ei), np.searchsorted(linked, ej)
    sha_class = None
    if exact:
        sha_class = np.arange(len(linked), dtype=np.int64)
        sha_class[ej[:len(sha_j)]] = ei[:len(sha_i)]
    del sha_i, sha_j
    cuts = np.searchsorted(np.searchsorted(offsets, linked, side="right") - 1, np.arange(len(parts) + 1))
    jobs = [(str(parts[k]), linked[cuts[k]:cuts[k + 1]] - offsets[k]) for k in range(len(parts))
            if cuts[k + 1] > cuts[k]]
    got = map_in_order(mapper, gather_rows, jobs)
    ids = pa.chunked_array([g["id"] for g in got], type=pa.string()) if got else pa.chunked_array([], pa.string())
    phash = np.concatenate([g["phash"] for g in got] or [np.zeros(0, np.uint64)])
    pixels = np.concatenate([g["pixels"] for g in got] or [np.zeros(0, np.int64)])
    del got
    return linked, cuts, LinkedKeepers(ids, sha_class, phash, pixels, ei, ej)


def write_outcome(parts: Sequence[str], offsets: np.ndarray, out_dir: str | os.PathLike, linked: np.ndarray,
                  cuts: np.ndarray, res: LinkedKeepers, mapper: Callable | None = None) -> tuple[int, dict, int]:
    """Write one hashdedup part per ingest part (`write_dup_part`, through `mapper`; None: in this
    process), each job made when it is sent (a mapper that draws jobs lazily, as ray_map does, holds a
    window of them). Returns (ok records, dropped counts by reason, groups)."""
    out_dir = Path(out_dir)

    def jobs():
        for k, path in enumerate(parts):
            lo, hi = int(cuts[k]), int(cuts[k + 1])
            yield (str(path), str(out_dir / part_name(k)), linked[lo:hi] - offsets[k], res.dup_of(lo, hi),
                   res.reason(lo, hi), res.group[lo:hi], res.distance[lo:hi])

    n_ok = sum(c for _, c in (mapper or local_map)(write_dup_part, jobs(), ()))
    dropped = {"duplicate_exact": int((~res.keep & res.exact).sum()),
               "duplicate_near": int((~res.keep & ~res.exact).sum())}
    groups = int(len(np.unique(res.group[res.group >= 0])))
    return n_ok, {r: c for r, c in sorted(dropped.items()) if c}, groups
