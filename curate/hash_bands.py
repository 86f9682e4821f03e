"""Hash dedup split into bands, for executors that spread it over tasks; the same outcome as
curate.hashing.dedup over all records, exactly.

Map (per group of ingest parts): the ok rows go to bands: by their sha256 (equal hashes share a band)
and, for each of the max_distance + 1 disjoint bit fields of the pHash, by the field's value (two
hashes within max_distance agree on at least one field: pigeonhole). Reduce (per band): the links
inside the band (equal sha256; pHash pairs within max_distance). Every linked pair shares a band, so
the union of the bands' links has the components of `dedup`'s links. Each band's links are written as
copy-graph edges (`band_edges`); the components and keepers of the linked records come from
curate.copy_graph_parts' jobs over buckets of whole parts, each reading its own records' id, pixels,
pHash and sha256 (`IngestNodes`), and each part is written by its own job (`write_groups`).

`dedup_spilled` runs the same map/reduce in one process with the bands spilled to disk: memory is
bounded by one band (or one bucket's linked records), not by the pool.
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

from curate.copy_graph_parts import part_buckets
from curate.hashing import hamming_u64, phash_pairs
from curate.parts import ensure_dir, map_in_order, part_name, write_table_atomic

BUCKET_ROWS = 4_000_000  # rows per job of the links' components (whole ingest parts)
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
    i, j, _ = phash_pairs(spread_bits(keys), max_distance)
    return rows[i], rows[j]


SPREAD = 5  # bit b of a pHash goes to bit (5 b) mod 64: 5 is odd, so this is a permutation of the 64 bits
# per byte position k and byte value v: where v's bits go (eight table lookups spread a hash)
_SPREAD_TABLE = np.array([[sum(1 << (SPREAD * (8 * k + i) % 64) for i in range(8) if v >> i & 1) for v in range(256)]
                          for k in range(8)], dtype=np.uint64)


def spread_bits(codes: np.ndarray) -> np.ndarray:
    """The pHashes with their bits permuted (Hamming distances unchanged): a band's records share one
    bit field (or a few of its values), and multi-index hashing over contiguous substrings would find
    every pair of the band in the table holding that field; spread over the 64 bits, every table varies."""
    codes = np.asarray(codes, dtype=np.uint64)
    out = np.zeros_like(codes)
    for k in range(8):
        out |= _SPREAD_TABLE[k][((codes >> np.uint64(8 * k)) & np.uint64(255)).astype(np.intp)]
    return out


def band_edges(path: str, bounds: np.ndarray, kind: str, max_distance: int, *chunks: tuple) -> int:
    """band_links of one band written as copy-graph edges (curate.copy_graph_parts.write_edges) to `path`
    for the row buckets of `bounds`; returns the links."""
    from curate.copy_graph_parts import write_edges

    i, j = band_links(kind, max_distance, *chunks)
    return write_edges(path, (i, j, np.zeros(len(i), np.float32)), bounds)


class IngestNodes:
    """node_info of hash dedup's copy graph (picklable: its jobs read their own rows): the id, pixels,
    pHash and sha256 ('' where none) of sorted global rows of the ingest parts."""

    def __init__(self, parts: Sequence[str], offsets: np.ndarray) -> None:
        self.parts, self.offsets = [str(p) for p in parts], np.asarray(offsets, dtype=np.int64)

    def __call__(self, rows: np.ndarray) -> tuple:
        cuts = np.searchsorted(rows, self.offsets)
        ids, pixels, phash, sha = [], [], [], []
        for k in np.flatnonzero(cuts[1:] > cuts[:-1]):
            t = pq.read_table(self.parts[k], columns=["id", "phash", "width", "height", "sha256"]).take(
                pa.array(rows[cuts[k]:cuts[k + 1]] - self.offsets[k], pa.int64()))
            ids.append(t.column("id").combine_chunks().cast(pa.string()))
            pixels.append(t.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
                          * t.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
            phash.append(t.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64))
            sha.append(t.column("sha256").combine_chunks().cast(pa.string()).fill_null(""))
        return (pa.chunked_array(ids, type=pa.string()), np.concatenate(pixels or [_EMPTY]),
                {"phash": np.concatenate(phash or [np.zeros(0, np.uint64)]),
                 "sha": pa.chunked_array(sha, type=pa.string())})


def write_linked_part(graph, exact: bool, ingest_part: str, out: str, lo: int, hi: int) -> tuple[int, int, int]:
    """One hashdedup part from the copy graph's members among its global rows lo .. hi - 1: `dup_of`
    (keeper id), `dup_reason` (exact: the keeper's known sha256, with exact links on; else near),
    `dup_group`, `dup_distance` (pHash bits to the keeper; -1 for keepers). Returns (ok records, exact
    copies, near copies)."""
    t = graph.members(lo, hi)
    keep = pc.is_null(t.column("copy_of")).to_numpy(zero_copy_only=False)
    same = pc.and_(pc.equal(t.column("sha"), t.column("keeper_sha")), pc.not_equal(t.column("sha"), ""))
    is_exact = (same.to_numpy(zero_copy_only=False).astype(bool) if exact else np.zeros(len(t), bool)) & ~keep
    reason = np.where(is_exact, "exact", "near").astype(object)
    reason[keep] = None
    distance = hamming_u64(t.column("phash").to_numpy(), t.column("keeper_phash").to_numpy()).astype(np.int16)
    distance[keep] = -1
    n_ok = write_dup_part(ingest_part, out, t.column("row").to_numpy() - lo, t.column("copy_of"),
                          pa.array(reason, type=pa.string()), t.column("group").to_numpy(), distance)
    return n_ok, int(is_exact.sum()), int((~keep & ~is_exact).sum())


def write_groups(parts: Sequence[str], offsets: np.ndarray, out_dir: str | os.PathLike, work: str | os.PathLike,
                 edge_files: Sequence[str], bounds: np.ndarray, exact: bool,
                 mapper: Callable | None = None) -> tuple[int, dict, int]:
    """Components of the bands' links (in `edge_files`, for the buckets of `bounds`) and their keepers
    (most pixels, then smallest id), by curate.copy_graph_parts' jobs over row buckets through `mapper`
    (None: this process): no list per linked record anywhere but in a job. Then one hashdedup part per
    ingest part (`write_linked_part`). Returns (ok records, dropped counts by reason, groups)."""
    from curate.copy_graph_parts import group_edge_files

    graph = group_edge_files(work, bounds, edge_files, IngestNodes(parts, offsets), mapper, limits=None,
                             decision="hash links")
    out_dir = Path(out_dir)
    jobs = [(str(path), str(out_dir / part_name(k)), int(offsets[k]), int(offsets[k + 1]))
            for k, path in enumerate(parts)]
    done = map_in_order(mapper, write_linked_part, jobs, (graph, exact))
    graph.cleanup()
    n_ok = sum(x[0] for x in done)
    dropped = {"duplicate_exact": sum(x[1] for x in done), "duplicate_near": sum(x[2] for x in done)}
    return n_ok, {r: c for r, c in sorted(dropped.items()) if c}, int(graph.stats["groups"])


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


def _append(path: Path, a: np.ndarray) -> None:
    with open(path, "ab") as fh:
        fh.write(np.ascontiguousarray(a).tobytes())


def dedup_spilled(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, max_distance: int, exact: bool,
                  band_rows: int = 250_000, buffer_bytes: int = 64 << 20,
                  bucket_rows: int = BUCKET_ROWS) -> tuple[int, dict, int]:
    """Hash dedup of the ingest parts in this process, banded as the Ray executor does it, with exactly
    `curate.hashing.dedup`'s outcome over all ok records; writes one hashdedup part per ingest part into
    out_dir. Returns (ok records, dropped counts by reason, groups).

    Map: part by part, the ok rows' (global row, key) pairs go to band files under out_dir (a
    `.bands.tmp-*` folder, removed at the end; a killed run's is removed by the next one), buffered up to
    buffer_bytes. Reduce: one band at a time (about band_rows records each), its links written as
    copy-graph edges; then `write_groups`, its jobs one after the other over buckets of whole parts of
    about bucket_rows rows. Memory: one band, or one bucket's linked records."""
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
        bounds = part_buckets(offsets, bucket_rows)
        files = []
        for b, kind in enumerate(kinds):
            if not (spill / f"{b}.rows").exists():
                continue
            rows = np.fromfile(spill / f"{b}.rows", dtype=np.int64)
            keys = np.fromfile(spill / f"{b}.keys", dtype="S64" if kind == "sha" else np.uint64)
            (spill / f"{b}.rows").unlink()
            (spill / f"{b}.keys").unlink()
            files.append(str(spill / "edges" / f"{b:06d}.arrow"))
            band_edges(files[-1], bounds, kind, max_distance, (rows, keys))
            del rows, keys
        return write_groups(parts, offsets, out_dir, spill / "graph", files, bounds, exact)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
