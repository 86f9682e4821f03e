"""train: the DINOv2 trainer on the curated shards; a rerun resumes from the last checkpoint (or
does nothing when the run is complete)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from curate.parts import write_json_atomic
from pipelines.config import Config
from pipelines.framework import stage_dir, train_output
from pipelines.manifest import StageResult, read_manifest

STAMP = "_curated_from.json"  # which curated shards and trainer config this output was trained on


def run(cfg: Config, force: bool = False) -> StageResult:
    """Train on the curated shards; a rerun resumes from the last checkpoint (or does nothing when done)."""
    import shutil

    from train.cli import resolve_config_path
    from train.config import load_config as load_train_config
    from train.loop import train

    tc = cfg.train
    out = train_output(cfg)
    shards = Path(cfg.shards.out) if cfg.shards.out else stage_dir(cfg, "shards")
    overrides = [f"data.path={shards}", f"output_dir={out}", *tc.overrides]
    tcfg = load_train_config(resolve_config_path(tc.config), overrides)  # a bad config fails here, in one line
    # the trainer's own resume handles changed overrides (e.g. more iterations); other shards or another
    # trainer config make another run
    stamp = {"shards": (read_manifest(shards) or {}).get("key"), "config": tc.config}
    marker = out / STAMP
    made_here = marker.exists()
    if out.exists() and any(out.iterdir()):
        if made_here and json.loads(marker.read_text()) == stamp:
            pass  # the same training: resume
        elif not force:
            raise ValueError(f"{out} holds a training run of other shards or another trainer config (or one not "
                             "made by this stage): "
                             "use --force to restart it, or another train.output_dir")
        elif not made_here:
            raise ValueError(f"refusing to delete {out}: it was not made by the train stage; choose another "
                             "train.output_dir")
        else:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, stamp)
    t0 = time.time()
    if tc.nproc > 1:
        from train.dist import launch

        before = _checkpoint_iteration(out)
        code = launch("train.cli:main", tc.nproc, [tc.config, *overrides])
        if code:
            raise RuntimeError(f"training with {tc.nproc} processes failed (exit code {code}); see {out}")
        last = _logged(out)
        summary = {"iterations": last.get("iteration", -1) + 1, "start_iteration": before,
                   "decode_errors": last.get("decode_errors", 0), "history": [last] if last else []}
    else:
        summary = train(tcfg)
    trained = summary["iterations"] - summary["start_iteration"]
    counts: dict = {"iterations": summary["iterations"], "trained_now": trained,
                    "decode_errors": summary["decode_errors"], "processes": tc.nproc}
    if summary["history"]:
        counts["final_loss"] = round(float(summary["history"][-1]["loss"]), 4)
    return StageResult("train", str(out), "", skipped=trained == 0, counts=counts, seconds=time.time() - t0,
                       outputs={"teacher": str(out / "teacher_backbone.pt"), "metrics": str(out / "metrics.jsonl")})


def _checkpoint_iteration(out: Path) -> int:
    """The iteration a run in `out` resumes from (0 without a checkpoint), read without loading weights."""
    import torch

    from train.checkpoint import find_checkpoint

    path = find_checkpoint(str(out))
    if not path:
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
    except Exception:  # noqa: BLE001 - a damaged file: the trainer itself says what is wrong with it
        return 0


def _logged(out: Path) -> dict:
    """The last record of the run's metrics.jsonl (the ranks log there at the last iteration), or {}."""
    import json

    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
    return {}
