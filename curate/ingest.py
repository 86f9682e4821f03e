"""Ingest: plan the inputs into parts, then check every image and copy good bytes into raw shards.

Layout under the stage directory:
  _plan/part-XXXXX.parquet   the inputs of each part, fixed once; parts start as the plan is written
                             and the directory is renamed into place after its last part (records
                             and shards found while no plan exists are from one never completed,
                             and are removed before planning again)
  _cache/part-XXXXX/         finished downloads of an unfinished part, one append-only journal
                             (curate.download_cache), so a rerun never refetches; an entry missing,
                             torn or damaged is simply downloaded again
  shards/shard-XXXXX.tar     raw webdataset shard of part XXXXX (original bytes of ok images)
  part-XXXXX.parquet         records of part XXXXX; written last, it marks the part done
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from itertools import chain
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.download import DownloadSettings, download, download_many
from curate.download_cache import DownloadJournal
from curate.images import CheckSettings, ImageCheck, check_image
from curate.names import NameCounter, SeenNames
from curate.parts import (OutputError, SyncedWrite, atomic_path, clean_temporaries, ensure_dir, list_parts,
                          output_errors, part_name)
from curate.sources import TAR_READ_ERRORS, PlanItem, iter_source, source_names, utf8_text
from curate.tars import write_samples

PLAN_SCHEMA = pa.schema([
    ("id", pa.string()), ("uri", pa.string()), ("name", pa.string()), ("kind", pa.string()),
    ("source", pa.string()), ("path", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
    ("size", pa.int64()), ("extra", pa.string()), ("status", pa.string()), ("error", pa.string()),
])

RECORD_FIELDS = [
    ("id", pa.string()), ("uri", pa.string()), ("name", pa.string()), ("source", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("width", pa.int32()), ("height", pa.int32()), ("nbytes", pa.int64()), ("format", pa.string()),
    ("ext", pa.string()), ("mode", pa.string()), ("n_frames", pa.int32()), ("http_status", pa.int32()),
    ("raw_shard", pa.string()), ("raw_key", pa.string()), ("raw_offset", pa.int64()),
]
CORE_COLUMNS = {name for name, _ in RECORD_FIELDS}
_PR_SET_PDEATHSIG = 1
_CHECK_THREADS = 2  # image checks of downloads, beside the download threads


@dataclass(frozen=True)
class IngestSettings:
    """How ingest splits and checks its inputs."""

    part_size: int = 1000
    workers: int = 0  # processes over parts; 0 = one per CPU core
    check: CheckSettings = field(default_factory=CheckSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)


def make_id(name: str) -> str:
    """Stable record id: 16 hex chars of blake2b of the item's location-independent name.

    The name is the URL for URLs, "<source name>/<relative path>" for folder files and
    "<source name>::<member>" for tar members (see curate.sources), so moving data keeps ids.
    """
    return _name_digest(name).hex()


def _name_digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()


def plan(sources: Iterable[str], stage_dir: str | os.PathLike, part_size: int, seen: NameCounter | None = None) -> int:
    """Enumerate all sources into plan parts (once); returns the number of parts. `seen` counts the names
    (None: a SeenNames in this process; a PartitionedSeen spreads them over other processes)."""
    sources = list(sources)
    planned = _planned_parts(sources, stage_dir)
    if planned is not None:
        return planned
    return sum(1 for _ in _new_plan(sources, stage_dir, part_size, seen))


def _source_locations(sources: list[str]) -> list[str]:
    return [str(Path(s).resolve()) if "://" not in s else s for s in sources]


def _planned_parts(sources: list[str], stage_dir: str | os.PathLike) -> int | None:
    """The number of parts of the saved plan (refused when its inputs moved), or None when there is none."""
    plan_dir = Path(stage_dir) / "_plan"
    if not plan_dir.exists():
        return None
    _check_planned_sources(plan_dir, _source_locations(sources))
    return len(list_parts(plan_dir))


def _new_plan(sources: list[str], stage_dir: str | os.PathLike, part_size: int,
              seen: NameCounter | None = None) -> Iterator[tuple[int, list[dict], bool]]:
    """Write a new plan, yielding (part index, its rows, whether more parts follow) as soon as each
    part is written, so parts can run while the sources are still being enumerated. The plan becomes
    visible (its directory renamed into place) after the last part; part outputs found while there
    is no plan are from a plan that was never completed (a killed run), and are removed first."""
    stage_dir = Path(stage_dir)
    plan_dir = stage_dir / "_plan"
    ensure_dir(stage_dir)
    clean_temporaries(stage_dir)
    _remove_unplanned_outputs(stage_dir)
    seen = SeenNames() if seen is None else seen
    with atomic_path(plan_dir) as tmp:
        tmp.mkdir()
        (tmp / "sources.json").write_text(json.dumps(_source_locations(sources)))
        rows: list[dict] = []
        n_parts = 0
        for source, name in zip(sources, source_names(sources)):
            for item in iter_source(source, name):
                if len(rows) == part_size:  # a full part, and more to come
                    yield n_parts, _write_plan_part(_with_ids(rows, seen), tmp / part_name(n_parts)), True
                    rows, n_parts = [], n_parts + 1
                rows.append({name: getattr(item, name) for name in _PLAN_FIELDS})  # asdict without deep copies
        yield n_parts, _write_plan_part(_with_ids(rows, seen), tmp / part_name(n_parts)), False


def _write_plan_part(rows: list[dict], path: Path) -> list[dict]:
    """Write one plan part; returns its rows as run_part reads them back (the plan's columns, in order)."""
    table = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    pq.write_table(table, path)
    return [{name: row[name] for name in _PLAN_COLUMNS} for row in rows]


_PLAN_COLUMNS = PLAN_SCHEMA.names


def _remove_unplanned_outputs(stage_dir: Path) -> None:
    """Remove the records parts and raw shards written under a plan that never completed (a new plan
    may cut the inputs otherwise). Download journals stay: their entries are keyed by record id (the
    URL's hash), so the new plan's parts reuse what was fetched."""
    for p in list_parts(stage_dir):
        p.unlink()
    if (stage_dir / "shards").exists():  # raw shards, and half-written ones
        with output_errors(stage_dir / "shards"):
            shutil.rmtree(stage_dir / "shards")
    for cache in sorted((stage_dir / "_cache").glob("part-*")):
        clean_temporaries(cache)


def _check_planned_sources(plan_dir: Path, where: list[str]) -> None:
    """An unfinished ingest reads its inputs where they were planned: refuse when they moved."""
    try:
        planned = json.loads((plan_dir / "sources.json").read_text())
    except (FileNotFoundError, ValueError):
        return  # a plan written before sources were recorded
    if planned != where:
        raise ValueError(f"this unfinished ingest planned its inputs at {planned}, now given {where}: finish it with "
                         f"the planned paths, or redo it with --force")


_PLAN_FIELDS = [f.name for f in fields(PlanItem)]


def _with_ids(rows: list[dict], seen: NameCounter) -> list[dict]:
    """Give the plan rows of a part their ids: make_id(name), or make_id(name#k) for the k-th repeat of
    a name (status duplicate_uri, unless the row already has a status)."""
    digests = [_name_digest(row["name"]) for row in rows]
    before = seen.take(np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64))
    for row, digest, count in zip(rows, digests, before.tolist()):
        base = digest.hex()  # make_id(name)
        if count:
            row["id"] = make_id(f"{row['name']}#{count}")
            if not row["status"]:
                row["status"], row["error"] = "duplicate_uri", f"same source name as record {base}"
        else:
            row["id"] = base
    return rows


