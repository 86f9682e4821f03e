"""Copy groups over a graph too large for one process: connected components, keepers and group numbers
computed by jobs over buckets of rows (consecutive row ranges) that exchange messages through files, run
by any Mapper (local calls, or Ray tasks on a shared disk). The caller holds O(buckets), never a row or
an id per record; each job holds its bucket's share. The result is group_edges's, value for value.

Rounds (each a job per bucket; a job reads the messages sent to it and writes one file of messages,
sorted by destination bucket):
1. `write_edges` (the callers: k-NN query tasks, or whoever holds edges) sends each edge to both ends.
2. build: a bucket's adjacency, each node's label set to the smallest row among itself and its neighbours.
3. labels (always a row of the node's component, never above the node's own row) fall to the smallest row
   of each component in pairs of rounds: spread (a node whose label fell sends it to its neighbours;
   every node asks its label's label) and hook (a node takes its neighbours' smallest label and hooks its
   old label to it; asks are answered, so labels jump along label chains), until a spread sends nothing.
   A chain of L records takes at most about 3 log2 L rounds in any row order (measured up to 100,000
   records; propagation alone took up to L), a pair 2.
4. owners: each node (row, id, pixels, max_sim and node_info's extra columns) sent to its label's
   bucket, which picks the keeper (most pixels, then smallest id), sorts members by id and samples its
   groups' smallest ids.
5. number: groups split by splitters drawn from those samples into ranges of smallest ids (member ids
   too: a range finding an id twice raises); each range is numbered after the ranges below it (the
   caller sums their counts), writes its groups table and sends each member its keeper id, group and
   its keeper's extra columns. 6. collect: each bucket's members sorted by row.
Every job rewrites whole files atomically from the previous round's files, so a retried job (a lost
node) gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from curate.copy_safety import SafetyLimits, graph_stats
from curate.dedup import DEFAULT_K, DEFAULT_MAX_COMPONENT, DEFAULT_THRESHOLD
from curate.parts import Mapper, map_in_order

SAMPLES = 64  # smallest ids each bucket offers for the range splitters
MAX_ROUNDS = 1_000  # label rounds before giving up (a chain of 10^9 records takes about 90)

EDGE = pa.schema([("u", pa.int64()), ("v", pa.int64()), ("sim", pa.float32())])
LABEL = pa.schema([("v", pa.int64()), ("label", pa.int64())])
ASK = pa.schema([("v", pa.int64()), ("label", pa.int64()), ("ask", pa.bool_())])  # spread's: labels and asks
NODE = pa.schema([("label", pa.int64()), ("row", pa.int64()), ("id", pa.string()), ("pixels", pa.int64()),
                  ("max_sim", pa.float32())])
MEMBER = pa.schema([("row", pa.int64()), ("copy_of", pa.string()), ("group", pa.int64()),
                    ("max_sim", pa.float32())])


def part_buckets(offsets: np.ndarray, records: int) -> np.ndarray:
    """Row bounds of buckets of consecutive whole parts (part k: rows offsets[k] .. offsets[k + 1] - 1),
    at most `records` rows each (a larger part alone)."""
    bounds = [0]
    for start, end in zip(offsets[:-1], offsets[1:]):
        if end - bounds[-1] > records and start > bounds[-1]:
            bounds.append(int(start))
    bounds.append(int(offsets[-1]))
    return np.array(bounds, dtype=np.int64)


def bucket_of(bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The bucket holding each row (bucket b: rows bounds[b] .. bounds[b + 1] - 1)."""
    return np.searchsorted(bounds, rows, side="right") - 1


