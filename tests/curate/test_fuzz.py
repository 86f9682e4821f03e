"""Hypothesis fuzzing of every parser of untrusted input: image bytes, tars, URL lists, configs.

Inputs are generated and mutated from real valid files (truncation, byte flips, header edits,
insertions). Each case must end as a record with a reason or a clear error, never a crash.
The suite runs FUZZ_EXAMPLES cases per parser (default 200, derandomized so runs repeat);
`bench/fuzz.py` runs thousands with FUZZ_RANDOM=1 and a seed. Failing cases found are kept below
as @example regressions.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import struct
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from curate.download import _check_url
from curate.images import CheckSettings, check_image
from curate.ingest import IngestSettings, ingest
from curate.parts import read_table
from curate.sources import META_EXTS, SourceError, iter_source
from pipelines.config import load_config
from pipelines.synth import encode, make_image
from tests.badfiles import corpus

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=os.environ.get("FUZZ_RANDOM") != "1", deadline=None,
                database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # parsers whose every case runs a whole ingest
CHECK = CheckSettings(min_side=8, max_pixels=2_000_000)  # small bombs keep every case fast
STATUSES = {"ok", "empty", "too_large", "too_many_pixels", "not_image", "truncated", "decode_error",
            "unsupported_format", "too_small"}


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """Valid files of every supported format, plus the awkward corpus."""
    img = make_image(7, (48, 40))
    files = [encode(img, fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]
    files.append(encode(img, "JPEG", progressive=True))
    files.append(encode(img.convert("P"), "PNG"))
    return tuple(files) + tuple(data for data, _ in corpus().values())


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes] | None = None) -> bytes:
    """A valid file with 1-4 edits: truncation, byte flip, header byte, u32 field, insert, delete."""
    data = bytearray(draw(base if base is not None else st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["truncate", "flip", "header", "u32", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            del data[pos:]
        elif op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "header":
            data[pos % 64 if len(data) > 64 else pos] = draw(st.integers(0, 255))
        elif op == "u32":  # sizes and lengths in headers (e.g. PNG IHDR width/height at 16..24)
            at = draw(st.sampled_from([16, 20, pos]))
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**32 - 1])))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[pos:pos + draw(st.integers(1, 256))]
    return bytes(data)


def assert_checked(data: bytes) -> None:
    res = check_image(data, CHECK)
    assert res.status in STATUSES
    if res.status == "ok":
        assert res.ext and res.phash is not None and min(res.width, res.height) >= CHECK.min_side
    else:
        assert res.error and "\n" not in res.error


@FUZZ
@given(mutated())
def test_image_check_survives_mutated_files(data):
    assert_checked(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048), st.sampled_from(seeds()).flatmap(
    lambda s: st.binary(max_size=512).map(lambda tail: s[:16] + tail))))
def test_image_check_survives_generated_bytes(data):
    """Random bytes, and random bodies behind a real magic number and header start."""
    assert_checked(data)


# ---- tars: member names, types, links, metadata, compression, then damage -------------------

TRICKY_NAMES = ["../up.png", "/abs.jpg", "a/../../b.jpg", "C:\\x.jpg", "c:/x.png", "./x.jpg", "a//b.jpg",
                "x" * 300 + ".jpg", "ü/ß.png", "sp ace.jpg", ".hidden.jpg", "noext", "a.b.c.jpg", "\\back.png"]
member_name = st.one_of(st.sampled_from(TRICKY_NAMES),
                        st.tuples(st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=20),
                                  st.sampled_from(["jpg", "png", "json", "txt", "cls", "id", "caption", "", "tar"])
                                  ).map(lambda t: f"{t[0]}.{t[1]}" if t[1] else t[0]))
member = st.fixed_dictionaries({
    "name": member_name,
    "type": st.sampled_from([tarfile.REGTYPE] * 4 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                     tarfile.FIFOTYPE, tarfile.CHRTYPE]),
    "link": st.sampled_from(["/etc/passwd", "../../x", "a/0.jpg", ""]),
    "data": st.one_of(st.sampled_from(seeds()), mutated(), st.binary(max_size=256),
                      st.sampled_from([b'{"caption": "x", "n": 1}', b"[1, 2]", b"{bad json", b"\xff\xfe"])),
})


def build_tar(members: list[dict], mode: str, latin1: bool) -> bytes:
    buf = io.BytesIO()
    fmt = tarfile.GNU_FORMAT if latin1 else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode=f"w:{mode}", format=fmt, encoding="latin-1" if latin1 else "utf-8") as tf:
        for m in members:
            info = tarfile.TarInfo(m["name"].encode("latin-1", "replace").decode("latin-1") if latin1 else m["name"])
            info.type = m["type"]
            if m["type"] == tarfile.REGTYPE:
                info.size = len(m["data"])
                tf.addfile(info, io.BytesIO(m["data"]))
            else:
                info.linkname = m["link"]
                tf.addfile(info)
    return buf.getvalue()


def expected_records(members: list[dict]) -> int:
    """Records an intact tar must give: every member but directories and metadata files."""
    def is_meta(m: dict) -> bool:
        from curate.sources import _split_key, unsafe_member_name

        safe = not unsafe_member_name(m["name"])
        return m["type"] == tarfile.REGTYPE and safe and _split_key(m["name"])[1] in META_EXTS
    return sum(1 for m in members if m["type"] != tarfile.DIRTYPE and not is_meta(m))


def ingest_one(source: str, workdir: Path) -> list[dict]:
    counts = ingest([source], workdir, IngestSettings(part_size=50, workers=1, check=CHECK))
    rows = read_table(workdir).to_pylist()
    assert sum(counts.values()) == len(rows)
    for r in rows:
        assert r["status"] == "ok" or r["error"], r
        assert r["raw_shard"] is None or r["status"] == "ok"
    return rows


@FEW
@given(members=st.lists(member, min_size=1, max_size=8), mode=st.sampled_from(["", "", "gz", "bz2"]),
       latin1=st.booleans(), damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.booleans())))
@example(members=[{"name": "\xa0.jpg", "type": tarfile.REGTYPE, "link": "", "data": b"x"}], mode="gz",
         latin1=True, damage=None)  # a member name that is not UTF-8 crashed the plan's Parquet write
@example(members=[{"name": "a.jpg", "type": tarfile.REGTYPE, "link": "", "data": b"x"}], mode="gz",
         latin1=False, damage=(2, True))  # gzip cut inside its header: EOFError escaped tarfile.open
@example(members=[{"name": "a.json", "type": tarfile.REGTYPE, "link": "", "data": b"{}" * 3000}], mode="bz2",
         latin1=False, damage=(200, False))  # damaged compressed metadata member
@example(members=[{"name": "./x.jpg", "type": tarfile.REGTYPE, "link": "", "data": b"x"},
                  {"name": "./x.jpg", "type": tarfile.SYMTYPE, "link": "/etc/passwd", "data": b""}], mode="gz",
         latin1=False, damage=None)  # reading by name found the later symlink and followed it: KeyError
def test_tar_sources_give_a_record_per_member(members, mode, latin1, damage):
    data = build_tar(members, mode, latin1)
    if damage is not None:
        pos, truncate = damage
        pos %= len(data)
        data = data[:pos] if truncate else data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"in.tar{'.' + mode if mode else ''}"
        path.write_bytes(data)
        rows = ingest_one(str(path), Path(tmp) / "w")
        assert {p.name for p in Path(tmp).iterdir()} == {path.name, "w"}  # nothing extracted anywhere
    if damage is None and not latin1:
        assert len(rows) == expected_records(members)


# ---- URL lists: .txt, .csv, .tsv, .parquet -------------------------------------------------

cell = st.one_of(st.text(max_size=30), st.sampled_from(["http://x/a.jpg", "ftp://h/x", "http://[::1", "", " ",
                                                         "https://h/" + "a" * 5000, "\x00", '"', "\r\n"]))


@st.composite
def url_list(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".txt", ".csv", ".tsv", ".parquet"]))
    header = draw(st.lists(st.sampled_from(["url", "URL", " Url ", "caption", "x", "", "url"]), max_size=4))
    rows = draw(st.lists(st.lists(cell, min_size=len(header), max_size=len(header)), max_size=8))
    if suffix == ".parquet":
        cols = {f"{h}{i}" if header.index(h) != i else h: [r[i] for r in rows] for i, h in enumerate(header)}
        buf = io.BytesIO()
        pq.write_table(pa.table(cols) if cols else pa.table({"other": pa.array([], pa.string())}), buf)
        data = buf.getvalue()
    elif suffix == ".txt":
        data = "\n".join(r[0] if r else "" for r in rows).encode("utf-8", "surrogatepass")
    else:
        text = io.StringIO()
        csv.writer(text, delimiter="\t" if suffix == ".tsv" else ",").writerows([header, *rows])
        data = text.getvalue().encode()
    if draw(st.booleans()):
        data = draw(mutated(st.just(data))) if data else data
    return suffix, data


@FUZZ
@given(url_list())
@example((".csv", b"url\n" + b"a" * 200_000 + b"\n"))  # a field past csv's field size limit
@example((".parquet", b"PAR1\x00\x00PAR1"))  # a damaged Parquet footer
@example((".csv", b'"#\r\n'))  # a column name with a line break made the error two lines
def test_url_lists_parse_or_fail_clearly(case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"list{suffix}"
        path.write_bytes(data)
        try:
            items = list(iter_source(str(path)))
        except SourceError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            return
    for item in items:
        assert item.kind == "url" and item.uri and item.name
        assert item.status in (None, "bad_url", "bad_row")
        assert _check_url(item.uri) is None or _check_url(item.uri)[0] in ("bad_url", "bad_scheme")


# ---- config files (pipelines/config.py load_config is tested, not edited) ------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
yaml_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10),
                      st.sampled_from(["${x}", "${oc.env:HOME}", "???", "!!python/object:os.system"]))
yaml_value = st.recursive(yaml_leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                          max_leaves=8)


@st.composite
def config_text(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(sorted(p.name for p in CONFIGS.glob("*.yaml"))))
    doc = yaml.safe_load((CONFIGS / base).read_text())
    if draw(st.booleans()):  # a structural edit: replace or add a key somewhere with any value
        node = doc
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], dict):
                break
            node = node[key]
        if isinstance(node, dict):
            key = draw(st.one_of(st.sampled_from(sorted(node) or ["x"]), st.text(max_size=8)))
            node[key] = draw(yaml_value)
        text = yaml.safe_dump(doc).encode()
    else:
        text = (CONFIGS / base).read_bytes()
    return draw(mutated(st.just(text))) if draw(st.booleans()) else text


CLEAR_CONFIG_ERRORS = (yaml.YAMLError, OmegaConfBaseException, ValueError)
# Config documents the fuzzer found raising bare TypeError / OSError (now one-line ValueErrors),
# with the key the message must name (None: the document itself)
FOUND_CONFIG_BUGS = {
    "- 1\n": "got a list",  # a list document
    "cluster:\n  levels: {a: 1}\n": "cluster.levels must be a list",
    "42\n": "got a scalar",  # a scalar document (was an OSError about a good file)
}


@FUZZ
@given(config_text())
def test_config_files_load_or_fail_clearly(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        try:
            cfg = load_config(path)
        except CLEAR_CONFIG_ERRORS:
            return
    assert type(cfg).__name__ == "Config"


@pytest.mark.parametrize("text", sorted(FOUND_CONFIG_BUGS))
def test_config_documents_of_the_wrong_shape_are_one_line_errors(text, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=FOUND_CONFIG_BUGS[text]) as info:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(info.value) and str(tmp_path / "c.yaml") in str(info.value)


def test_config_never_constructs_python_objects(tmp_path):
    (tmp_path / "c.yaml").write_text("workdir: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(CLEAR_CONFIG_ERRORS):
        load_config(tmp_path / "c.yaml")
    assert not Path("pwned").exists()


def test_json_metadata_member_that_is_not_an_object(tmp_path):
    data = build_tar([{"name": "k.jpg", "type": tarfile.REGTYPE, "link": "", "data": seeds()[0]},
                      {"name": "k.json", "type": tarfile.REGTYPE, "link": "", "data": b"[1, 2]"}], "", False)
    (tmp_path / "t.tar").write_bytes(data)
    (row,) = ingest_one(str(tmp_path / "t.tar"), tmp_path / "w")
    assert row["status"] == "ok" and row["json"] == [1, 2]


@pytest.mark.parametrize("mode,status", [("", "ok"), ("gz", "bad_name")])
def test_member_names_that_are_not_utf8(mode, status, tmp_path):
    """Uncompressed members are read by offset whatever their name; compressed ones need the name."""
    data = build_tar([{"name": "caf\xe9.jpg", "type": tarfile.REGTYPE, "link": "", "data": seeds()[0]}], mode, True)
    path = tmp_path / f"t.tar{'.' + mode if mode else ''}"
    path.write_bytes(data)
    (row,) = ingest_one(str(path), tmp_path / "w")
    assert row["status"] == status and row["name"] == f"{path.name}::caf\\xe9.jpg"
