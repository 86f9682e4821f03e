"""Finished downloads of one ingest part, kept in an append-only journal so a rerun never refetches.

One file per part. Each entry is a frame: a fixed header (magic, CRC-32 of the rest, lengths), the
metadata as JSON, then the body, appended with one `writev`. Appends are not fsynced one by one:
a killed process loses nothing it wrote (the kernel has it), and a frame torn by a crash fails its
length or CRC check, so it and everything after it are cut off on the next open and those URLs are
simply fetched again. The part's records file, written atomically, stays the only done-marker.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path
from types import TracebackType

from curate.download import DownloadResult
from curate.parts import ensure_dir, output_errors

_MAGIC = b"DLJ1"
_HEADER = struct.Struct("<4sIIQ")  # magic, crc32(meta + body), len(meta), len(body)
_MAX_META = 1 << 20


class DownloadJournal:
    """Context manager over `<cache dir>/downloads.journal`: `get` finished entries, `put` new ones.

    The file is created by the first `put`, so parts without URLs leave no cache behind.
    """

    NAME = "downloads.journal"

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / self.NAME
        self._fd = -1
        self._end = 0
        self._index: dict[str, tuple[dict, int]] = {}  # id -> (meta, offset of the body)

    def __enter__(self) -> DownloadJournal:
        if self.path.exists():
            self._open()
        return self

    def _open(self) -> None:
        """Open (or create) the file and index it, cutting off a torn or damaged tail."""
        with output_errors(self.path):
            ensure_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._end = self._scan()
            if os.fstat(self._fd).st_size != self._end:
                os.ftruncate(self._fd, self._end)  # its downloads are fetched again

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __contains__(self, rid: str) -> bool:
        return rid in self._index

    def get(self, rid: str) -> dict | None:
        """The finished download `rid` (status, http_status, error, attempts, data), or None."""
        entry = self._index.get(rid)
        if entry is None:
            return None
        meta, offset = entry
        data = None
        if meta["status"] == "ok":
            data = os.pread(self._fd, meta["nbytes"], offset)
            if len(data) != meta["nbytes"]:  # the file was cut under us: fetch again
                return None
        return {**meta, "data": data}

    def put(self, rid: str, res: DownloadResult) -> dict:
        """Append one result; returns it as `get` would."""
        meta = {"status": res.status, "http_status": res.http_status, "error": res.error,
                "attempts": res.attempts, "nbytes": len(res.data) if res.data is not None else 0}
        raw = json.dumps({"id": rid, **meta}).encode()
        if self._fd < 0:
            self._open()
        body = res.data or b""
        crc = zlib.crc32(body, zlib.crc32(raw))
        header = _HEADER.pack(_MAGIC, crc, len(raw), len(body))
        with output_errors(self.path):
            written = os.writev(self._fd, [header, raw, body] if body else [header, raw])
            if written != len(header) + len(raw) + len(body):
                raise OSError(errno.EIO, "short write", str(self.path))
        self._index[rid] = (meta, self._end + len(header) + len(raw))
        self._end += written
        return {**meta, "data": res.data}

    def _scan(self) -> int:
        """Index every whole frame from the start; returns the offset just past the last good one."""
        size = os.fstat(self._fd).st_size
        pos = 0
        while pos + _HEADER.size <= size:
            magic, crc, n_meta, n_body = _HEADER.unpack(os.pread(self._fd, _HEADER.size, pos))
            end = pos + _HEADER.size + n_meta + n_body
            if magic != _MAGIC or n_meta > _MAX_META or end > size:
                break
            raw = os.pread(self._fd, n_meta, pos + _HEADER.size)
            body_crc = _crc_of_range(self._fd, pos + _HEADER.size + n_meta, n_body, zlib.crc32(raw))
            try:
                meta = json.loads(raw)
                ok = body_crc == crc and isinstance(meta, dict) and meta.get("nbytes") == (
                    n_body if meta.get("status") == "ok" else 0) and isinstance(meta.get("id"), str)
            except ValueError:
                ok = False
            if not ok:
                break
            self._index[meta.pop("id")] = (meta, pos + _HEADER.size + n_meta)
            pos = end
        return pos


def _crc_of_range(fd: int, offset: int, length: int, crc: int) -> int:
    """CRC-32 of `length` bytes of `fd` from `offset`, continuing `crc`, read in bounded pieces."""
    while length > 0:
        piece = os.pread(fd, min(length, 1 << 20), offset)
        if not piece:
            return -1
        crc = zlib.crc32(piece, crc)
        offset += len(piece)
        length -= len(piece)
    return crc
