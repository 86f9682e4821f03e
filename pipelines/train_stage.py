"""The train and evaluate stages of `curate run` / `curate train PIPELINE_CONFIG`: the trainer on the
curated shards (resuming from its last checkpoint), then k-NN and a linear probe of its teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.config import Config
from pipelines.manifest import StageResult
from pipelines.stages import stage_dir


def train_output(cfg: Config) -> Path:
    """Where the trainer writes (checkpoints, teacher_backbone.pt, metrics.jsonl)."""
    return Path(cfg.train.output_dir) if cfg.train.output_dir else stage_dir(cfg, "train")


def run_train(cfg: Config, force: bool = False) -> StageResult:
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


def run_evaluate(cfg: Config, force: bool = False) -> StageResult:
    """k-NN (and a linear probe) of the trained teacher on the labelled train/test folders."""
    from curate.parts import write_json_atomic
    from train.eval import evaluate

    tc = cfg.train
    t0 = time.time()
    res = evaluate(str(train_output(cfg) / "teacher_backbone.pt"), tc.eval_train, tc.eval_test,
                   ks=tuple(tc.ks), probe_steps=tc.probe_steps)
    out = stage_dir(cfg, "evaluate")
    write_json_atomic(out / "eval.json", res)
    counts = {f"knn@{k}": round(v, 4) for k, v in res["knn"].items()}
    counts["linear"] = round(res["linear"]["accuracy"], 4)
    return StageResult("evaluate", str(out), "", counts=counts, seconds=time.time() - t0,
                       outputs={"eval": str(out / "eval.json")})


def is_pipeline_config(path: str) -> bool:
    """A pipeline config (curate, then train) rather than a trainer config."""
    import os

    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        return False
    keys = set(OmegaConf.load(path).keys())
    return bool(keys & {"workdir", "ingest", "embed", "balance", "shards"})


def dump(result: StageResult) -> str:
    """One JSON line of a result, for logs."""
    return json.dumps({"stage": result.stage, **result.counts})
