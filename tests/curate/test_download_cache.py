"""The download journal: what a rerun finds after a kill, a torn append or a damaged file."""

from __future__ import annotations

from pathlib import Path

from curate.download import DownloadResult
from curate.download_cache import DownloadJournal


def _ok(body: bytes) -> DownloadResult:
    return DownloadResult("http://h/x", "ok", body, 200, 1, None, "image/jpeg")


def _failed(status: str) -> DownloadResult:
    return DownloadResult("http://h/y", status, None, 404, 1, "HTTP 404 Not Found", "text/plain")


def _fill(cache: Path, n: int) -> list[bytes]:
    bodies = [bytes([i]) * (1000 + 37 * i) for i in range(n)]
    with DownloadJournal(cache) as journal:
        for i, body in enumerate(bodies):
            journal.put(f"id{i}", _ok(body))
        journal.put("missing", _failed("http_404"))
    return bodies


def test_entries_survive_reopening_and_failures_keep_their_status(tmp_path: Path) -> None:
    bodies = _fill(tmp_path, 5)
    with DownloadJournal(tmp_path) as journal:
        assert [journal.get(f"id{i}")["data"] for i in range(5)] == bodies
        got = journal.get("missing")
        assert (got["status"], got["http_status"], got["error"], got["data"]) == (
            "http_404", 404, "HTTP 404 Not Found", None)
        assert journal.get("never") is None and "never" not in journal and "id0" in journal


def test_a_torn_last_entry_is_cut_off_and_appends_continue(tmp_path: Path) -> None:
    bodies = _fill(tmp_path, 3)
    path = tmp_path / DownloadJournal.NAME
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the 404 entry lost its tail (a crash mid-append)
    with DownloadJournal(tmp_path) as journal:
        assert "missing" not in journal and journal.get("id2")["data"] == bodies[2]
        journal.put("missing", _failed("http_404"))
    assert path.read_bytes() == whole  # the torn bytes were cut before the new append
    with DownloadJournal(tmp_path) as journal:
        assert journal.get("missing")["status"] == "http_404"


def test_damage_drops_the_damaged_entry_and_everything_after(tmp_path: Path) -> None:
    bodies = _fill(tmp_path, 4)
    path = tmp_path / DownloadJournal.NAME
    raw = bytearray(path.read_bytes())
    starts = [i for i in range(len(raw)) if raw[i:i + 4] == b"DLJ1"]
    raw[starts[1] + 100] ^= 1  # one bit of the second entry's metadata or body
    path.write_bytes(bytes(raw))
    with DownloadJournal(tmp_path) as journal:
        assert journal.get("id0")["data"] == bodies[0]
        assert [f"id{i}" in journal for i in range(1, 4)] == [False] * 3
    assert path.stat().st_size == starts[1]


def test_a_file_that_is_not_a_journal_is_replaced(tmp_path: Path) -> None:
    (tmp_path / DownloadJournal.NAME).write_bytes(b"garbage that is not a journal at all")
    with DownloadJournal(tmp_path) as journal:
        assert journal.get("id0") is None
        journal.put("id0", _ok(b"abc"))
    with DownloadJournal(tmp_path) as journal:
        assert journal.get("id0")["data"] == b"abc"
