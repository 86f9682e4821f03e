"""The stage framework every runner in `pipelines/stages/` uses: the workdir layout, upstream keys,
source fingerprints, which optional stages are on and whose drops count, progress bars, and the
lock that makes one process the owner of a stage.

A runner reads its settings from the config, calls `begin` (manifest.py) with a key made of those
settings and its upstream keys, writes its parts, and calls `finish`; `run.py` and `cli.py` take
the stage's lock around the call.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tqdm as _tqdm
from tqdm import tqdm

from pipelines.config import Config
from pipelines.manifest import read_manifest

# tqdm's monitor thread would make ingest spawn its workers instead of forking them (slower start)
_tqdm.tqdm.monitor_interval = 0

# Optional stages whose drops later stages honour once they have run: column, and what drops a record.
DROP_FILTERS = {"dedup": ("copy_of", "not_null"), "decontaminate": ("contaminated", "true")}


class StageBusy(RuntimeError):
    """Another live process owns the stage in this workdir."""


def stage_dir(cfg: Config, stage: str) -> Path:
    """`<workdir>/<stage>`: the one directory the stage writes."""
    return Path(cfg.workdir) / stage


def upstream(cfg: Config, *stages: str) -> dict:
    """Keys of finished upstream stages (they enter this stage's key); a missing one is a clear error."""
    out = {}
    for s in stages:
        m = read_manifest(stage_dir(cfg, s))
        if m is None:
            raise RuntimeError(f"stage '{s}' has not finished in {cfg.workdir}; run `curate {s}` first")
        out[s] = m["key"]
    return out


def source_fingerprint(source: str) -> dict:
    """Name plus size and mtime; for a folder, a stat walk (files, bytes, newest mtime), so adding or
    changing images changes the stage's key (a rerun is refused until --force) instead of reporting
    'already done'. The basename, not the
    path, as record ids are location-independent: moving the inputs (mv keeps mtimes) redoes nothing."""
    p = Path(source).resolve()
    if p.is_file():
        st = p.stat()
        return {"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = size = newest = 0
    for dirpath, _, names in os.walk(p):
        for name in names:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"name": p.name, "files": files, "bytes": size, "newest_mtime_ns": newest}


def enabled(cfg: Config, stage: str) -> bool:
    """Optional stages run when configured: decontaminate with evaluation sets, cluster and balance
    with a selection (a target or seed sets), dedup unless its threshold is set to 1 or more, train
    with a trainer config, evaluate with labelled folders too."""
    if stage in ("cluster", "balance"):
        return bool(cfg.balance.target or cfg.balance.seeds)
    if stage == "decontaminate":
        return bool(cfg.decontaminate.eval_sets)
    if stage == "dedup":
        return cfg.dedup.threshold is None or cfg.dedup.threshold < 1
    if stage == "train":
        return bool(cfg.train.config)
    if stage == "evaluate":
        return bool(cfg.train.config and cfg.train.eval_train and cfg.train.eval_test)
    return True


def finished_filters(cfg: Config) -> list[str]:
    """The optional dropping stages that are enabled by the config and have finished, for the stages
    after them. Decontamination configured but not run (or run on another copy dedup than the one
    now finished) is an error: its drops must not be skipped silently."""
    done = {s: read_manifest(stage_dir(cfg, s)) for s in DROP_FILTERS if enabled(cfg, s)}
    if "decontaminate" in done:
        xc = done["decontaminate"]
        if xc is None:
            raise RuntimeError(f"decontaminate is configured (evaluation sets) but has not finished in {cfg.workdir}: "
                               "run `curate decontaminate` (or `curate run`) first")
        dedup = done.get("dedup")
        if dedup is not None and xc["inputs"].get("dedup") != dedup["key"]:
            raise RuntimeError("decontaminate ran before (or with another) copy dedup than the one now finished: "
                               "redo it (`curate decontaminate --force`)")
    return [s for s, m in done.items() if m is not None]


def dropped_by(stage: str, values):
    """Which records a finished filter stage dropped, from its DROP_FILTERS column (an Arrow array)."""
    import pyarrow.compute as pc

    rule = DROP_FILTERS[stage][1]
    return pc.is_valid(values) if rule == "not_null" else pc.fill_null(values, False)


def progress(total: int | None, desc: str, unit: str) -> tqdm:
    """A progress bar on stderr when it is a terminal (or CURATE_PROGRESS=1)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("CURATE_PROGRESS") != "1")


@contextmanager
def stage_lock(workdir: str | Path, stage: str) -> Iterator[None]:
    """Own `stage` in `workdir` for the block: an fcntl lock on `<workdir>/_locks/<stage>.lock`, which the
    kernel releases when the holder dies. A second owner fails at once with the holder's pid and host."""
    locks = Path(workdir) / "_locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (stage.replace("/", "-") + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            raise StageBusy(f"stage '{stage}' in {workdir} is being run by pid {holder.get('pid', '?')} on host "
                            f"{holder.get('host', '?')}; wait for it to finish (or stop it) and run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def check_settings(cfg: Config):
    """The per-image checks of cfg.ingest as curate.images.CheckSettings (pool and reference sets)."""
    from curate.images import CheckSettings

    ic = cfg.ingest
    return CheckSettings(min_side=ic.min_side, max_pixels=ic.max_pixels, max_bytes=ic.max_file_bytes,
                         phash_exact=ic.phash_exact, lowinfo=ic.lowinfo, lowinfo_min_std=ic.lowinfo_min_std,
                         lowinfo_max_flat=ic.lowinfo_max_flat, lowinfo_min_corr=ic.lowinfo_min_corr)


def train_output(cfg: Config) -> Path:
    """Where the trainer writes (checkpoints, teacher_backbone.pt, metrics.jsonl)."""
    return Path(cfg.train.output_dir) if cfg.train.output_dir else stage_dir(cfg, "train")
