"""train: the DINOv2 trainer on the curated shards; a rerun resumes from the last checkpoint (or
does nothing when the run is complete)."""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import Config
from pipelines.framework import stage_dir, train_output
from pipelines.manifest import StageResult


def run(cfg: Config, force: bool = False) -> StageResult:
    """Train on the curated shards; a rerun resumes from the last checkpoint (or does nothing when done)."""
    import shutil

    from train.cli import resolve_config_path
    from train.config import load_config as load_train_config
    from train.loop import train

    tc = cfg.train
    out = train_output(cfg)
    if force and out.exists():
        shutil.rmtree(out)
    shards = Path(cfg.shards.out) if cfg.shards.out else stage_dir(cfg, "shards")
    tcfg = load_train_config(resolve_config_path(tc.config),
                             [f"data.path={shards}", f"output_dir={out}", *tc.overrides])
    t0 = time.time()
    summary = train(tcfg)
    trained = summary["iterations"] - summary["start_iteration"]
    counts: dict = {"iterations": summary["iterations"], "trained_now": trained,
                    "decode_errors": summary["decode_errors"]}
    if summary["history"]:
        counts["final_loss"] = round(float(summary["history"][-1]["loss"]), 4)
    return StageResult("train", str(out), "", skipped=trained == 0, counts=counts, seconds=time.time() - t0,
                       outputs={"teacher": str(out / "teacher_backbone.pt"), "metrics": str(out / "metrics.jsonl")})