def send(path: Path, table: pa.Table, dest: np.ndarray, buckets: int) -> int:
    """Write `table` sorted by destination bucket (stable) with each bucket's offsets; atomic."""
    order = np.argsort(dest, kind="stable")
    offsets = np.searchsorted(dest[order], np.arange(buckets + 1), side="left")
    table = table.take(pa.array(order)).replace_schema_metadata({"offsets": json.dumps(offsets.tolist())})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with ipc.new_file(tmp, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return len(table)


def _open(path: str | Path) -> pa.Table:
    """An exchange file, memory-mapped, its offsets kept in the schema's metadata."""
    return ipc.open_file(pa.memory_map(str(path))).read_all()


def _read(path: str | Path) -> pa.Table:
    """A file written whole (`_write`), memory-mapped."""
    return _open(path).replace_schema_metadata(None)


def _write(path: Path, table: pa.Table) -> int:
    """Write a table whole (one destination), atomically."""
    return send(path, table, np.zeros(len(table), dtype=np.int64), 1)


def receive(paths: Sequence[Path], b: int, schema: pa.Schema) -> pa.Table:
    """The rows every file in `paths` sent to bucket b, in file order (files memory-mapped)."""
    got = []
    for p in paths:
        t = _open(p)
        off = json.loads(t.schema.metadata[b"offsets"])
        got.append(t.slice(off[b], off[b + 1] - off[b]).replace_schema_metadata(None))
    return pa.concat_tables(got).combine_chunks() if got else schema.empty_table()


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy()


def write_edges(path: str | Path, edges: tuple[np.ndarray, np.ndarray, np.ndarray], bounds: np.ndarray) -> int:
    """Send edges (i, j, sim) among rows 0 .. bounds[-1] - 1 to both ends' buckets (round 1's input).
    Returns the number of edges given."""
    i, j = np.asarray(edges[0], dtype=np.int64), np.asarray(edges[1], dtype=np.int64)
    sim = np.asarray(edges[2], dtype=np.float32)
    n = int(bounds[-1])
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edges name rows outside 0..{n - 1}")
    u, v = np.concatenate([i, j]), np.concatenate([j, i])
    table = pa.table([u, v, np.concatenate([sim, sim])], schema=EDGE)
    send(Path(path), table, bucket_of(bounds, u), len(bounds) - 1)
    return len(i)


def read_edges(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges `write_edges` files hold, as one knn_edges run gives them (i < j, unique, sorted)."""
    from curate.dedup import merge_edges

    t = pa.concat_tables([_read(p) for p in paths]) if paths else EDGE.empty_table()
    t = t.filter(pc.less(t["u"], t["v"]))
    return merge_edges((_col(t, "u"), _col(t, "v"), _col(t, "sim")))


def _paths(work: Path, step: str, sources: int) -> list[Path]:
    return [_path(work, step, s) for s in range(sources)]


def _path(work: Path, step: str, s: int) -> Path:
    return work / step / f"{s:06d}.arrow"


def _labels_path(work: Path, r: int, b: int) -> Path:
    return work / "labels" / f"{r:05d}" / f"{b:06d}.npy"


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _send_labels(work: Path, r: int, b: int, bounds: np.ndarray, v: np.ndarray, label: np.ndarray) -> int:
    """Round r's messages of bucket b: `label` offered to each row `v` (min-into), sorted by v's bucket."""
    return send(_path(work, f"r{r:05d}", b), pa.table([v, label], schema=LABEL), bucket_of(bounds, v),
                len(bounds) - 1)


def _build(work: str, bounds: np.ndarray, edge_files: Sequence[str], b: int) -> tuple[int, int]:
    """Round 1 for bucket b: its nodes, adjacency, each node's max similarity and first label (the
    smallest row among itself and its neighbours; every neighbour already knows its row)."""
    w = Path(work)
    t = receive([Path(p) for p in edge_files], b, EDGE)
    u, v, sim = _col(t, "u"), _col(t, "v"), _col(t, "sim")
    order = np.lexsort((-sim, v, u))  # one entry per (u, v): a pair two query ranges both found
    u, v, sim = u[order], v[order], sim[order]
    first = np.ones(len(u), dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    u, v, sim = u[first], v[first], sim[first]
    nodes, pos = np.unique(u, return_inverse=True)
    max_sim = np.full(len(nodes), -np.inf, dtype=np.float32)
    np.maximum.at(max_sim, pos, sim)
    label = nodes.copy()
    np.minimum.at(label, pos, v)
    tmp = w / "adj" / f"{b:06d}.tmp{os.getpid()}.npz"
    np.savez(tmp, nodes=nodes, pos=pos, v=v, max_sim=max_sim)
    os.replace(tmp, w / "adj" / f"{b:06d}.npz")
    _save(_labels_path(w, 1, b), np.stack([label, nodes]))  # labels, and the labels the neighbours know
    _send_labels(w, 1, b, bounds, np.zeros(0, np.int64), np.zeros(0, np.int64))  # no jump or hook yet
    return len(nodes), int((u < v).sum())


def _spread(work: str, bounds: np.ndarray, r: int, b: int) -> int:
    """Label round r (2, 4, ...) for bucket b: the hooks and jump answers sent to its nodes applied (min-into);
    each node whose label fell sends it to its neighbours above that label (a neighbour's label is at
    most its row, so only those can take it) and every node that is not its own label asks its label's
    label (a jump: `ask` rows, `label` the asker). Returns the labels sent along edges: none means every
    component holds its smallest row."""
    w = Path(work)
    adj = np.load(w / "adj" / f"{b:06d}.npz")
    nodes, pos, v = adj["nodes"], adj["pos"], adj["v"]
    label, known = np.load(_labels_path(w, r - 1, b))
    got = receive(_paths(w, f"r{r - 1:05d}", len(bounds) - 1), b, LABEL)
    label = label.copy()
    np.minimum.at(label, np.searchsorted(nodes, _col(got, "v")), _col(got, "label"))
    at = (label < known)[pos] & (label[pos] < v)
    ask = np.flatnonzero(label != nodes)
    _save(_labels_path(w, r, b), np.stack([label, label]))
    t = pa.table([np.concatenate([v[at], label[ask]]), np.concatenate([label[pos][at], nodes[ask]]),
                  np.r_[np.zeros(int(at.sum()), bool), np.ones(len(ask), bool)]], schema=ASK)
    send(_path(w, f"r{r:05d}", b), t, bucket_of(bounds, _col(t, "v")), len(bounds) - 1)
    return int(at.sum())


def _hook(work: str, bounds: np.ndarray, r: int, b: int) -> int:
    """Label round r (3, 5, ...) for bucket b: each node takes the smallest label its neighbours sent and, when
    that lowers it, hooks its old label to it (a message to that row: min-into); each ask is answered
    with the asked row's label where it is below the row (the asker's label then jumps to it)."""
    w = Path(work)
    adj = np.load(w / "adj" / f"{b:06d}.npz")
    nodes = adj["nodes"]
    old, known = np.load(_labels_path(w, r - 1, b))
    got = receive(_paths(w, f"r{r - 1:05d}", len(bounds) - 1), b, ASK)
    ask = _col(got, "ask").astype(bool) if len(got) else np.zeros(0, bool)
    at, lab = np.searchsorted(nodes, _col(got, "v")), _col(got, "label")
    label = old.copy()
    np.minimum.at(label, at[~ask], lab[~ask])
    hook = np.flatnonzero((label < old) & (old != nodes))
    answer = label[at[ask]]
    jump = answer < nodes[at[ask]]
    _save(_labels_path(w, r, b), np.stack([label, known]))
    return _send_labels(w, r, b, bounds, np.concatenate([old[hook], lab[ask][jump]]),
                        np.concatenate([label[hook], answer[jump]]))


def _owners(work: str, bounds: np.ndarray, r: int, info: Callable, b: int) -> int:
    """Round 4 for bucket b: each node with its id, pixels, max similarity and the extra columns node_info
    gives sent to its label's bucket."""
    w = Path(work)
    adj = np.load(w / "adj" / f"{b:06d}.npz")
    label, nodes = np.load(_labels_path(w, r, b))[0], adj["nodes"]
    ids, pixels, *extra = info(nodes)
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    ids = ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([pa.array(list(ids), type=pa.string())])
    if len(ids) != len(nodes):
        raise ValueError(f"node_info gave {len(ids)} ids for {len(nodes)} rows")
    columns = [label, nodes, ids.cast(pa.string()), np.asarray(pixels, dtype=np.int64).reshape(-1), adj["max_sim"]]
    table = pa.table(columns, schema=NODE)
    for name, values in (extra[0] if extra else {}).items():
        table = table.append_column(f"x_{name}", pa.chunked_array([values]) if isinstance(values, pa.Array) else
                                    values if isinstance(values, pa.ChunkedArray) else pa.array(values))
    return send(_path(w, "own", b), table, bucket_of(bounds, label), len(bounds) - 1)