def ingest(sources: Iterable[str], stage_dir: str | os.PathLike, settings: IngestSettings = IngestSettings(),
           on_part: Callable[[int, dict], None] | None = None) -> dict:
    """Plan, then run every unfinished part (in parallel processes); returns counts by status.

    A new plan feeds its parts to the workers as it writes them (the rows go with the task, so a
    worker does not read them back); an existing plan runs its unfinished parts."""
    stage_dir = Path(stage_dir)
    sources = list(sources)
    n_planned = _planned_parts(sources, stage_dir)
    if n_planned is None:
        jobs: Iterator[tuple[int, list[dict] | None, bool]] = _new_plan(sources, stage_dir, settings.part_size)
        done_before: list[int] = []
    else:
        todo = pending_parts(stage_dir, n_planned)
        jobs = ((i, None, k + 1 < len(todo)) for k, i in enumerate(todo))
        done_before = sorted(set(range(n_planned)) - set(todo))
    total = Counter(status_counts(stage_dir, done_before)) if done_before else Counter()
    try:
        workers = settings.workers or os.cpu_count() or 1
        # more than one part (worker processes or not) is known as soon as the first part is written
        first = [job for job in (next(jobs, None),) if job is not None]
        if workers > 1 and first and first[0][2]:
            ctx = get_context(_start_method())
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            try:
                futures = {}
                for i, items, _ in chain(first, jobs):  # parts start while the plan is still being written
                    futures[pool.submit(run_part, stage_dir, i, settings, items)] = i
                for fut in as_completed(futures):
                    counts = fut.result()
                    total.update(counts)
                    if on_part:
                        on_part(futures[fut], counts)
            finally:  # on an error, parts not started are not started; running ones finish or fail
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for i, items, _ in chain(first, jobs):
                counts = run_part(stage_dir, i, settings, items)
                total.update(counts)
                if on_part:
                    on_part(i, counts)
    finally:  # an unfinished new plan is dropped (its temporary directory removed); a rerun plans again
        close = getattr(jobs, "close", None)
        if close is not None:
            close()
    return dict(sorted(total.items()))


