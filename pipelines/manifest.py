"""Stage manifests: a stage is done when `<stage dir>/_MANIFEST.json` exists with the same key.

The key hashes the stage's settings and its inputs' fingerprints. A started stage leaves
`_STARTED.json`, so a rerun with other settings is refused (or redone with --force) instead of
mixing parts made under two configs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from curate import __version__
from curate.parts import clean_temporaries, write_json_atomic

MANIFEST = "_MANIFEST.json"
STARTED = "_STARTED.json"


class StageConflict(RuntimeError):
    """The stage directory holds work made with other settings or inputs."""


@dataclass
class StageResult:
    """What one stage run did, for the summary and for downstream fingerprints."""

    stage: str
    directory: str
    key: str
    skipped: bool = False
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # lines the summary shows (warnings, hints)


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The manifest of a finished stage, or None."""
    p = Path(stage_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


def begin(stage: str, stage_dir: str | Path, key: str, force: bool = False) -> StageResult | None:
    """Prepare a stage run; returns the previous result when it is already done with this key."""
    d = Path(stage_dir)
    done = read_manifest(d)
    started = json.loads((d / STARTED).read_text()) if (d / STARTED).exists() else None
    recorded = (done or started or {}).get("key")
    if force and (done or started):
        shutil.rmtree(d)  # --force redoes the stage, whatever it holds
        done = started = recorded = None
    if recorded is not None and recorded != key:
        if not force:
            raise StageConflict(
                f"{d} holds '{stage}' work made with other settings or inputs (key {recorded}, now {key}); "
                "use --force to redo this stage, or another --workdir")
        shutil.rmtree(d)
        done = None
    if done is not None:
        return StageResult(stage, str(d), key, skipped=True, counts=done.get("counts", {}),
                           seconds=0.0, outputs=done.get("outputs", {}))
    d.mkdir(parents=True, exist_ok=True)
    clean_temporaries(d)
    if started is None or recorded != key:
        write_json_atomic(d / STARTED, {"stage": stage, "key": key, "started": time.time()})
    return None


def finish(result: StageResult, config: dict, inputs: dict) -> None:
    """Write the manifest that marks the stage done."""
    write_json_atomic(Path(result.directory) / MANIFEST, {
        "stage": result.stage, "key": result.key, "config": config, "inputs": inputs,
        "counts": result.counts, "outputs": result.outputs,
        "timings": {"seconds": round(result.seconds, 3)}, "version": __version__,
    })