def _extras(t: pa.Table) -> list[str]:
    return [c for c in t.column_names if c.startswith("x_")]


def _groups(work: str, buckets: int, b: int) -> tuple[dict, list[str]]:
    """Round 4 for the groups whose label is in bucket b: keeper, members by id, size, max similarity,
    sorted by smallest id. Returns records per group -> groups, and a sample of smallest ids."""
    w = Path(work)
    t = receive(_paths(w, "own", buckets), b, NODE)
    t = t.sort_by([("label", "ascending"), ("id", "ascending")]).combine_chunks()  # members by id
    label = _col(t, "label")
    head = np.flatnonzero(np.r_[True, label[1:] != label[:-1]]) if len(t) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[head, len(t)]).astype(np.int64)
    best = np.lexsort((np.arange(len(t)), -_col(t, "pixels"), label))  # id order breaks pixel ties
    keeper = pa.array(best[np.flatnonzero(np.r_[True, label[best][1:] != label[best][:-1]])] if len(t) else head)
    offsets = pa.array(np.r_[head, len(t)].astype(np.int32))
    group_max = np.maximum.reduceat(_col(t, "max_sim"), head) if len(t) else np.zeros(0, np.float32)
    columns = {"min_id": t.column("id").take(pa.array(head)), "keeper": t.column("id").take(keeper),
               "keeper_row": t.column("row").take(keeper)}
    for name in ("id", "row", "max_sim", *_extras(t)):  # members' columns as lists, keeper's extras
        columns[f"m_{name}"] = pa.ListArray.from_arrays(offsets, t.column(name).combine_chunks())
        if name.startswith("x_"):
            columns[f"keeper_{name}"] = t.column(name).take(keeper)
    groups = pa.table({**columns, "size": pa.array(sizes), "max_sim": pa.array(group_max.astype(np.float32))})
    groups = groups.sort_by("min_id")
    _write(_path(w, "groups", b), groups)
    hist_sizes, counts = np.unique(sizes, return_counts=True)
    pick = np.unique(np.linspace(0, len(groups) - 1, min(SAMPLES, len(groups))).astype(np.int64))
    return dict(zip(hist_sizes.tolist(), counts.tolist())), groups.column("min_id").take(pick).to_pylist()