def pending_parts(stage_dir: str | os.PathLike, n_parts: int) -> list[int]:
    """The planned parts not yet done, after removing a killed run's half-written files (its workers
    died with it; call this before starting any part) and the download cache of a part that was
    killed after its records were written but before its cache was removed."""
    stage_dir = Path(stage_dir)
    for d in (stage_dir, stage_dir / "shards", *sorted((stage_dir / "_cache").glob("part-*"))):
        clean_temporaries(d)
    todo = [i for i in range(n_parts) if not (stage_dir / part_name(i)).exists()]
    pending = set(todo)
    for cache in sorted((stage_dir / "_cache").glob("part-*")):
        if cache.name[len("part-"):].isdigit() and int(cache.name[len("part-"):]) not in pending:
            shutil.rmtree(cache, ignore_errors=True)
    return todo


def _start_method() -> str:
    """"fork" where it is safe and available (Linux, only this thread running), else "spawn".

    A forked worker starts at once with the driver's imports (numpy, PIL, pyarrow and the pandas
    that pyarrow loads: about a second of CPU per spawned worker); with other threads running,
    a fork could copy a lock one of them holds, so workers are spawned.
    """
    return "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker dies with its driver, so a killed run leaves no writer behind.

    On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere, a
    watcher thread exits the worker within half a second of its parent's death.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def status_counts(stage_dir: str | os.PathLike, parts: Iterable[int] | None = None) -> dict:
    """Counts of records by status over all finished parts (or over the given parts)."""
    total: Counter = Counter()
    paths = list_parts(stage_dir) if parts is None else [Path(stage_dir) / part_name(i) for i in parts]
    for p in paths:
        col = pq.read_table(p, columns=["status"]).column("status")
        total.update(col.to_pylist())
    return dict(sorted(total.items()))


def run_part(stage_dir: str | os.PathLike, index: int, settings: IngestSettings,
             items: list[dict] | None = None) -> dict:
    """Process one part: fetch, check, write its raw shard, then its records (the done marker).

    `items`: the part's plan rows when the caller has them (as `_new_plan` yields them); else they
    are read from the plan. The raw shard and the records are fsynced together, and the records are
    renamed into place only after the shard."""
    stage_dir = Path(stage_dir)
    out = stage_dir / part_name(index)
    if out.exists():
        return {}
    if items is None:
        items = pq.read_table(stage_dir / "_plan" / part_name(index)).to_pylist()
    cache = stage_dir / "_cache" / f"part-{index:05d}"
    shard_name = f"shard-{index:05d}.tar"
    records: list[dict] = []
    good: list[tuple[int, bytes]] = []
    with DownloadJournal(cache) as journal, _Reader() as reader:
        fetched = _download_and_check(items, journal, settings)
        for pos, row in enumerate(items):
            rec, data = fetched.pop(pos, None) or _process(row, reader, journal, settings)
            if data is not None:
                good.append((len(records), data))
            records.append(rec)
    shard_dir = ensure_dir(stage_dir / "shards")
    samples = ({"__key__": records[i]["id"], records[i]["ext"]: data, "json": _raw_meta(records[i])}
               for i, data in good)
    layout: dict = {}
    with SyncedWrite(shard_dir / shard_name, lambda tmp: layout.update(write_samples(tmp, samples))) as shard:
        for i, _ in good:
            rec = records[i]
            rec["raw_shard"], rec["raw_key"] = f"shards/{shard_name}", rec["id"]
            rec["raw_offset"] = layout[rec["id"]][rec["ext"]][0]
        table = records_table(records)
        with SyncedWrite(out, lambda tmp: pq.write_table(table, tmp, compression="zstd",
                                                          write_statistics=True)) as done_marker:
            shard.commit()  # both files are synced before either is renamed: the shard first
            done_marker.commit()
    shutil.rmtree(cache, ignore_errors=True)
    return dict(Counter(r["status"] for r in records))


def _raw_meta(rec: dict) -> str:
    meta = {k: rec[k] for k in ("id", "uri", "width", "height", "sha256")}
    meta.update(json.loads(rec["_extra"]) if rec.get("_extra") else {})
    return _META_JSON.encode(meta)


_META_JSON = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(meta, sort_keys=True, default=str)


