"""evaluate: k-NN and a linear probe of the trained teacher on labelled train/test folders."""

from __future__ import annotations

import time

from pipelines.config import Config
from pipelines.framework import stage_dir, train_output
from pipelines.manifest import StageResult


def run(cfg: Config, force: bool = False) -> StageResult:
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
