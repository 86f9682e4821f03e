"""Parquet parts on disk: atomic writes, ordered listing, row-aligned reads across stages.

A part is written to a temporary name and renamed when complete, so a crash never leaves a half
part that looks whole. Stages add columns in their own directory, row-aligned with ingest parts.
A write that fails for want of space or rights raises `OutputError` (one line: path, what to do),
after removing its temporary file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_RE = re.compile(r"^part-(\d{5,})(\.[a-z]+)$")  # part-00000.parquet, part-00000.npy


_FREE = "free space (or use a larger disk) and rerun; finished parts are kept"
_WRITABLE = "choose a writable location or give this user write access, then rerun; finished parts are kept"
OUTPUT_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _FREE),
    errno.EDQUOT: ("disk quota exceeded", _FREE),
    errno.EFBIG: ("file too large for this filesystem", _FREE),
    errno.EROFS: ("the filesystem is read-only", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
}
"""errno -> (reason, what to do) of the write failures reported as `OutputError`."""


class OutputError(OSError):
    """Output that cannot be written (disk full, read-only, no permission); str() is one clear line."""

    def __init__(self, path: str | os.PathLike, reason: str, what_to_do: str, errno_: int | None = None) -> None:
        super().__init__(errno_, reason)
        self.path, self.reason, self.what_to_do = str(path), reason, what_to_do

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}; {self.what_to_do}"

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason, self.what_to_do, self.errno)


@contextmanager
def output_errors(path: str | os.PathLike, *also: str | os.PathLike) -> Iterator[None]:
    """Turn space and permission failures of writes to `path` (or `also`) into `OutputError`.

    An OSError naming another file (e.g. an input that cannot be read) passes through unchanged.
    """
    mine = {str(p) for p in (path, *also)}
    try:
        yield
    except OutputError as exc:
        if exc.path in mine and exc.path != str(path):
            raise OutputError(path, exc.reason, exc.what_to_do, exc.errno) from exc
        raise
    except OSError as exc:
        known = OUTPUT_ERRNOS.get(exc.errno)  # type: ignore[arg-type]
        if known is None or (exc.filename is not None and str(exc.filename) not in mine):
            raise
        raise OutputError(path, *known, exc.errno) from exc


def ensure_dir(path: str | os.PathLike) -> Path:
    """mkdir -p, with `OutputError` when the location is read-only, full or not ours."""
    path = Path(path)
    with output_errors(path, *map(str, path.parents)):
        path.mkdir(parents=True, exist_ok=True)
    return path


def part_name(index: int) -> str:
    """File name of part `index` (part-00000.parquet)."""
    return f"part-{index:05d}.parquet"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with output_errors(path, tmp, path.parent):
            yield tmp
            if tmp.is_dir():
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
            else:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            try:
                tmp.unlink()
            except OSError:  # left for clean_temporaries on the next run
                pass


class SyncedWrite:
    """A file written to a temporary sibling, fsynced on a background thread while the caller works
    on, and renamed into place by `commit()` (after its fsync has returned), so several files can be
    made durable at once: the same guarantee as `atomic_path`, fewer waits.

    `write(tmp)` writes the file: now, or with `in_background=True` on the same thread as the fsync
    (for writes that release the GIL, e.g. Parquet; `write` must then only read shared state).
    Leaving the `with` block without `commit()` (an error) removes the temporary file. Space and
    permission failures raise `OutputError`, as with `atomic_path` (from `commit()` when in the
    background).
    """

    def __init__(self, path: str | os.PathLike, write: Callable[[Path], object], in_background: bool = False) -> None:
        self.path = Path(path)
        ensure_dir(self.path.parent)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not in_background:
            try:
                with output_errors(self.path, self.tmp, self.path.parent):
                    write(self.tmp)
            except BaseException:
                self._remove()
                raise
        self._thread = threading.Thread(target=self._run, args=(write if in_background else None,), name="fsync",
                                        daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[Path], object] | None) -> None:
        try:
            if write is not None:
                write(self.tmp)
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # raised again by commit(), in the caller's thread
            self._error = exc

    def commit(self) -> None:
        """Wait for the write and the fsync, then rename the file into place."""
        self._join()
        with output_errors(self.path, self.tmp, self.path.parent):
            if self._error is not None:
                raise self._error
            os.replace(self.tmp, self.path)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _remove(self) -> None:
        try:
            self.tmp.unlink()
        except OSError:  # already renamed, or left for clean_temporaries on the next run
            pass

    def __enter__(self) -> SyncedWrite:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._join()
        if exc_type is not None or self.tmp.exists():
            self._remove()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file atomically (deterministic bytes for the same table)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)


def clean_temporaries(directory: str | os.PathLike) -> int:
    """Remove leftovers of interrupted atomic writes; returns how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    removed = 0
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            with output_errors(directory, p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed += 1
    return removed


def list_parts(directory: str | os.PathLike, suffix: str = ".parquet") -> list[Path]:
    """Complete parts in `directory` (`part-XXXXX<suffix>`), ordered by part number."""
    directory = Path(directory)
    if not directory.exists():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PART_RE.match(p.name)) and m.group(2) == suffix]
    return [p for _, p in sorted(found)]


def read_table(directory: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """All parts of a stage as one table (schemas unified; missing columns become nulls)."""
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"no parts in {directory}")
    tables = [_read_part(p, columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def _read_part(path: Path, columns: Sequence[str] | None) -> pa.Table:
    if columns is None:
        return pq.read_table(path)
    present = set(pq.read_schema(path).names)
    return pq.read_table(path, columns=[c for c in columns if c in present])


def read_aligned(stage_dirs: Sequence[str | os.PathLike], index: int,
                 columns: dict[str, Sequence[str]] | None = None) -> pa.Table:
    """Part `index` of several stages joined column-wise; checks the `id` columns align."""
    base: pa.Table | None = None
    for d in stage_dirs:
        want = None if columns is None else columns.get(str(d))
        path = Path(d) / part_name(index)
        t = _read_part(path, None if want is None else ["id", *[c for c in want if c != "id"]])
        if base is None:
            base = t
            continue
        if t.num_rows != base.num_rows or not t.column("id").equals(base.column("id")):
            raise ValueError(f"{path} is not row-aligned with the ingest part {index}")
        for name in t.column_names:
            if name == "id":
                continue
            col = t.column(name)
            if name in base.column_names:
                base = base.set_column(base.column_names.index(name), name, col)
            else:
                base = base.append_column(name, col)
    assert base is not None
    return base


# mapper(fn, jobs, shared) yields (job index, fn(*shared, *job)) for every job, in any order
Mapper = Callable[[Callable, Sequence[tuple], tuple], Iterable[tuple[int, object]]]


def local_map(fn: Callable, jobs: Sequence[tuple], shared: tuple = ()) -> Iterator[tuple[int, object]]:
    """The local Mapper: the jobs one after the other in this process."""
    for i, job in enumerate(jobs):
        yield i, fn(*shared, *job)


def map_in_order(mapper: Mapper | None, fn: Callable, jobs: Sequence[tuple], shared: tuple = ()) -> list:
    """Every job's result in job order, whatever order `mapper` (None: local_map) yields them in."""
    out: list = [None] * len(jobs)
    for k, res in (mapper or local_map)(fn, jobs, shared):
        out[k] = res
    return out
