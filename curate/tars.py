"""Deterministic webdataset tar writing with known member offsets, and random-access reads.

The same samples always give the same bytes, and the data offset of every member is recorded
while writing, which lets later stages read one image by seek without scanning the tar.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

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


def write_samples(path: str | os.PathLike, samples: Iterable[dict[str, bytes | str]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Write samples (dicts with __key__ and ext -> bytes) as a webdataset tar at `path`.

    Returns key -> ext -> (data offset, size). Members of a sample are written in sorted-extension
    order with fixed metadata (USTAR, mtime 0), so the same samples always give the same bytes.
    Headers come from the stdlib's TarInfo; the archive ends with two zero blocks padded to a
    20-block record, exactly as tarfile closes it. (webdataset's writer is not used: importing
    webdataset imports torch in every worker, and it cannot report member offsets.)
    A full disk or missing rights raise `curate.parts.OutputError`.
    """
    layout: dict[str, dict[str, tuple[int, int]]] = {}
    pos = 0
    with output_errors(path), open(path, "wb", buffering=1 << 20) as fh:
        for sample in samples:
            key = str(sample["__key__"])
            entry = {}
            parts = []
            for ext in sorted(k for k in sample if k != "__key__"):
                value = sample[ext]
                data = value.encode() if isinstance(value, str) else bytes(value)
                size = len(data)
                parts += (member_header(f"{key}.{ext}", size), data, _ZEROS[: -size % BLOCK])
                entry[ext] = (pos + BLOCK, size)
                pos += BLOCK + size + -size % BLOCK
            fh.write(b"".join(parts))  # one write per sample
            layout[key] = entry
        end = tar_file_size(pos)
        fh.write(b"\0" * (end - pos))
        fh.flush()
        os.fsync(fh.fileno())
    return layout


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
