"""Hash dedup split into bands, for executors that spread it over tasks; the same outcome as
curate.hashing.dedup over all records, exactly.

Map (per group of ingest parts): the ok rows go to bands: by their sha256 (equal hashes share a band)
and, for each of the max_distance + 1 disjoint bit fields of the pHash, by the field's value (two
hashes within max_distance agree on at least one field: pigeonhole). Reduce (per band): the links
inside the band (equal sha256; pHash pairs within max_distance). Every linked pair shares a band, so
the union of the bands' links has the components of `dedup`'s links; only records with a link are
gathered to choose keepers (`group_linked`), and each part is written by its own task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.hashing import phash_pairs
from curate.parts import write_table_atomic

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
    """The records at `positions` of one ingest part: id, sha256, phash and pixels (to choose keepers)."""
    t = pq.read_table(path, columns=["id", "sha256", "phash", "width", "height"]).take(pa.array(positions))
    pixels = (t.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
              * t.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
    return {"id": t.column("id").to_pylist(), "sha256": t.column("sha256").to_pylist(),
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
                      "dup_of": pa.array(list(dup_of), type=pa.string()).take(take),
                      "dup_reason": pa.array(list(reason), type=pa.string()).take(take),
                      "dup_group": pa.array(g), "dup_distance": pa.array(d)})
    write_table_atomic(table, out)
    return int(pc.sum(pc.equal(t.column("status"), "ok")).as_py() or 0)