def _download_and_check(items: list[dict], journal: DownloadJournal,
                        settings: IngestSettings) -> dict[int, tuple[dict, bytes | None]]:
    """Download the part's URLs not yet in the journal; each result is journaled, then checked as it lands.

    Returns {position in the part: (record, bytes if ok)}. The checks run on `_CHECK_THREADS`
    threads of their own (decoding releases the GIL), at most 2 per thread waiting, so a slow
    check holds the downloads back instead of piling bodies up in memory.
    """
    todo = [pos for pos, r in enumerate(items) if r["kind"] == "url" and not r["status"] and r["id"] not in journal]
    done: dict[int, tuple[dict, bytes | None]] = {}
    if not todo:
        return done
    slots = threading.BoundedSemaphore(2 * _CHECK_THREADS)

    def check(pos: int, fetched: dict) -> None:
        try:
            done[pos] = _checked(_record(items[pos]), fetched, settings.check)
        finally:
            slots.release()

    with ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="check") as pool:
        futures = []
        for idx, res in download_many((items[pos]["uri"] for pos in todo), settings.download):
            fetched = journal.put(items[todo[idx]]["id"], res)
            slots.acquire()
            futures.append(pool.submit(check, todo[idx], fetched))
        for fut in futures:
            fut.result()
    return done


class _Reader:
    """Reads file and tar-member bytes for one part, keeping tars open."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}
        self._members: dict[str, dict[str, tarfile.TarInfo]] = {}

    def tar_member(self, row: dict) -> bytes:
        path = row["path"]
        if row["offset"] is not None:
            fh = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
            fh.seek(row["offset"])
            return fh.read(row["size"])
        if path not in self._members:
            self._members[path] = self._index(path)
        info = self._members[path].get(row["member"])
        if info is None:
            raise OSError(f"member {row['member']!r} not found")
        if not info.isfile():  # never follow a link: its target may be anything
            raise OSError(f"member {row['member']!r} is not a regular file")
        return self._files[path].extractfile(info).read()

    def _index(self, path: str) -> dict[str, tarfile.TarInfo]:
        """First member of each name in a compressed tar (the plan reads the first; later ones are duplicates)."""
        tf = self._files[path] = tarfile.open(path, "r:*")
        first: dict[str, tarfile.TarInfo] = {}
        try:
            for info in tf:
                first.setdefault(info.name, info)
        except TAR_READ_ERRORS:  # members before the damage stay readable
            pass
        return first

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._files.values():
            fh.close()


def _record(row: dict) -> dict:
    return {"id": row["id"], "uri": row["uri"], "name": row["name"], "source": row["source"], "_extra": row["extra"]}


def _process(row: dict, reader: _Reader, journal: DownloadJournal,
             settings: IngestSettings) -> tuple[dict, bytes | None]:
    """One plan row -> (record, original bytes if the image is ok)."""
    check = settings.check
    rec = _record(row)
    if row["status"]:
        rec.update(status=row["status"], error=row["error"])
        return rec, None
    data: bytes | None = None
    try:
        if row["kind"] == "url":
            # a journal entry lost or damaged (e.g. by a killed run) is downloaded again, never a status
            fetched = journal.get(row["id"]) or journal.put(row["id"], download(row["uri"], settings.download))
            return _checked(rec, fetched, check)
        elif row["size"] is not None and row["size"] > check.max_bytes:
            rec.update(status="too_large", error=f"{row['size']} bytes > {check.max_bytes}", nbytes=row["size"])
            return rec, None
        elif row["kind"] == "tar":
            data = reader.tar_member(row)
        else:
            with open(row["path"], "rb") as fh:
                data = fh.read()
    except OutputError:
        raise
    except TAR_READ_ERRORS as exc:
        rec.update(status="read_error", error=utf8_text(f"{type(exc).__name__}: {exc}")[0][:200])
        return rec, None
    return _check(rec, data, check)


def _checked(rec: dict, fetched: dict, check: CheckSettings) -> tuple[dict, bytes | None]:
    """A download's record: its failure status, or the image check of its bytes."""
    rec["http_status"] = fetched["http_status"]
    if fetched["status"] != "ok":
        rec.update(status=fetched["status"], error=fetched["error"])
        return rec, None
    return _check(rec, fetched["data"], check)


def _check(rec: dict, data: bytes, check: CheckSettings) -> tuple[dict, bytes | None]:
    try:
        res: ImageCheck = check_image(data, check)
    except Exception as exc:  # an unexpected decoder failure is a bad file, not a dead part
        rec.update(status="decode_error", error=f"{type(exc).__name__}: {exc}"[:200], nbytes=len(data))
        return rec, None
    rec.update(vars(res))
    return rec, (data if res.status == "ok" else None)


def records_table(records: list[dict]) -> pa.Table:
    """Records as a table: core columns typed, carried columns (caption, ...) appended after."""
    extras = [json.loads(r["_extra"]) if r.get("_extra") else {} for r in records]
    names = sorted({k for e in extras for k in e})
    arrays = {name: pa.array([r.get(name) for r in records], type=t) for name, t in RECORD_FIELDS}
    for key in names:
        col = key if key not in CORE_COLUMNS else f"src_{key}"
        values = [e.get(key) for e in extras]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[col] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(arrays)
