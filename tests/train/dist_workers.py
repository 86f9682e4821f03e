"""Functions run inside spawned training ranks by the distributed tests (see train.dist.launch)."""
from __future__ import annotations

import json
import os


def train_worker(overrides: list[str], stop_at: int | None, out_dir: str, poison_rank: int = -1) -> int:
    """Train with `overrides`; each rank writes its history (or the divergence message) to out_dir/rank<r>.json.

    poison_rank >= 0 makes that rank's loss NaN from iteration 1 on (the other ranks stay finite).
    """
    import torch

    torch.set_num_threads(1)
    from train import dist
    from train.config import load_config
    from train.loop import TrainingDiverged, train
    from train.ssl_model import SSLMetaArch

    if poison_rank >= 0 and int(os.environ["RANK"]) == poison_rank:
        real = SSLMetaArch.forward_loss

        def poisoned(self, batch, teacher_temp):
            loss, terms = real(self, batch, teacher_temp)
            return (loss * float("nan") if batch["iteration"] >= 1 else loss), terms

        SSLMetaArch.forward_loss = poisoned
    cfg = load_config(None, overrides)
    result: dict = {}
    try:
        out = train(cfg, stop_at=stop_at)
        result = {"history": out["history"], "world_size": out["world_size"],
                  "global_batch_size": out["global_batch_size"]}
    except TrainingDiverged as e:
        result = {"diverged": str(e)}
    with open(os.path.join(out_dir, f"rank{dist.rank()}.json"), "w") as f:
        json.dump(result, f)
    return 0