def _bisect(ordered: pa.Array, splitters: Sequence[str]) -> np.ndarray:
    """Per splitter, how many of the sorted strings are below it (a binary search each, on Arrow scalars:
    no Python string per element)."""
    out = []
    for s in splitters:
        lo, hi = 0, len(ordered)
        while lo < hi:
            mid = (lo + hi) // 2
            if ordered[mid].as_py() < s:
                lo = mid + 1
            else:
                hi = mid
        out.append(lo)
    return np.array(out, dtype=np.int64)


def _cuts(work: str, splitters: list[str], b: int) -> np.ndarray:
    """Where bucket b's groups (by smallest id) cross the splitters: range r holds [cuts[r], cuts[r + 1]).
    Every member id is sent to its range too, where `_number` checks that no id repeats."""
    w = Path(work)
    t = _read(_path(w, "groups", b))
    ids = pc.list_flatten(t.column("m_id")).combine_chunks()
    ids = ids.take(pc.sort_indices(ids))
    at = np.r_[0, _bisect(ids, splitters), len(ids)]
    send(_path(w, "ids", b), pa.table({"id": ids}), np.repeat(np.arange(len(at) - 1), np.diff(at)),
         len(splitters) + 1)
    return np.r_[0, _bisect(t.column("min_id").combine_chunks(), splitters), len(t)]


