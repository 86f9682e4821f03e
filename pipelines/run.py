"""`curate run`: the stages in order, each skipped when its manifest says it is done with the same
settings and inputs, each resumable inside (parts), each owned by this process while it runs (a
lock per stage). The resolved config is saved in the workdir.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from curate.parts import write_bytes_atomic
from pipelines.config import Config, to_yaml
from pipelines.framework import enabled, stage_lock
from pipelines.manifest import StageResult

# The flow, in order; each stage's runner is `pipelines.stages.<name>.run(cfg, force)`.
STAGES = ["ingest", "hashdedup", "embed", "dedup", "decontaminate", "cluster", "balance", "shards", "report",
          "train", "evaluate"]
# Stages that only read the workdir and rewrite their own output need no lock.
UNLOCKED = {"report"}
# A stage of these that leaves nothing stops the run (with a note): the next would fail on an empty pool.
CURATION = {"ingest", "hashdedup", "embed", "dedup", "decontaminate", "cluster", "balance"}
STOPPED = "nothing left to curate"


def run_stage(name: str, cfg: Config, force: bool = False) -> list[StageResult]:
    """Run one stage under its lock; returns its result(s)."""
    runner = importlib.import_module(f"pipelines.stages.{name}").run
    if name in UNLOCKED:
        out = runner(cfg, force)
    else:
        with stage_lock(cfg.workdir, name):
            out = runner(cfg, force)
    return out if isinstance(out, list) else [out]


def run_pipeline(cfg: Config, start: str | None = None, until: str | None = None,
                 force: bool = False) -> list[StageResult]:
    """Run the enabled stages from `start` to `until` (inclusive); returns their results."""
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    i0 = STAGES.index(start) if start else 0
    i1 = STAGES.index(until) if until else len(STAGES) - 1
    if i0 > i1:
        raise ValueError(f"--from {start} comes after --until {until}")
    work = Path(cfg.workdir)
    results = []
    with stage_lock(work, "run"):  # one `curate run` per workdir; single-stage commands lock their stage
        write_bytes_atomic(work / "config.yaml", to_yaml(cfg).encode())
        for name in STAGES[i0:i1 + 1]:
            if enabled(cfg, name):
                results.extend(run_stage(name, cfg, force))
                last = results[-1]
                if name in CURATION and last.counts.get("out", 1) == 0 and name != STAGES[i1]:
                    last.notes.append(f"{STOPPED}: the stages after {name} were not run")
                    break
    return results


def stopped_early(results: list[StageResult]) -> bool:
    """True when run_pipeline stopped because a curation stage left nothing."""
    return bool(results) and any(n.startswith(STOPPED) for n in results[-1].notes)
