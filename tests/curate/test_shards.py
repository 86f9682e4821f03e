import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.parts import read_table
from curate.shards import ShardSettings, verify_shards, write_shards
from pipelines.synth import encode, make_image
from curate.ingest import IngestSettings, ingest


@pytest.fixture
def ingested(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(23):
        (raw / f"{i:03d}.jpg").write_bytes(encode(make_image(100 + i, (64 + i, 70)), "JPEG"))
    ingest([str(raw)], tmp_path / "ingest", IngestSettings(part_size=10, workers=1))
    return tmp_path / "ingest", read_table(tmp_path / "ingest")


def _samples(out: Path) -> dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for info in tf:
                key, _, ext = info.name.partition(".")
                found.setdefault(key, {"shard": shard.name})[ext] = tf.extractfile(info).read()
    return found


def test_shards_hold_every_record_once_with_original_bytes(ingested, tmp_path):
    stage, records = ingested
    info = write_shards(records, stage, tmp_path / "out", ShardSettings(max_count=5))
    assert info["samples"] == 23 and info["shards"] == 5
    found = _samples(tmp_path / "out")
    assert set(found) == set(records.column("id").to_pylist())
    for r in records.to_pylist():
        assert found[r["id"]]["jpg"] == Path(r["uri"]).read_bytes()
        meta = json.loads(found[r["id"]]["json"])
        assert meta["id"] == r["id"] and meta["width"] == r["width"] and meta["sha256"] == r["sha256"]
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert sorted(x["key"] for x in index) == sorted(found)
    assert all(found[x["key"]]["shard"] == x["shard"] for x in index)
    assert verify_shards(tmp_path / "out").ok


def test_size_bound_and_deterministic_shuffle(ingested, tmp_path):
    stage, records = ingested
    write_shards(records, stage, tmp_path / "a", ShardSettings(max_size=30_720, shuffle_seed=1))
    write_shards(records, stage, tmp_path / "b", ShardSettings(max_size=30_720, shuffle_seed=1))
    write_shards(records, stage, tmp_path / "c", ShardSettings(max_size=30_720, shuffle_seed=2))
    write_shards(records.take(list(range(22, -1, -1))), stage, tmp_path / "d", ShardSettings(max_size=30_720, shuffle_seed=1))
    names = sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar"))
    assert len(names) > 1
    for n in names:
        assert (tmp_path / "a" / n).stat().st_size <= 30_720
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "d" / n).read_bytes()  # input order irrelevant
    order = lambda d: pq.read_table(d / "index.parquet").column("key").to_pylist()  # noqa: E731
    assert order(tmp_path / "a") != order(tmp_path / "c")
    assert sorted(order(tmp_path / "a")) == sorted(order(tmp_path / "c"))


def test_verify_catches_corruption_and_missing_shards(ingested, tmp_path):
    stage, records = ingested
    write_shards(records, stage, tmp_path / "out", ShardSettings(max_count=8, shuffle_seed=None))
    shard = tmp_path / "out" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1024 + 100] ^= 0xFF  # inside the first member's data
    shard.write_bytes(bytes(data))
    report = verify_shards(tmp_path / "out")
    assert not report.ok and any("sha256 mismatch" in e for e in report.errors)
    (tmp_path / "out" / "shard-000002.tar").unlink()
    assert any("shard-000002.tar: missing" in e for e in verify_shards(tmp_path / "out").errors)


def test_resume_writes_only_missing_shards(ingested, tmp_path):
    stage, records = ingested
    out = tmp_path / "out"
    write_shards(records, stage, out, ShardSettings(max_count=5))
    reference = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "shard-000003.tar").unlink()
    (out / "index.parquet").unlink()
    (out / ".shard-000003.tar.tmp-deadbeef").write_bytes(b"half a shard")
    info = write_shards(records, stage, out, ShardSettings(max_count=5))
    assert info["shards_written"] == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == reference


def test_webdataset_reads_the_shards(ingested, tmp_path):
    import webdataset as wds

    stage, records = ingested
    write_shards(records, stage, tmp_path / "out", ShardSettings(max_count=10))
    urls = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        seen[sample["__key__"]] = (sample["jpg"].size, sample["json"]["uri"])
    want = {r["id"]: ((r["width"], r["height"]), r["name"]) for r in records.to_pylist()}  # the portable name
    assert seen == want