def _number(work: str, bounds: np.ndarray, start: int, slices: Sequence[tuple[int, int]], r: int) -> int:
    """Round 5 for range r: its groups (their slices of every bucket's groups) numbered from `start` by
    smallest id, written as groups part r; each member sent its keeper id (null: the keeper), group, max
    similarity, and its own and its keeper's extra columns."""
    w = Path(work)
    ids = receive(_paths(w, "ids", len(slices)), r, pa.schema([("id", pa.string())])).column("id").combine_chunks()
    ids = ids.take(pc.sort_indices(ids))
    if len(ids) > 1:
        same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        if pc.any(same).as_py():
            raise ValueError(f"ids must be unique: {ids[pc.index(same, True).as_py()].as_py()!r} is repeated")
    got = []
    for b, (lo, hi) in enumerate(slices):
        got.append(_read(_path(w, "groups", b)).slice(lo, hi - lo))  # an empty slice keeps the schema
    t = pa.concat_tables(got).sort_by("min_id").combine_chunks()
    group = np.arange(start, start + len(t), dtype=np.int64)
    out = pa.table({"group": group, "keeper": t.column("keeper"), "members": t.column("m_id"),
                    "size": t.column("size"), "max_sim": t.column("max_sim")})
    _write(_path(w, "out", r), out)
    sizes = _col(t, "size")
    of = pa.array(np.repeat(np.arange(len(t)), sizes))
    rows = pc.list_flatten(t.column("m_row")).to_numpy()
    keeper = t.column("keeper").take(of)
    copy_of = pc.if_else(pa.array(rows == _col(t, "keeper_row")[of.to_numpy()]), pa.nulls(len(rows), pa.string()),
                         keeper)
    members = pa.table([rows, copy_of, np.repeat(group, sizes), pc.list_flatten(t.column("m_max_sim"))], schema=MEMBER)
    for name in (c[4:] for c in t.column_names if c.startswith("m_x_")):
        members = members.append_column(name, pc.list_flatten(t.column(f"m_x_{name}")))
        members = members.append_column(f"keeper_{name}", t.column(f"keeper_x_{name}").take(of))
    return send(_path(w, "members", r), members, bucket_of(bounds, rows), len(bounds) - 1)


def _collect(work: str, buckets: int, b: int) -> int:
    """Round 6 for bucket b: its members' outcomes sorted by row."""
    w = Path(work)
    t = receive(_paths(w, "members", buckets), b, MEMBER).sort_by("row")
    _write(_path(w, "result", b), t)
    return len(t)


