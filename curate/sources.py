"""Input sources enumerated into plan items: local folders, URL lists, and tar files.

Enumeration is deterministic (sorted walks, file order of lists and tars), so that the same
inputs always give the same plan, the same ids and the same parts.

Every item has a location-independent `name`, the string its record id is hashed from, so the
same data gives the same ids wherever it lives (see `source_names` and `PlanItem.name`):
  folder file   "<source name>/<path relative to the folder>"   e.g. "pool/a/0001.jpg"
  tar member    "<source name>::<member name>"                   e.g. "shard-0.tar::a/0001.jpg"
  single file   "<source name>"
  URL           the URL itself (URL ids are blake2b of the URL, as they always were)
"""

from __future__ import annotations

import csv
import json
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

URL_LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Members of a webdataset sample that carry metadata rather than an image.
META_EXTS = {"json": "json", "txt": "caption", "caption": "caption", "cls": "cls", "id": "source_id"}


TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, KeyError)
"""What reading a damaged (possibly compressed) tar can raise."""


def utf8_text(s: str) -> tuple[str, bool]:
    """`s` as storable UTF-8 text (undecodable bytes escaped as \\xNN), and whether it already was."""
    try:
        s.encode("utf-8")
        return s, True
    except UnicodeEncodeError:
        try:
            raw = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = s.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace"), False


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, URL list without a url column)."""


@dataclass
class PlanItem:
    """One input to ingest: where its bytes are and what came with it."""

    uri: str
    kind: str                   # "file", "url", "tar"
    source: str                 # the SOURCE argument it came from
    name: str = ""              # location-independent name (the id is hashed from it)
    path: str | None = None     # file path, or tar path
    member: str | None = None   # tar member name
    offset: int | None = None   # tar member data offset (uncompressed tars)
    size: int | None = None     # bytes on disk when known
    extra: str | None = None    # JSON object of carried columns (caption, license, ...)
    status: str | None = None   # preset reason when the item is bad before reading it
    error: str | None = None


def source_kind(source: str) -> str:
    """Classify a SOURCE argument as folder, url_list, tar or file."""
    p = Path(source)
    low = source.lower()
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise SourceError(f"source does not exist: {source}")
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(URL_LIST_SUFFIXES):
        return "url_list"
    return "file"


def source_names(sources: Sequence[str]) -> list[str]:
    """Location-independent names of SOURCE arguments: the basename of each folder or file.

    Two different paths with one basename are told apart by order of appearance: the second is
    "<basename>~2", the third "<basename>~3"; the same path given twice keeps one name.
    """
    by_path: dict[str, str] = {}
    used: set[str] = set()
    names = []
    for source in sources:
        resolved = str(Path(source).resolve())
        if resolved not in by_path:
            base = Path(resolved).name or resolved
            name, n = base, 1
            while name in used:
                n += 1
                name = f"{base}~{n}"
            used.add(name)
            by_path[resolved] = name
        names.append(by_path[resolved])
    return names


def iter_source(source: str, name: str | None = None) -> Iterator[PlanItem]:
    """Plan items of one SOURCE, in a deterministic order; `name` defaults to its basename."""
    kind = source_kind(source)
    name = name or source_names([source])[0]
    if kind == "folder":
        yield from _iter_folder(source, name)
    elif kind == "tar":
        yield from _iter_tar(source, name)
    elif kind == "url_list":
        yield from _iter_url_list(source, name)
    else:
        path = str(Path(source).resolve())
        yield PlanItem(uri=path, kind="file", source=source, name=name, path=path, size=os.path.getsize(path))


def _iter_folder(root: str, sname: str) -> Iterator[PlanItem]:
    base = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        rel = Path(dirpath).relative_to(base).as_posix()  # once per directory, not per file
        prefix = f"{sname}/" if rel == "." else f"{sname}/{rel}/"
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            name = prefix + fname
            text, valid = utf8_text(full)
            if not valid:
                yield PlanItem(uri=text, kind="file", source=root, name=utf8_text(name)[0], path=text,
                               status="bad_name", error="file name is not valid UTF-8")
                continue
            try:
                st = os.stat(full)  # one stat: what os.path.isfile and getsize each did
            except (OSError, ValueError):
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                yield PlanItem(uri=full, kind="file", source=root, name=name, path=full,
                               status="not_regular_file", error="broken link or special file")
                continue
            yield PlanItem(uri=full, kind="file", source=root, name=name, path=full, size=st.st_size)


def _json_extra(row: dict) -> str | None:
    extra = {str(k): v for k, v in row.items() if str(k).lower() != "url" and v is not None and v != ""}
    return json.dumps(extra, sort_keys=True, default=str) if extra else None


def _url_column(names: list[str], source: str) -> str:
    for n in names:
        if n.strip().lower() == "url":
            return n
    shown = ", ".join(repr(n) for n in names[:20])
    raise SourceError(f"{source}: no 'url' column (columns: {shown[:300]})")


def _iter_url_list(source: str, sname: str) -> Iterator[PlanItem]:
    low = source.lower()
    if low.endswith(".txt"):
        with open(source, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                url = line.strip()
                if url and not url.startswith("#"):
                    yield PlanItem(uri=url, kind="url", source=source, name=url)
    elif low.endswith((".csv", ".tsv")):
        yield from _iter_csv(source, sname, "\t" if low.endswith(".tsv") else ",")
    else:
        yield from _iter_parquet(source, sname)


def _iter_csv(source: str, sname: str, delimiter: str) -> Iterator[PlanItem]:
    """Rows of a CSV/TSV list; a row the csv module rejects becomes a `bad_row` record."""
    with open(source, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, restkey="_extra_fields")
        try:
            names = list(reader.fieldnames or [])
        except csv.Error as exc:
            raise SourceError(f"{source}: unreadable header ({exc})") from exc
        col = _url_column(names, source)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                where = f"{sname}:<line {reader.line_num}>"
                yield PlanItem(uri=f"{source}:<line {reader.line_num}>", kind="url", source=source, name=where,
                               status="bad_row", error=f"csv: {exc}"[:200])
                continue
            yield _url_item((row.get(col) or "").strip(), row, source, sname)


def _iter_parquet(source: str, sname: str) -> Iterator[PlanItem]:
    """Rows of a Parquet list; a file pyarrow cannot read is a `SourceError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
        col = _url_column(pf.schema_arrow.names, source)
        batches = pf.iter_batches(batch_size=8192)
        while True:
            try:
                rows = next(batches).to_pylist()
            except StopIteration:
                return
            for row in rows:
                yield _url_item(str(row.get(col) or "").strip(), row, source, sname)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{source}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from exc


def _url_item(url: str, row: dict, source: str, sname: str) -> PlanItem:
    item = PlanItem(uri=url, kind="url", source=source, name=url, extra=_json_extra(row))
    if not url:
        item.uri, item.name = f"{source}:<empty url>", f"{sname}:<empty url>"
        item.status, item.error = "bad_url", "empty url"
    return item


def unsafe_member_name(name: str) -> bool:
    """True for absolute member names or names that climb out with '..'."""
    p = PurePosixPath(name)
    return name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the base name; ext = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (ext.lower() if dot else "")


def _iter_tar(source: str, sname: str) -> Iterator[PlanItem]:
    path = str(Path(source).resolve())
    compressed = not path.lower().endswith(".tar")
    try:
        tf = tarfile.open(path, "r:*")
    except TAR_READ_ERRORS as exc:
        yield PlanItem(uri=path, kind="file", source=source, name=sname, path=path, status="bad_tar",
                       error=utf8_text(str(exc))[0][:200])
        return
    group: list[tarfile.TarInfo] = []
    group_key: str | None = None
    with tf:
        try:
            for info in tf:
                if info.isdir():
                    continue
                key, _ = _split_key(info.name)
                if group and key != group_key:
                    yield from _tar_group(tf, group, path, source, sname, compressed)
                    group = []
                group_key = key
                group.append(info)
        except TAR_READ_ERRORS as exc:
            if group:
                yield from _tar_group(tf, group, path, source, sname, compressed)
                group = []
            yield PlanItem(uri=f"{path}::<end>", kind="tar", source=source, name=f"{sname}::<end>", path=path,
                           status="bad_tar", error=utf8_text(f"tar read stopped: {exc}")[0][:200])
        if group:
            yield from _tar_group(tf, group, path, source, sname, compressed)


def _tar_group(tf: tarfile.TarFile, members: list[tarfile.TarInfo], path: str, source: str, sname: str,
               compressed: bool) -> Iterator[PlanItem]:
    extra: dict = {}
    images: list[tarfile.TarInfo] = []
    for info in members:
        _, ext = _split_key(info.name)
        if info.isfile() and not unsafe_member_name(info.name) and ext in META_EXTS:
            try:
                raw = tf.extractfile(info).read().decode("utf-8", errors="replace")
            except TAR_READ_ERRORS:  # unreadable metadata becomes a record of its own, with its reason
                images.append(info)
                continue
            if ext == "json":
                try:
                    obj = json.loads(raw)
                    extra.update(obj if isinstance(obj, dict) else {"json": obj})
                except json.JSONDecodeError:
                    extra["json"] = raw
            else:
                extra[META_EXTS[ext]] = raw.strip()
        else:
            images.append(info)
    extra_json = json.dumps(extra, sort_keys=True, default=str) if extra else None
    for info in images:
        member, valid = utf8_text(info.name)
        item = PlanItem(uri=f"{path}::{member}", kind="tar", source=source, name=f"{sname}::{member}", path=path,
                        member=member, offset=None if compressed else info.offset_data, size=info.size,
                        extra=extra_json)
        if not valid and compressed:  # uncompressed members are read by offset, so their names do not matter
            item.status, item.error = "bad_name", "member name is not valid UTF-8"
        elif unsafe_member_name(info.name):
            item.status, item.error = "unsafe_path", f"member name {info.name!r} escapes the archive"
        elif not info.isfile():
            item.status, item.error = "not_regular_file", f"tar member type {info.type!r}"
        yield item
