"""Disk full, read-only output and permission errors: one typed error, nothing half-written, and a
rerun after freeing space gives output identical to an uninterrupted run.

Two ways to fill a disk: a real 4 MB tmpfs mounted by the test (skipped where mounting is not
permitted), and ENOSPC injected at the write layer after a byte budget (runs everywhere).
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import curate.parts
import curate.tars
from curate.images import CheckSettings
from curate.ingest import IngestSettings, ingest
from curate.parts import OutputError, output_errors, read_table, write_bytes_atomic
from curate.shards import ShardSettings, write_shards

CHECK = CheckSettings(lowinfo=False)  # the pool is noise, incompressible on purpose: keep it
SETTINGS = IngestSettings(part_size=4, workers=1, check=CHECK)


def _noise_png(seed: int, side: int = 260) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory) -> Path:
    """22 incompressible images of ~200 KB: about 4.5 MB of raw shards."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    root.mkdir()
    for i in range(22):
        (root / f"{i:02d}.png").write_bytes(_noise_png(i))
    return root


@pytest.fixture(scope="module")
def reference(big_pool, tmp_path_factory) -> Path:
    """An uninterrupted ingest of big_pool (every image kept)."""
    out = tmp_path_factory.mktemp("ref") / "w"
    assert ingest([str(big_pool)], out, SETTINGS) == {"ok": 22}
    return out


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_nothing_half_written(d: Path) -> None:
    """No temporaries; every part that looks finished is readable and has its raw shard."""
    assert not [p for p in d.rglob("*") if ".tmp-" in p.name]
    for part in d.glob("part-*.parquet"):
        assert pq.read_table(part).num_rows > 0
        assert (d / "shards" / f"shard-{part.name[5:10]}.tar").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs at tmp_path/fs, unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_full_tmpfs_gives_one_clear_error_then_rerun_matches(big_pool, reference, small_fs, workers):
    out = small_fs / "w"
    settings = IngestSettings(part_size=4, workers=workers, check=CHECK)
    with pytest.raises(OutputError) as info:
        ingest([str(big_pool)], out, settings)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {small_fs}/w/")
    assert "no space left on the device; free space" in msg and info.value.errno == errno.ENOSPC
    _assert_nothing_half_written(out)
    assert len(list(out.glob("part-*.parquet"))) < 6
    _remount(small_fs, "size=64m")
    ingest([str(big_pool)], out, settings)
    assert _tree(out) == _tree(reference)


def test_read_only_output_is_a_clear_error(big_pool, small_fs):
    _remount(small_fs, "ro")
    with pytest.raises(OutputError, match=r"^cannot write .*/fs/w: the filesystem is read-only; choose a writable"):
        ingest([str(big_pool)], small_fs / "w", SETTINGS)


def test_full_tmpfs_during_shards_then_rerun_matches(big_pool, reference, small_fs, tmp_path):
    records = read_table(reference)
    settings = ShardSettings(max_count=3)
    write_shards(records, reference, tmp_path / "ref-out", settings)
    with pytest.raises(OutputError, match="no space left"):
        write_shards(records, reference, small_fs / "out", settings)
    assert not [p for p in (small_fs / "out").iterdir() if ".tmp-" in p.name]
    _remount(small_fs, "size=64m")
    write_shards(records, reference, small_fs / "out", settings)
    assert _tree(small_fs / "out") == _tree(tmp_path / "ref-out")


class _Disk:
    """A disk with a byte budget: writes past it fail with ENOSPC after writing what fits."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def take(self, n: int) -> int:
        fits = min(n, self.left)
        self.left -= fits
        return fits


def _inject(monkeypatch, disk: _Disk, error: int = errno.ENOSPC) -> None:
    """Route tar writes and Parquet writes of curate through the budgeted disk."""
    def write_all(fd, pieces, nbytes):  # curate.tars hands every tar byte to this one function
        data = b"".join(bytes(p) for p in pieces)
        fits = disk.take(len(data))
        os.write(fd, data[:fits])
        if fits < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = pq.write_table

    def write_table(table, where, **kw):
        real(table, where, **kw)
        size = Path(where).stat().st_size
        fits = disk.take(size)
        if fits < size:
            with open(where, "r+b") as fh:
                fh.truncate(fits)
            raise OSError(error, "injected failure")

    monkeypatch.setattr(curate.tars, "_write_all", write_all)
    monkeypatch.setattr(curate.parts.pq, "write_table", write_table)


@pytest.mark.parametrize("budget", [0, 150_000, 1_200_000, 2_500_000, 4_300_000])
def test_enospc_injected_at_the_write_layer_then_rerun_matches(big_pool, reference, tmp_path, monkeypatch, budget):
    with monkeypatch.context() as m:
        _inject(m, _Disk(budget))
        with pytest.raises(OutputError, match=r"^cannot write \S+: no space left on the device; free space"):
            ingest([str(big_pool)], tmp_path / "w", SETTINGS)
    _assert_nothing_half_written(tmp_path / "w")
    ingest([str(big_pool)], tmp_path / "w", SETTINGS)
    assert _tree(tmp_path / "w") == _tree(reference)


def test_permission_error_is_typed_and_other_errors_pass_through(tmp_path, monkeypatch):
    table = pq.read_table(_tiny_parquet(tmp_path))
    with monkeypatch.context() as m:
        _inject(m, _Disk(0), errno.EACCES)
        with pytest.raises(OutputError, match="permission denied; choose a writable location"):
            curate.parts.write_table_atomic(table, tmp_path / "x" / "t.parquet")
    assert list((tmp_path / "x").iterdir()) == []
    # an error about another file (an input) is not an output error
    with pytest.raises(FileNotFoundError), output_errors(tmp_path / "out"):
        open(tmp_path / "missing-input")
    with pytest.raises(PermissionError), output_errors(tmp_path / "out"):
        raise PermissionError(errno.EACCES, "denied", str(tmp_path / "someone-elses"))
    write_bytes_atomic(tmp_path / "ok.bin", b"fine")
    assert (tmp_path / "ok.bin").read_bytes() == b"fine"


def _tiny_parquet(tmp_path: Path) -> Path:
    import pyarrow as pa

    path = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    return path