@dataclass
class PartitionedGraph:
    """group_edges's result held in files: per bucket the outcomes of its rows that are in a group, and
    the groups table in ranges of smallest id (concatenated in order, group_edges's table)."""

    n: int
    bounds: np.ndarray
    work: Path
    stats: dict = field(default_factory=dict)
    warning: str | None = None

    def members(self, lo: int, hi: int) -> pa.Table:
        """row, copy_of (keeper id; null: the keeper), group, max_sim of the grouped rows in lo .. hi - 1
        (a range within one bucket), sorted by row; and per extra column X of node_info, X (the row's)
        and keeper_X (its keeper's)."""
        b = min(int(bucket_of(self.bounds, np.array([lo]))[0]), len(self.bounds) - 2)
        if hi > max(lo, self.bounds[b + 1]):
            raise ValueError(f"rows {lo}..{hi - 1} cross bucket {b}'s end {int(self.bounds[b + 1])}")
        t = _read(_path(self.work, "result", b))
        rows = _col(t, "row")
        a, z = np.searchsorted(rows, [lo, max(lo, hi)])
        return t.slice(int(a), int(z - a))

    def group_tables(self):
        """The groups table (group, keeper, members, size, max_sim) one range at a time, in group order."""
        for r in range(len(self.bounds) - 1):
            yield _read(_path(self.work, "out", r))

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def group_edge_files(work: str | Path, bounds: np.ndarray, edge_files: Sequence[str | Path],
                     node_info: Callable[[np.ndarray], tuple], mapper: Mapper | None = None,
                     valid: int | None = None, k: int = DEFAULT_K, threshold: float = DEFAULT_THRESHOLD,
                     max_component: int = DEFAULT_MAX_COMPONENT,
                     limits: SafetyLimits | None = SafetyLimits(), decision: str | None = None,
                     index_kind: str = "given edges") -> PartitionedGraph:
    """group_edges over edges sent by `write_edges(path, edges, bounds)` into `edge_files`, every round a
    job per bucket on `mapper` (None: local calls); `node_info(rows)` (picklable: it runs in the jobs)
    gives the ids and pixel counts of sorted rows. The stats, warning and refusal are group_edges's;
    CopyDedupRefused is raised before any group is numbered."""
    w, bounds = Path(work), np.asarray(bounds, dtype=np.int64)
    buckets, n = len(bounds) - 1, int(bounds[-1])
    (w / "adj").mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in edge_files]
    built = map_in_order(mapper, _build, [(b,) for b in range(buckets)], (str(w), bounds, files))
    pairs, sent, r = sum(x[1] for x in built), 1, 1
    while sent:  # rounds in pairs: spread (along edges, asks), hook (hooks, answers)
        for step in (_spread, _hook):
            r += 1
            if r > MAX_ROUNDS:
                raise RuntimeError(f"labels still moving after {MAX_ROUNDS} rounds")
            moved = sum(map_in_order(mapper, step, [(b,) for b in range(buckets)], (str(w), bounds, r)))
            shutil.rmtree(w / f"r{r - 1:05d}", ignore_errors=True)
            shutil.rmtree(w / "labels" / f"{r - 1:05d}", ignore_errors=True)
            if step is _spread and not (sent := moved):
                break
    map_in_order(mapper, _owners, [(b,) for b in range(buckets)], (str(w), bounds, r, node_info))
    owned = map_in_order(mapper, _groups, [(b,) for b in range(buckets)], (str(w), buckets))
    sizes: dict[int, int] = {}
    for hist, _ in owned:
        for s, c in hist.items():
            sizes[s] = sizes.get(s, 0) + c
    stats, warning = graph_stats(n, valid, pairs, sizes, k, threshold, decision, index_kind, max_component, limits)
    stats["label_rounds"] = r
    samples = sorted(s for _, sample in owned for s in sample)
    splitters = [samples[int(q)] for q in np.linspace(0, len(samples), buckets + 1)[1:-1]] if samples else \
        [""] * (buckets - 1)
    cuts = np.stack(map_in_order(mapper, _cuts, [(b,) for b in range(buckets)], (str(w), splitters)))
    counts = (cuts[:, 1:] - cuts[:, :-1]).sum(axis=0)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    jobs = [(int(starts[q]), [(int(cuts[b, q]), int(cuts[b, q + 1])) for b in range(buckets)], q)
            for q in range(buckets)]
    map_in_order(mapper, _number, jobs, (str(w), bounds))
    map_in_order(mapper, _collect, [(b,) for b in range(buckets)], (str(w), buckets))
    return PartitionedGraph(n, bounds, w, stats, warning)
