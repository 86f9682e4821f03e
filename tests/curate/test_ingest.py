import csv
import shutil
import io
import json
import tarfile
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.download import DownloadSettings
from curate.images import sha256_hex
from curate.ingest import IngestSettings, ingest, make_id
from curate.parts import read_table
from pipelines.synth import encode, make_image
from tests.badfiles import corpus

FAST = IngestSettings(part_size=4, workers=1, download=DownloadSettings(timeout=0.5, retries=2, backoff=0.01))


def _write_corpus(root: Path) -> dict[str, str]:
    want = {}
    for i, (name, (data, status)) in enumerate(sorted(corpus().items())):
        sub = root / f"d{i % 3}" / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(data)
        want[str((sub / name).resolve())] = status
    return want


def test_folder_ingest_counts_statuses_and_raw_bytes(tmp_path):
    want = _write_corpus(tmp_path / "raw")
    counts = ingest([str(tmp_path / "raw")], tmp_path / "w", FAST)
    t = read_table(tmp_path / "w").to_pylist()
    assert {r["uri"]: r["status"] for r in t} == want
    assert sum(counts.values()) == len(want) and counts["ok"] == list(want.values()).count("ok")
    # ids hash the location-independent name "<folder basename>/<relative path>"
    for r in t:
        rel = Path(r["uri"]).relative_to((tmp_path / "raw").resolve()).as_posix()
        assert r["name"] == f"raw/{rel}" and r["id"] == make_id(r["name"])
    # every ok record's bytes sit in its raw shard at the recorded offset, byte for byte
    for r in t:
        if r["status"] != "ok":
            assert r["raw_shard"] is None and r["error"]
            continue
        original = Path(r["uri"]).read_bytes()
        with open(tmp_path / "w" / r["raw_shard"], "rb") as fh:
            fh.seek(r["raw_offset"])
            assert fh.read(r["nbytes"]) == original
        assert r["sha256"] == sha256_hex(original)
    # the raw shards are ordinary webdataset tars: key = id, image under its extension, json meta
    members = set()
    for shard in sorted((tmp_path / "w" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            members |= set(tf.getnames())
    ok = [r for r in t if r["status"] == "ok"]
    assert members == {f"{r['id']}.{r['ext']}" for r in ok} | {f"{r['id']}.json" for r in ok}


def test_rerun_does_nothing(tmp_path):
    _write_corpus(tmp_path / "raw")
    ingest([str(tmp_path / "raw")], tmp_path / "w", FAST)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("*") if p.is_file()}
    ingest([str(tmp_path / "raw")], tmp_path / "w", FAST)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w").rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_workers_give_identical_output(tmp_path, monkeypatch, start):
    import curate.ingest

    monkeypatch.setattr(curate.ingest, "_start_method", lambda: start)  # spawn: what a threaded driver gets
    _write_corpus(tmp_path / "raw")
    ingest([str(tmp_path / "raw")], tmp_path / "a", FAST)
    ingest([str(tmp_path / "raw")], tmp_path / "b", IngestSettings(part_size=4, workers=2))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_workers_are_forked_only_without_other_threads():
    import threading

    from curate.ingest import _start_method

    assert _start_method() == ("fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert _start_method() == "spawn"
    finally:
        stop.set()
        t.join()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_source_read_in_place_with_metadata_and_unsafe_names(tmp_path):
    good = encode(make_image(5, (80, 80)), "PNG")
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tf:
        _add(tf, "a/0001.jpg", encode(make_image(6, (80, 80)), "JPEG"))
        _add(tf, "a/0001.json", json.dumps({"license": "cc-by", "score": 0.5}).encode())
        _add(tf, "a/0001.txt", b"a red square")
        _add(tf, "a/0002.png", good)
        _add(tf, "../escape.png", good)
        _add(tf, "/abs/path.png", good)
        _add(tf, "a/0003.jpg", b"not an image")
        link = tarfile.TarInfo("a/0004.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    out = tmp_path / "w"
    ingest([str(tar_path)], out, FAST)
    rows = {r["uri"].split("::", 1)[1]: r for r in read_table(out).to_pylist()}
    assert {k: v["status"] for k, v in rows.items()} == {
        "a/0001.jpg": "ok", "a/0002.png": "ok", "../escape.png": "unsafe_path",
        "/abs/path.png": "unsafe_path", "a/0003.jpg": "not_image", "a/0004.png": "not_regular_file"}
    assert rows["a/0001.jpg"]["caption"] == "a red square"
    assert rows["a/0001.jpg"]["license"] == "cc-by" and rows["a/0001.jpg"]["score"] == 0.5
    # nothing was extracted anywhere: the workdir holds only our own files
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/path.png").exists()
    assert {p.name for p in out.iterdir()} == {"_plan", "shards", "part-00000.parquet", "part-00001.parquet"}


def test_compressed_tar_is_read_too(tmp_path):
    tar_path = tmp_path / "in.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for i in range(5):
            _add(tf, f"{i:04d}.jpg", encode(make_image(40 + i, (70, 70)), "JPEG"))
    counts = ingest([str(tar_path)], tmp_path / "w", FAST)
    assert counts == {"ok": 5}


def test_url_lists_download_check_and_carry_columns(tmp_path, image_server):
    s = image_server
    s.add("/a.jpg", encode(make_image(50, (90, 90)), "JPEG"))
    s.add("/b.png", encode(make_image(51, (90, 90)), "PNG"), content_type="image/png")
    s.add("/text.jpg", b"hello", content_type="text/plain")
    urls = {s.url("/a.jpg"): "ok", s.url("/b.png"): "ok", s.url("/404"): "http_404",
            s.url("/flaky500/x"): "ok", s.url("/always500"): "http_5xx", s.url("/slow"): "timeout",
            s.url("/truncated"): "truncated", s.url("/noai"): "noai", s.url("/loop"): "too_many_redirects",
            s.url("/text.jpg"): "not_image", "ftp://example.invalid/x.jpg": "bad_scheme"}
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["URL", "caption", "license"])
        for i, u in enumerate(urls):
            w.writerow([u, f"caption {i}", "cc0"])
        w.writerow([s.url("/a.jpg"), "again", "cc0"])
    pq.write_table(pa.table({"url": [s.url("/b.png")], "aesthetic": [6.5]}), tmp_path / "more.parquet")
    (tmp_path / "plain.txt").write_text(f"# a comment\n{s.url('/redirect/a.jpg')}\n\n")
    sources = [str(tmp_path / "list.csv"), str(tmp_path / "more.parquet"), str(tmp_path / "plain.txt")]
    ingest(sources, tmp_path / "w", FAST)
    rows = read_table(tmp_path / "w").to_pylist()
    csv_rows = [r for r in rows if r["source"].endswith("list.csv")]
    assert {r["uri"]: r["status"] for r in csv_rows[:-1]} == urls
    assert all(r["id"] == make_id(r["uri"]) and r["name"] == r["uri"] for r in csv_rows[:-1])  # URL ids unchanged
    assert csv_rows[-1]["status"] == "duplicate_uri" and csv_rows[-1]["id"] == make_id(csv_rows[-1]["uri"] + "#1")
    assert [r["caption"] for r in csv_rows[:2]] == ["caption 0", "caption 1"]
    assert csv_rows[2]["http_status"] == 404
    pq_row = next(r for r in rows if r["source"].endswith("more.parquet"))
    # the same URL under another source is another record (the id is per URI occurrence)
    assert pq_row["status"] == "duplicate_uri" and pq_row["aesthetic"] == 6.5
    txt_row = next(r for r in rows if r["source"].endswith("plain.txt"))
    assert txt_row["status"] == "ok" and txt_row["http_status"] == 200
    # once directly and once behind the redirect; the second listing of the URL is never fetched
    assert s.ok_hits["/a.jpg"] == 2


def test_missing_url_column_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("link,caption\nhttp://x/y.jpg,z\n")
    with pytest.raises(ValueError, match="no 'url' column"):
        ingest([str(tmp_path / "bad.csv")], tmp_path / "w", FAST)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _url_list(tmp_path: Path, server, n: int = 6) -> str:
    for i in range(n):
        server.add(f"/c/{i}.png", encode(make_image(300 + i, (64, 64)), "PNG"), content_type="image/png")
    path = tmp_path / "urls.txt"
    path.write_text("".join(server.url(f"/c/{i}.png") + "\n" for i in range(n)))
    return str(path)


def test_journal_removed_mid_part_still_gives_whole_output(tmp_path, image_server, monkeypatch):
    """Issue 11 item 1: a rerun finds every download of a killed run journaled; an orphan of that run
    then finishes the same part and removes the journal before the rerun reads the bodies."""
    import curate.ingest as ci
    from curate.download_cache import DownloadJournal

    urls = _url_list(tmp_path, image_server)
    ingest([urls], tmp_path / "ref", FAST)
    ci.plan([urls], tmp_path / "w", FAST.part_size)
    for index in range(2):  # the killed run: every download journaled, no part written
        items = pq.read_table(tmp_path / "w" / "_plan" / f"part-{index:05d}.parquet").to_pylist()
        with DownloadJournal(tmp_path / "w" / "_cache" / f"part-{index:05d}") as journal:
            ci._download_and_check(items, journal, FAST)
    check = ci._download_and_check

    def check_then_orphan_removes(items, journal, settings):
        assert all(r["id"] in journal for r in items)
        out = check(items, journal, settings)
        shutil.rmtree(journal.path.parent)
        return out

    monkeypatch.setattr(ci, "_download_and_check", check_then_orphan_removes)
    image_server.reset_counts()
    assert ingest([urls], tmp_path / "w", FAST) == {"ok": 6}
    assert _tree(tmp_path / "w") == _tree(tmp_path / "ref")
    assert image_server.requests_total == 0


def test_damaged_journal_entries_are_downloaded_again(tmp_path, image_server):
    """Entries before the first damaged frame are used; it and every later one are fetched again."""
    from curate.download import download
    from curate.download_cache import DownloadJournal
    from curate.ingest import plan

    urls = _url_list(tmp_path, image_server)
    ingest([urls], tmp_path / "ref", FAST)
    plan([urls], tmp_path / "w", FAST.part_size)
    rows = pq.read_table(tmp_path / "w" / "_plan" / "part-00000.parquet").to_pylist()
    with DownloadJournal(tmp_path / "w" / "_cache" / "part-00000") as journal:
        for row in rows:
            journal.put(row["id"], download(row["uri"], FAST.download))
    raw = bytearray(journal.path.read_bytes())
    second = raw.index(b"DLJ1", 4)
    third = raw.index(b"DLJ1", second + 4)
    raw[third + 200] ^= 0xFF  # a flipped byte in the third entry's body
    journal.path.write_bytes(bytes(raw[:-10]))  # and a torn last entry
    image_server.reset_counts()
    assert ingest([urls], tmp_path / "w", FAST) == {"ok": 6}
    assert _tree(tmp_path / "w") == _tree(tmp_path / "ref")
    assert image_server.ok_hits == {f"/c/{i}.png": 1 for i in (2, 3, 4, 5)}


def test_records_follow_the_input_order_whatever_order_downloads_finish_in(tmp_path):
    """A concurrent run (slow URLs finish last) writes the same bytes as a one-at-a-time run."""
    from dataclasses import replace

    from tests.httpserver import ImageServer

    with ImageServer(slow_seconds=0.3) as server:
        for i in range(12):
            server.add(f"/c/{i}.png", encode(make_image(400 + i, (48, 48)), "PNG"), content_type="image/png")
        urls = [server.url(f"/slow?{i}") if i % 3 == 0 else server.url(f"/c/{i}.png") for i in range(12)]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        for name, concurrency in (("fast", 8), ("slow", 1)):
            settings = replace(FAST, part_size=6, download=replace(FAST.download, timeout=5.0, concurrency=concurrency))
            assert ingest([str(tmp_path / "urls.txt")], tmp_path / name, settings) == {"ok": 12}
    assert [r["uri"] for r in read_table(tmp_path / "fast").to_pylist()] == urls
    assert _tree(tmp_path / "fast") == _tree(tmp_path / "slow")


_DRIVER = """
import sys
from curate.download import DownloadSettings
from curate.ingest import IngestSettings, ingest
ingest([sys.argv[1]], sys.argv[2], IngestSettings(part_size=1, workers=2,
       download=DownloadSettings(timeout=30, retries=0, deadline=60)))
"""


def test_sigkill_of_the_driver_leaves_no_worker(tmp_path):
    """Workers busy on a slow download must die with their killed driver, before they can write."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from tests.httpserver import ImageServer

    with ImageServer(slow_seconds=20) as server:
        (tmp_path / "urls.txt").write_text("".join(server.url(f"/slow?{i}") + "\n" for i in range(4)))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "urls.txt"), str(tmp_path / "w")],
                                  env=env)
        try:
            deadline = time.time() + 60
            workers: list[psutil.Process] = []
            while time.time() < deadline and (len(workers) < 2 or server.requests_total < 2):
                time.sleep(0.1)
                workers = [p for p in psutil.Process(driver.pid).children()  # forked or spawned
                           if "resource_tracker" not in " ".join(p.cmdline())]
            assert len(workers) == 2 and server.requests_total >= 2, "workers never started downloading"
            driver.kill()
            driver.wait()
            gone, alive = psutil.wait_procs(workers, timeout=5)
            assert not alive, f"workers outlived their driver: {[p.pid for p in alive]}"
        finally:
            driver.kill()
    assert not list((tmp_path / "w").glob("part-*.parquet"))


def _pool(root: Path) -> list[str]:
    """Two folders sharing a basename, and a tar: the sources of the relocation tests."""
    for j, sub in enumerate(("a/pool", "b/pool")):
        for i in range(5):
            (root / sub / f"x{i % 2}").mkdir(parents=True, exist_ok=True)
            (root / sub / f"x{i % 2}" / f"{i}.jpg").write_bytes(encode(make_image(400 + 10 * j + i, (64, 64)), "JPEG"))
    with tarfile.open(root / "more.tar", "w") as tf:
        for i in range(3):
            _add(tf, f"s/{i}.png", encode(make_image(450 + i, (64, 64)), "PNG"))
    return [str(root / "a/pool"), str(root / "b/pool"), str(root / "more.tar")]


def test_ids_do_not_depend_on_where_the_data_lives(tmp_path):
    sources = _pool(tmp_path / "here")
    ingest(sources, tmp_path / "w1", FAST)
    shutil.move(tmp_path / "here", tmp_path / "elsewhere" / "deeper")
    moved = [s.replace(str(tmp_path / "here"), str(tmp_path / "elsewhere" / "deeper")) for s in sources]
    ingest(moved, tmp_path / "w2", FAST)
    one, two = read_table(tmp_path / "w1").to_pylist(), read_table(tmp_path / "w2").to_pylist()
    assert [r["id"] for r in one] == [r["id"] for r in two]
    assert [r["name"] for r in one] == [r["name"] for r in two]
    assert [r["uri"] for r in one] != [r["uri"] for r in two]  # uri still says where to read
    names = [r["name"] for r in one]
    assert names[:3] == ["pool/x0/0.jpg", "pool/x0/2.jpg", "pool/x0/4.jpg"]
    assert "pool~2/x1/3.jpg" in names and "more.tar::s/2.png" in names
    assert all(r["id"] == make_id(r["name"]) and r["status"] == "ok" for r in one)
    # the same folder given twice is one source name, so its files are duplicates, not new records
    rows = read_table(tmp_path / "w2").to_pylist()
    ingest([moved[0], moved[0]], tmp_path / "w3", FAST)
    twice = read_table(tmp_path / "w3").to_pylist()
    assert [r["id"] for r in twice[:5]] == [r["id"] for r in rows[:5]]
    assert [r["status"] for r in twice[5:]] == ["duplicate_uri"] * 5


def test_cache_of_a_finished_part_is_removed_by_the_next_run(tmp_path):
    """A kill between a part's records and the removal of its download cache leaves the cache; the
    next run removes it (the part is done) and keeps the cache of a part still to do."""
    from curate.ingest import pending_parts

    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode(make_image(40 + i, (48, 48)), "PNG"))
    work = tmp_path / "w"
    ingest([str(tmp_path / "in")], work, IngestSettings(part_size=2, workers=1))
    (work / "part-00001.parquet").unlink()
    for k in (0, 1):
        (work / "_cache" / f"part-{k:05d}").mkdir(parents=True)
        (work / "_cache" / f"part-{k:05d}" / "x.json").write_text("{}")
    assert pending_parts(work, 2) == [1]
    assert not (work / "_cache" / "part-00000").exists() and (work / "_cache" / "part-00001" / "x.json").exists()
    ingest([str(tmp_path / "in")], work, IngestSettings(part_size=2, workers=1))
    assert sorted(p.name for p in (work / "_cache").iterdir()) == [] and read_table(work).num_rows == 4


def test_parts_run_while_planning_equal_parts_run_from_the_saved_plan(tmp_path):
    """A new plan hands each part's rows to its worker as written; a saved plan's parts read them back:
    the same records and raw shards, byte for byte."""
    from curate.ingest import plan

    _write_corpus(tmp_path / "raw")
    settings = IngestSettings(part_size=4, workers=2)
    counts = ingest([str(tmp_path / "raw")], tmp_path / "a", settings)
    assert plan([str(tmp_path / "raw")], tmp_path / "b", settings.part_size) > 2
    assert ingest([str(tmp_path / "raw")], tmp_path / "b", settings) == counts
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_parts_of_a_plan_that_never_completed_are_redone(tmp_path):
    """A run killed while planning leaves finished parts but no plan; the rerun plans again (here after
    the folder changed) and its output equals a fresh run's."""
    import curate.ingest as ci

    _write_corpus(tmp_path / "raw")
    jobs = ci._new_plan([str(tmp_path / "raw")], tmp_path / "w", 4)
    for _ in range(2):  # two parts finish, then the driver dies before the plan is complete
        index, rows, more = next(jobs)
        assert more
        ci.run_part(tmp_path / "w", index, FAST, rows)
    jobs.close()
    assert (tmp_path / "w" / "part-00001.parquet").exists() and not (tmp_path / "w" / "_plan").exists()
    first = sorted((tmp_path / "raw").rglob("*.*"))[0]
    first.unlink()  # the inputs change before the rerun: part 0 now holds other files
    ingest([str(tmp_path / "raw")], tmp_path / "w", FAST)
    ingest([str(tmp_path / "raw")], tmp_path / "fresh", FAST)
    assert _tree(tmp_path / "w") == _tree(tmp_path / "fresh")
    assert str(first.resolve()) not in read_table(tmp_path / "w").column("uri").to_pylist()


def test_seen_names_count_repeats_like_a_dict_across_batches():
    """SeenNames (sorted uint64 levels + a dict of repeats) numbers every key as a dict of counts would,
    whatever the batch cut, with keys repeated within and across batches and at the uint64 extremes."""
    import numpy as np

    from curate.ingest import SeenNames

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2)  # even keys spread over uint64
    keys = np.concatenate([keys, np.array([0, 2**64 - 1, 2**64 - 1], dtype=np.uint64)])
    stream = keys[rng.integers(0, len(keys), 20000)]  # ~6 occurrences per key
    stream[100:110] = stream[99]  # a run of one key inside a batch
    expected, counts = [], {}
    for k in stream.tolist():
        expected.append(counts.get(k, 0))
        counts[k] = counts.get(k, 0) + 1
    for cut in (1, 7, 1000, 20000):
        seen, got = SeenNames(), []
        for lo in range(0, len(stream), cut):
            got.extend(seen.take(stream[lo:lo + cut]).tolist())
        assert got == expected, cut
        assert len(seen) == len(counts) and len(seen.levels) <= 2 * np.log2(len(counts)) + 1
        assert all(np.all(lv[1:] > lv[:-1]) for lv in seen.levels)  # sorted and distinct
        assert seen.more == {k: c for k, c in counts.items() if c > 1}
    from curate.names import PartitionedSeen

    for holders in (1, 3, 8):  # split by key over holders (Ray actors in the stage): the same counts
        parts = [SeenNames() for _ in range(holders)]
        split = PartitionedSeen(holders, lambda keys: [h.take(k) for h, k in zip(parts, keys)])
        got = np.concatenate([split.take(stream[lo:lo + 1000]) for lo in range(0, len(stream), 1000)])
        assert got.tolist() == expected and sum(len(h) for h in parts) == len(counts)
        assert all(np.all(lv % np.uint64(holders) == np.uint64(i)) for i, h in enumerate(parts) for lv in h.levels)
