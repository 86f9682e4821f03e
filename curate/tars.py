"""Deterministic webdataset tar writing with known member offsets, and random-access reads.

Tars are written with webdataset's TarWriter (USTAR, fixed mtime), so the same samples always
give the same bytes, and the data offset of every member is computed while writing, which lets
later stages read one image by seek without scanning the tar.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to a multiple of this


def padded(n: int) -> int:
    """Bytes a member of size n occupies after its header (rounded up to 512)."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def sample_nbytes(sizes: Iterable[int]) -> int:
    """Bytes one sample takes in a tar: a header plus padded data per member."""
    return sum(BLOCK + padded(s) for s in sizes)


def tar_file_size(content: int) -> int:
    """Size on disk of a tar whose members take `content` bytes: end blocks, then record padding."""
    return (content + 2 * BLOCK + RECORD - 1) // RECORD * RECORD


def write_samples(path: str | os.PathLike, samples: Iterable[dict[str, bytes | str]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Write samples (dicts with __key__ and ext -> bytes) to a tar at `path`.

    Returns key -> ext -> (data offset, size). Members are laid out in sorted-extension order,
    exactly as TarWriter writes them; names must stay under 100 bytes (USTAR, no extra headers).
    """
    import webdataset as wds

    layout: dict[str, dict[str, tuple[int, int]]] = {}
    pos = 0
    with open(path, "wb") as fh:
        writer = wds.TarWriter(fh, encoder=False, mtime=0, user="curate", group="curate", mode=0o444)
        for sample in samples:
            key = str(sample["__key__"])
            members = {k: (v.encode() if isinstance(v, str) else bytes(v))
                       for k, v in sample.items() if k != "__key__"}
            entry = {}
            for ext in sorted(members):
                name = f"{key}.{ext}"
                if len(name.encode()) >= 100:
                    raise ValueError(f"tar member name too long for USTAR: {name!r}")
                entry[ext] = (pos + BLOCK, len(members[ext]))
                pos += BLOCK + padded(len(members[ext]))
            writer.write({"__key__": key, **members})
            layout[key] = entry
        writer.close()
        fh.flush()
        os.fsync(fh.fileno())
    return layout


class TarReader:
    """Reads members of uncompressed tars by (offset, size), keeping a few files open."""

    def __init__(self, root: str | os.PathLike = "") -> None:
        self.root = Path(root)
        self._open: dict[str, object] = {}

    def read(self, shard: str, offset: int, size: int) -> bytes:
        """Bytes of one member."""
        fh = self._open.get(shard)
        if fh is None:
            if len(self._open) >= 16:
                self.close()
            fh = open(self.root / shard, "rb")
            self._open[shard] = fh
        fh.seek(offset)
        data = fh.read(size)
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
