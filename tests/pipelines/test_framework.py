"""The stage framework as a user meets it: one owner per stage, one-line errors, hints when a
stage drops everything."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq

from pipelines.cli import main
from pipelines.synth import encode, make_image


def _pool(root, n=6, size=(64, 48)):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img{i:02d}.png").write_bytes(encode(make_image(i, size), "PNG"))


HOLD = """
import sys, time
from pipelines.framework import stage_lock
with stage_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(workdir, stage):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), stage], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_of_a_stage_fails_at_once_naming_the_holder(tmp_path, capsys):
    _pool(tmp_path / "raw")
    w = tmp_path / "w"
    holder = _holder(w, "ingest")
    try:
        t0 = time.time()
        assert main(["ingest", str(tmp_path / "raw"), "--workdir", str(w)]) == 2
        assert time.time() - t0 < 10
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"pid {holder.pid}" in err and socket.gethostname() in err
        assert not (w / "ingest").exists()  # nothing written before the lock
        # a whole run refuses too, at its first locked stage
        assert main(["run", "/dev/null", f"workdir={w}", f"ingest.sources=[{tmp_path / 'raw'}]"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: the same command now runs
    assert main(["ingest", str(tmp_path / "raw"), "--workdir", str(w)]) == 0
    assert (w / "ingest" / "_MANIFEST.json").exists()


def test_stage_lock_is_per_stage_and_released_after_the_block(tmp_path):
    from pipelines.framework import StageBusy, stage_lock

    holder = _holder(tmp_path, "ingest")
    try:
        with stage_lock(tmp_path, "hashdedup"):  # another stage of the same workdir is free
            pass
        try:
            with stage_lock(tmp_path, "ingest"):
                raise AssertionError("two owners of one stage")
        except StageBusy as exc:
            assert str(holder.pid) in str(exc)
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(tmp_path, "ingest"):
        with_lock = True
    assert with_lock


def test_a_stage_that_drops_everything_names_the_setting(tmp_path, capsys):
    _pool(tmp_path / "raw", n=4, size=(28, 28))
    assert main(["ingest", str(tmp_path / "raw"), "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "note: all 4 inputs dropped; 4 as too_small; ingest.min_side is 32" in out


def test_curate_run_stops_when_nothing_is_left_and_says_why(tmp_path, capsys):
    _pool(tmp_path / "raw", n=4, size=(28, 28))
    (tmp_path / "c.yaml").write_text(f"ingest:\n  sources: [{tmp_path / 'raw'}]\n  workers: 1\n"
                                     "balance:\n  target: 2\n")
    assert main(["run", str(tmp_path / "c.yaml"), f"workdir={tmp_path / 'w'}"]) == 2
    captured = capsys.readouterr()
    assert "ingest.min_side is 32" in captured.out and "nothing left to curate: the stages after ingest" in captured.out
    assert captured.err.strip().splitlines()[-1] == "curate run: error: nothing left to curate after ingest (see the note above)"
    assert not (tmp_path / "w" / "hashdedup").exists()


def test_disk_full_is_one_line_and_leaves_no_finished_stage(tmp_path, capsys, monkeypatch):
    _pool(tmp_path / "raw")
    w = tmp_path / "w"
    assert main(["ingest", str(tmp_path / "raw"), "--workdir", str(w)]) == 0
    capsys.readouterr()
    real = pq.write_table

    def full(table, where, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(pq, "write_table", full)
    assert main(["hashdedup", "--workdir", str(w)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(w / "hashdedup") in err
    assert "no space left" in err.lower() and "free" in err.lower()
    assert not (w / "hashdedup" / "_MANIFEST.json").exists()
    assert not [p for p in (w / "hashdedup").iterdir() if p.name.startswith("part-")]
    monkeypatch.setattr(pq, "write_table", real)  # space freed: the rerun completes
    assert main(["hashdedup", "--workdir", str(w)]) == 0
    assert (w / "hashdedup" / "_MANIFEST.json").exists()


def test_moving_the_inputs_redoes_nothing_and_keeps_the_ids(tmp_path, capsys):
    """Ids come from location-independent names and the ingest key from the source's basename and
    stats, so a moved folder (mv keeps mtimes) is the same input; a changed one is not."""
    _pool(tmp_path / "a" / "raw")
    w = str(tmp_path / "w")
    assert main(["ingest", str(tmp_path / "a" / "raw"), "--workdir", w, "--workers", "1"]) == 0
    before = pq.read_table(tmp_path / "w" / "ingest" / "part-00000.parquet").column("id").to_pylist()
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "raw", tmp_path / "b" / "raw")
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "b" / "raw"), "--workdir", w, "--workers", "1"]) == 0
    assert "already done" in capsys.readouterr().out
    (tmp_path / "b" / "raw" / "new.png").write_bytes(encode(make_image(99, (64, 48)), "PNG"))
    assert main(["ingest", str(tmp_path / "b" / "raw"), "--workdir", w, "--workers", "1"]) == 2  # refused: changed
    assert "--force" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "b" / "raw"), "--workdir", w, "--workers", "1", "--force"]) == 0
    after = pq.read_table(tmp_path / "w" / "ingest" / "part-00000.parquet").column("id").to_pylist()
    assert set(before) < set(after) and len(after) == len(before) + 1


def test_an_unfinished_ingest_whose_inputs_moved_is_refused_not_misread(tmp_path, capsys):
    from curate.ingest import plan

    _pool(tmp_path / "a" / "raw")
    w = tmp_path / "w"
    assert main(["ingest", str(tmp_path / "a" / "raw"), "--workdir", str(w), "--workers", "1"]) == 0
    for p in (w / "ingest").glob("part-*.parquet"):  # as if killed before its parts were written
        p.unlink()
    (w / "ingest" / "_MANIFEST.json").unlink()
    assert plan([str(tmp_path / "a" / "raw")], w / "ingest", 1000) == 1
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "raw", tmp_path / "b" / "raw")
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "b" / "raw"), "--workdir", str(w), "--workers", "1"]) == 2
    assert "planned its inputs at" in capsys.readouterr().err
    assert not list((w / "ingest").glob("part-*.parquet"))
    assert main(["ingest", str(tmp_path / "b" / "raw"), "--workdir", str(w), "--workers", "1", "--force"]) == 0
    assert pq.read_table(next((w / "ingest").glob("part-*.parquet"))).column("status").to_pylist() == ["ok"] * 6