@pytest.mark.slow
def test_curated_shards_are_byte_identical_from_two_locations(tmp_path, cli_env):
    """Issue 11 item 4: the same images in another folder give the same curated shards and index."""
    import shutil
    import subprocess
    import sys

    def curate(*args):
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=cli_env, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    raw = tmp_path / "one" / "raw"
    for i in range(30):
        (raw / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (raw / f"d{i % 3}" / f"{i:03d}.jpg").write_bytes(encode(make_image(700 + i % 25, (64, 64)), "JPEG"))
    outs = []
    for where in ("one", "two"):
        if where == "two":
            shutil.move(tmp_path / "one" / "raw", tmp_path / "two" / "deep" / "raw")
            raw = tmp_path / "two" / "deep" / "raw"
        work = tmp_path / f"w-{where}"
        curate("ingest", str(raw), "--workdir", str(work), "--part-size", "7")
        curate("hashdedup", "--workdir", str(work))
        curate("shards", "--workdir", str(work), "--out", str(work / "out"), "--max-count", "6")
        outs.append({p.name: p.read_bytes() for p in sorted((work / "out").iterdir())
                     if p.name.endswith((".tar", "index.parquet"))})
    assert len([n for n in outs[0] if n.endswith(".tar")]) == 5  # 25 distinct of 30 after dedup
    assert outs[0] == outs[1]


def test_member_header_is_tarfiles_ustar_header():
    import tarfile

    from curate.tars import member_header

    names = ["0123456789abcdef.jpg", "0123456789abcdef_r1.json", "a" * 100, "é" * 60, "\udcffa.jpg",
             "d/" + "b" * 150 + ".png"]
    for name in names:
        for size in (0, 1, 511, 512, 25_000, 8**11 - 1, 8**11, 2**40):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o444
            info.uname = info.gname = "curate"
            try:
                want = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            except ValueError:  # too large for USTAR: refused the same way
                with pytest.raises(ValueError):
                    member_header(name, size)
                continue
            assert member_header(name, size) == want, (name, size)


def test_write_samples_equals_tarfiles_archive(tmp_path):
    import io

    from curate.tars import write_samples

    samples = [{"__key__": f"{i:016x}", "jpg": bytes([i]) * (i * 317), "json": json.dumps({"i": i})} for i in range(40)]
    layout = write_samples(tmp_path / "ours.tar", samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in ("jpg", "json"):
                data = s[ext].encode() if isinstance(s[ext], str) else s[ext]
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "curate"
                tf.addfile(info, io.BytesIO(data))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == buf.getvalue()
    for s in samples:
        offset, size = layout[s["__key__"]]["jpg"]
        assert ours[offset: offset + size] == s["jpg"]


def test_member_headers_equal_member_header():
    import random

    from curate.tars import member_header, member_headers

    rng = random.Random(0)
    names = [f"{rng.getrandbits(64):016x}.{ext}" for ext in ("jpg", "json", "webp") for _ in range(50)]
    names += ["ünï/cödé.png", "d/" + "a" * 98 + "é", "dd/" + "x" * 99, "b" * 100, "k_r1.json", ""]
    sizes = [rng.randrange(0, 10**7) for _ in names]
    sizes[:4] = [0, 1, 8**11 - 1, 512]
    got = member_headers(names, sizes)
    assert [bytes(h) for h in got] == [member_header(n, s) for n, s in zip(names, sizes)]
    assert member_headers([], []) == []


def test_sample_metas_equal_json_dumps_of_each_row():
    """The vectorised json metadata is byte for byte what json.dumps(row, sort_keys=True, default=str) gives."""
    import datetime

    import pyarrow as pa

    from curate.shards import _sample_metas

    n = 40
    t = pa.table({
        "key": [f"k{i}" for i in range(n)],
        "id": [f"{i:016x}" for i in range(n)],
        "uri": [["plain/a.jpg", 'qu"ote', "back\\slash", "ünïcödé ☃", "tab\tnl\n", "", "ctl\x01", None][i % 8]
                for i in range(n)],
        "width": pa.array([None if i % 5 == 0 else i * 7 for i in range(n)], pa.int32()),
        "big": pa.array([-(i * 10**15) for i in range(n)], pa.int64()),
        "phash": pa.array([2**64 - 1 - i for i in range(n)], pa.uint64()),
        "score": [None if i % 4 == 0 else (float("nan") if i % 4 == 1 else i / 7) for i in range(n)],
        "flag": [None if i % 3 == 0 else bool(i % 2) for i in range(n)],
        "tags": [None if i % 6 == 0 else [f"t{i}", "ü"] for i in range(n)],
        "when": [datetime.datetime(2020, 1, 1 + i % 28) for i in range(n)],
        "nothing": pa.array([None] * n, pa.string()),
        "raw_shard": ["x"] * n,  # bookkeeping, never in the json
    })
    want = [json.dumps({k: v for k, v in row.items() if v is not None and k not in ("key", "raw_shard")},
                       sort_keys=True, default=str) for row in t.to_pylist()]
    assert _sample_metas(t, t.column_names).to_pylist() == want
    assert _sample_metas(t.slice(0, 0), t.column_names).to_pylist() == []


def test_a_resumed_run_writes_the_same_plan_index_and_shards_with_list_columns(ingested, tmp_path):
    """A first run writes its index from the plan in memory, a resumed run from the plan on disk:
    the same bytes, also where Parquet gives a type back otherwise (list<item> reads as list<element>)."""
    import pyarrow as pa

    stage, records = ingested
    n = records.num_rows
    records = records.append_column("tags", pa.array([None if i % 3 else [f"t{i}"] for i in range(n)]))
    records = records.append_column("caption", pa.array([None if i % 2 else f'"{i}" é' for i in range(n)]))
    out = tmp_path / "out"
    settings = ShardSettings(max_count=4)
    write_shards(records, stage, out, settings, meta_columns=["tags", "caption"])
    reference = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "index.parquet").unlink()
    (out / "shard-000002.tar").unlink()
    info = write_shards(records, stage, out, settings, meta_columns=["tags", "caption"])
    assert info["shards_written"] == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == reference
    assert json.loads(_samples(out)[records.column("id")[0].as_py()]["json"])["tags"] == ["t0"]


def _plan_records(n: int, seed: int):
    """Records with every column a plan needs, a name, metadata columns with nulls, and repeated ids
    as keys of repeats (`<id>_r1`)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    ids = [f"{rng.integers(0, 2**40):010x}" for _ in range(n)]
    keys = [i if rng.random() < 0.9 else f"{i}_r1" for i in ids]
    level = rng.integers(0, 7, n)
    return pa.table({
        "id": ids, "key": keys, "uri": [f"/x/{i}.jpg" for i in ids], "name": [f"n/{i}.jpg" for i in ids],
        "raw_shard": ["shards/shard-00000.tar"] * n, "raw_offset": rng.integers(0, 10**6, n),
        "nbytes": rng.integers(100, 5000, n), "ext": ["jpg"] * n, "sha256": [f"{i}sha" for i in ids],
        "width": rng.integers(10, 90, n).astype(np.int32), "height": rng.integers(10, 90, n).astype(np.int32),
        "cluster_l1": pa.array(level, mask=level == 0), "extra": ["e"] * n})


@pytest.mark.parametrize("n, sizes, bucket_rows, seed, max_count", [
    (500, [120, 0, 200, 180], 64, 0, 7), (500, [500], 100_000, 3, 10_000),
    (300, [100, 100, 100], 50, None, 9), (257, [1] * 7 + [250], 16, 1, 16),
    (0, [0, 0], 16, 0, 5), (500, [250, 250], 64, 0, 7)])
def test_streamed_plan_is_plan_shards_of_all_records(tmp_path, n, sizes, bucket_rows, seed, max_count):
    """The external plan (parts spilled, key ranges, plan ranges) writes the same file as plan_shards over
    all records concatenated, whatever the part sizes and the memory bound; the jobs are its shards."""
    import numpy as np
    import pyarrow as pa

    from curate.shards import PLAN_NAME, plan_shards, prepare_shards_parts

    records = _plan_records(n, seed=n + (seed or 0))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = [records.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    parts[0] = parts[0].drop_columns(["extra"])  # a metadata column absent from one part: null there
    settings = ShardSettings(max_size=60_000, max_count=max_count, shuffle_seed=seed)
    meta = ["cluster_l1", "extra", "absent"]
    jobs = prepare_shards_parts(lambda k: parts[k], len(parts), tmp_path / "out", settings, meta, bucket_rows)
    want = plan_shards(pa.concat_tables(parts, promote_options="permissive"), settings, meta)
    pq.write_table(want, tmp_path / "want.parquet", compression="zstd", write_statistics=True,
                   row_group_size=max(1, min(max_count, 65536)))
    got = pq.read_table(tmp_path / "out" / PLAN_NAME)
    assert got.equals(pq.read_table(tmp_path / "want.parquet"))
    if n:
        assert (tmp_path / "out" / PLAN_NAME).read_bytes() == (tmp_path / "want.parquet").read_bytes()
        assert len(set(got.column("shard").to_pylist())) > 1
    shards = got.column("shard").to_pylist()
    assert [(name, lo, hi) for name, lo, hi in jobs] == [
        (s, shards.index(s), len(shards) - shards[::-1].index(s)) for s in dict.fromkeys(shards)]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [PLAN_NAME]  # the spill is gone


def test_cut_follows_the_per_sample_rule_and_carries_an_open_shard_over():
    """The shard cut (a search per shard) equals the rule taken one sample at a time (a new shard when
    the open one holds max_count samples or the sample would take its tar file over max_size; an
    oversized sample alone), also when the samples come in pieces with the state carried over."""
    import numpy as np

    from curate.shards import _cut
    from curate.tars import tar_file_size

    rng = np.random.default_rng(0)
    for trial in range(30):
        settings = ShardSettings(max_size=int(rng.integers(3_000, 40_000)), max_count=int(rng.integers(1, 9)))
        need = (rng.integers(1, 40, 300) * 512).astype(np.int64)  # sample bytes, whole blocks; some oversized
        want, cur, count, used = [], 0, 0, 0
        for n in need.tolist():
            if count and (count >= settings.max_count or tar_file_size(used + n) > settings.max_size):
                cur, count, used = cur + 1, 0, 0
            want.append(cur)
            count, used = count + 1, used + n
        assert _cut(need, settings)[0].tolist() == want
        cuts = np.sort(rng.choice(np.arange(1, 300), 5, replace=False))
        got, state = [], (0, 0, 0)
        for piece in np.split(need, cuts):
            ids, state = _cut(piece, settings, state)
            got += ids.tolist()
        assert got == want and state[0] == want[-1]
