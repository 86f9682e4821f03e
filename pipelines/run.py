"""`curate run`: the stages in order, each skipped when its manifest says it is done with the same
settings and inputs, each resumable inside (parts). The resolved config is saved in the workdir.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipelines.config import Config, to_yaml
from pipelines.manifest import StageResult


def _embed(cfg: Config, force: bool) -> list[StageResult]:
    """The main embedding, then each of cfg.extra_embeds (DINOv2 used a copy descriptor for
    dedup and a semantic model for retrieval; name them and point dedup/cluster at them)."""
    from dataclasses import replace

    from pipelines.embed_stage import run_embed

    return [run_embed(c, force) for c in [cfg, *(replace(cfg, embed=e) for e in cfg.extra_embeds)]]


def _report(cfg: Config, force: bool) -> StageResult:
    """The stats report is cheap and always reflects the workdir as it is now, so it is rewritten."""
    from pipelines.report_stage import write_report

    t0 = time.time()
    paths = write_report(cfg.workdir)
    return StageResult("report", str(Path(paths["html"]).parent), "", seconds=time.time() - t0, outputs=paths)


def _stage_table() -> dict[str, Callable[[Config, bool], StageResult | list[StageResult]]]:
    from pipelines import stages
    from pipelines.cluster_stage import run_balance, run_cluster
    from pipelines.copy_stage import run_decontaminate, run_dedup
    from pipelines.train_stage import run_evaluate, run_train

    return {"ingest": stages.run_ingest, "hashdedup": stages.run_hashdedup, "embed": _embed,
            "dedup": run_dedup, "decontaminate": run_decontaminate, "cluster": run_cluster,
            "balance": run_balance, "shards": stages.run_shards, "report": _report, "train": run_train,
            "evaluate": run_evaluate}


STAGES = ["ingest", "hashdedup", "embed", "dedup", "decontaminate", "cluster", "balance", "shards", "report",
          "train", "evaluate"]


def enabled(cfg: Config, stage: str) -> bool:
    """Optional stages run when configured: decontaminate with evaluation sets, cluster and balance
    with a selection (a target or seed sets), dedup unless its threshold is set to 1 or more, train
    with a trainer config, evaluate with labelled folders too."""
    if stage in ("cluster", "balance"):
        return bool(cfg.balance.target or cfg.balance.seeds)
    if stage == "decontaminate":
        return bool(cfg.decontaminate.eval_sets)
    if stage == "dedup":
        return cfg.dedup.threshold < 1
    if stage == "train":
        return bool(cfg.train.config)
    if stage == "evaluate":
        return bool(cfg.train.config and cfg.train.eval_train and cfg.train.eval_test)
    return True


def run_pipeline(cfg: Config, start: str | None = None, until: str | None = None,
                 force: bool = False) -> list[StageResult]:
    """Run the stages from `start` to `until` (inclusive); returns their results."""
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    i0 = STAGES.index(start) if start else 0
    i1 = STAGES.index(until) if until else len(STAGES) - 1
    if i0 > i1:
        raise ValueError(f"--from {start} comes after --until {until}")
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(to_yaml(cfg))
    table = _stage_table()
    results = []
    for name in STAGES[i0:i1 + 1]:
        if not enabled(cfg, name):
            continue
        out = table[name](cfg, force)
        results.extend(out if isinstance(out, list) else [out])
    return results
