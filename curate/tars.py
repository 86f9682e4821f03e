"""Deterministic webdataset tar writing with known member offsets, and random-access reads.

The same samples always give the same bytes, and the data offset of every member is recorded
while writing, which lets later stages read one image by seek without scanning the tar.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from curate.parts import output_errors

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to a multiple of this
_ZEROS = bytes(BLOCK)


def padded(n: int) -> int:
    """Bytes a member of size n occupies after its header (rounded up to 512)."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def sample_nbytes(sizes: Iterable[int]) -> int:
    """Bytes one sample takes in a tar: a header plus padded data per member."""
    return sum(BLOCK + (s + BLOCK - 1) // BLOCK * BLOCK for s in sizes)


def tar_file_size(content: int) -> int:
    """Size on disk of a tar whose members take `content` bytes: end blocks, then record padding."""
    return (content + 2 * BLOCK + RECORD - 1) // RECORD * RECORD


_UNAME = b"curate"
_HEAD = (b"%07o\0" % 0o444) + (b"%07o\0" % 0) * 2  # mode, uid, gid
_MID = (b"%011o\0" % 0)  # mtime 0
_TAIL = (b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC + _UNAME.ljust(32, b"\0") + _UNAME.ljust(32, b"\0")
         + b"\0" * 8 * 2 + b"\0" * 155 + b"\0" * 12)  # type, linkname, magic, uname, gname, dev, prefix, pad
_FIXED_SUM = sum(_HEAD) + sum(_MID) + sum(b" " * 8) + sum(_TAIL)


def member_header(name: str, size: int) -> bytes:
    """USTAR header of a regular file (mode 0444, mtime 0, owner curate), byte-identical to
    ``TarInfo.tobuf(USTAR_FORMAT, "utf-8", "surrogateescape")`` for the same fields; long names
    and huge sizes go through tarfile itself."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        info.uname = info.gname = _UNAME.decode()
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _HEAD, size_field, _MID, b"%06o\0 " % chksum, _TAIL))


def member_headers(names: Sequence[str], sizes: Sequence[int]) -> list:
    """`member_header` of many members at once (numpy over the batch): byte-identical headers, as
    512-byte memoryviews of one buffer (writev and `bytes()` take them as they are)."""
    raws = [n.encode("utf-8", "surrogateescape") for n in names]
    k = len(raws)
    if not k:
        return []
    size = np.asarray(sizes, dtype=np.int64)
    arr = np.empty((k, BLOCK), dtype=np.uint8)
    arr[:] = _TEMPLATE
    long = [i for i, r in enumerate(raws) if len(r) > 100]
    arr[:, :100] = np.frombuffer(b"".join([r[:100].ljust(100, b"\0") for r in raws]), dtype=np.uint8).reshape(k, 100)
    for d in range(11):  # size: 11 octal digits, then NUL
        arr[:, 124 + d] = 48 + ((size >> (3 * (10 - d))) & 7)
    chksum = arr.sum(axis=1, dtype=np.int64)  # the checksum field holds 8 spaces while summing
    for d in range(6):  # checksum: 6 octal digits, NUL, space
        arr[:, 148 + d] = 48 + ((chksum >> (3 * (5 - d))) & 7)
    arr[:, 154] = 0
    view = memoryview(arr.reshape(-1).data).cast("B")
    out = [view[i * BLOCK: (i + 1) * BLOCK] for i in range(k)]
    for i in long + [int(i) for i in np.flatnonzero(size >= 8**11)]:
        out[i] = member_header(names[i], int(sizes[i]))
    return out


_TEMPLATE = np.frombuffer(member_header("", 0), dtype=np.uint8).copy()
_TEMPLATE[148:156] = ord(" ")


def write_samples(path: str | os.PathLike, samples: Iterable[dict[str, bytes | str]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Write samples (dicts with __key__ and ext -> bytes) as a webdataset tar at `path`.

    Returns key -> ext -> (data offset, size). Members of a sample are written in sorted-extension
    order with fixed metadata (USTAR, mtime 0), so the same samples always give the same bytes.
    Headers are USTAR headers byte-identical to the stdlib's (`member_header`); the archive ends with
    two zero blocks padded to a 20-block record, exactly as tarfile closes it. (webdataset's writer
    is not used: importing webdataset imports torch in every worker, and it cannot report member
    offsets.) The file is not fsynced here: callers write to an `atomic_path`, which syncs it once
    before the rename. A full disk or missing rights raise `curate.parts.OutputError`.
    """
    layout: dict[str, dict[str, tuple[int, int]]] = {}

    def members() -> Iterator[tuple[bytes, bytes, int]]:
        pos = 0
        for sample in samples:
            key = str(sample["__key__"])
            entry = {}
            for ext in sorted(k for k in sample if k != "__key__"):
                value = sample[ext]
                data = value.encode() if isinstance(value, str) else value
                size = len(data)
                yield member_header(f"{key}.{ext}", size), data, size
                entry[ext] = (pos + BLOCK, size)
                pos += BLOCK + size + (-size % BLOCK)
            layout[key] = entry

    _write_tar(path, members())
    return layout


def _write_tar(path: str | os.PathLike, members: Iterable[tuple[bytes, bytes, int]]) -> None:
    """Write (header, data, size) members, then the end of the archive, by writev in batches (not
    fsynced); a full disk or missing rights raise `curate.parts.OutputError`."""
    pos = flushed = 0
    fd = None
    with output_errors(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
            pieces: list = []
            for header, data, size in members:
                pad = -size % BLOCK
                pieces += (header, data, _ZEROS[:pad])
                pos += BLOCK + size + pad
                if len(pieces) >= _MAX_PIECES or pos - flushed >= _FLUSH_BYTES:
                    _write_all(fd, pieces, pos - flushed)
                    pieces, flushed = [], pos
            end = tar_file_size(pos)
            pieces.append(bytes(end - pos))
            _write_all(fd, pieces, end - flushed)
        finally:
            if fd is not None:
                os.close(fd)


def write_members(path: str | os.PathLike, names: Sequence[str], sizes: Sequence[int], data: Iterable[bytes]) -> None:
    """Write a tar of regular-file members in the given order: `names[i]` holds `sizes[i]` bytes, the
    i-th item of `data`. The bytes are those `write_samples` writes for the same members (headers
    built for the whole batch by `member_headers`). Not fsynced (see `write_samples`)."""
    headers = member_headers(names, sizes)

    def members() -> Iterator[tuple[bytes, bytes, int]]:
        for i, (header, size, chunk) in enumerate(zip(headers, sizes, data)):
            if len(chunk) != size:
                raise ValueError(f"member {i} has {len(chunk)} bytes, not {size}")
            yield header, chunk, size

    _write_tar(path, members())


_MAX_PIECES = 510  # pieces per writev, under IOV_MAX (1024 on Linux)
_FLUSH_BYTES = 1 << 20


def _write_all(fd: int, pieces: list, nbytes: int) -> None:
    """Write `pieces` (nbytes in all) in order: one writev in the usual case, and no joined copy."""
    writev = getattr(os, "writev", None)
    if writev is None:  # no writev on this platform
        data = memoryview(b"".join(pieces))
        while data:
            data = data[os.write(fd, data):]
        return
    i = 0
    while i < len(pieces):
        batch = pieces if i == 0 and len(pieces) <= 1024 else pieces[i: i + 1024]
        n = writev(fd, batch)
        if n == nbytes and batch is pieces:
            return
        start = i
        for piece in batch:  # skip what was written; a short write resumes inside a piece
            if n < len(piece):
                if n:
                    pieces[i] = memoryview(piece)[n:]
                    start = -1
                break
            n -= len(piece)
            i += 1
        if i == start and len(pieces[i]):
            raise OSError(f"writev to descriptor {fd} wrote nothing")


class TarReader:
    """Reads members of uncompressed tars by (offset, size), keeping a few files open."""

    def __init__(self, root: str | os.PathLike = "") -> None:
        self.root = Path(root)
        self._open: dict[str, object] = {}

    def read(self, shard: str, offset: int, size: int) -> bytes:
        """Bytes of one member (one pread)."""
        fh = self._open.get(shard)
        if fh is None:
            if len(self._open) >= 16:
                self.close()
            fh = open(self.root / shard, "rb", buffering=0)
            self._open[shard] = fh
        data = os.pread(fh.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"short read in {shard} at {offset}: {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        """Close every open file."""
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
