"""SSL benchmark on Fashion-MNIST: does the small-budget config learn, over seeds, at a fixed iteration count.

Teacher k-NN (k 20, T 0.07; bank of n-bank train images, the whole test split) of the trained
network, next to raw pixels and the untrained network of the same shape, and how far the DINO
term ends below ln(K). Needs the idx gz files under /usr/share/datasets/fashion-mnist.
Usage: python bench/ssl_fashion.py [--config tiny] [--iters 600] [--seeds 0,1,2] [--curve 150,300] [key=value ...]
Prints one JSON line (per-seed lines go to stderr).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian dims after a 4-byte magic) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_shards(images: np.ndarray, root: str, per_shard: int = 10000) -> None:
    """Unlabelled webdataset shards in the curation layout (png + json)."""
    import webdataset as wds
    from PIL import Image

    for s in range(0, len(images), per_shard):
        with wds.TarWriter(os.path.join(root, f"shard-{s // per_shard:06d}.tar")) as w:
            for i in range(s, min(s + per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                key = f"{i:016x}"
                w.write({"__key__": key, "png": buf.getvalue(),
                         "json": json.dumps({"id": key, "width": 28, "height": 28}).encode()})


@torch.no_grad()
def embed(backbone, images: np.ndarray, image_size: int, batch: int = 500) -> torch.Tensor:
    """CLS features of uint8 grayscale images with the eval preprocessing."""
    from PIL import Image

    from train.eval import preprocess
    from train.models import IMAGENET_MEAN, IMAGENET_STD


    backbone.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess(Image.fromarray(a).convert("RGB"), image_size, IMAGENET_MEAN, IMAGENET_STD)
                         for a in images[i:i + batch]])
        out.append(backbone(x)["cls"].float())
    return torch.cat(out)


def prepare(work: str) -> tuple[np.ndarray, torch.Tensor, np.ndarray, torch.Tensor, str]:
    """Fashion-MNIST arrays and unlabelled training shards (written once under `work`)."""
    xtr = read_idx(f"{DATA}/train-images-idx3-ubyte.gz")
    ytr = torch.from_numpy(read_idx(f"{DATA}/train-labels-idx1-ubyte.gz").astype(np.int64))
    xte = read_idx(f"{DATA}/t10k-images-idx3-ubyte.gz")
    yte = torch.from_numpy(read_idx(f"{DATA}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    shard_dir = os.path.join(work, "shards")
    if not os.path.isfile(os.path.join(shard_dir, "shard-000005.tar")):
        os.makedirs(shard_dir, exist_ok=True)
        write_shards(xtr, shard_dir)
    return xtr, ytr, xte, yte, shard_dir


def knn20(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor) -> float:
    """Weighted k-NN top-1 (k 20, T 0.07) as in the DINO/DINOv2 evaluation."""
    from train.eval import knn_accuracy

    return round(knn_accuracy(ftr, ytr, fte, yte, ks=(20,), temperature=0.07)[20], 4)


def run_seed(seed: int, iters: int, overrides: list[str], work: str, data, n_bank: int) -> dict:
    """Train the config for `iters` iterations with one seed; k-NN of trained, untrained and pixels."""
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import build_model, train

    xtr, ytr, xte, yte, shard_dir = data
    ov = [f"data.path={shard_dir}", "data.num_workers=0", "progress=false", f"seed={seed}",
          f"optim.iterations={iters}", f"checkpoint_every={iters}", f"output_dir={work}/run-{seed}-{ARGS.tag}",
          "resume=false"]
    if not ARGS.own_schedules:  # warm-ups sized to the run (the tiny config's are for 2,000 iterations)
        ov += [f"optim.warmup_iters={iters // 10}", f"loss.warmup_teacher_temp_iters={iters // 3}",
               f"head.freeze_last_layer_iters={iters // 20}"]
    ov += overrides
    cfg = load_config(resolve_config_path(ARGS.config), ov)
    bank = np.random.default_rng(seed).choice(len(xtr), n_bank, replace=False)
    test = np.random.default_rng(1000 + seed).choice(len(xte), ARGS.n_test, replace=False)
    xte, yte = xte[test], yte[test]
    size = cfg.eval_size or cfg.crops.global_size

    def knn_of(net) -> float:
        return knn20(embed(net, xtr[bank], size), ytr[bank], embed(net, xte, size), yte)

    # --curve: stop at those iterations (after a checkpoint), score the teacher, resume exactly
    stops = sorted({int(i) for i in ARGS.curve.split(",") if i and 0 < int(i) < iters}) + [iters]
    hist, curve, train_s = [], [], 0.0
    for k, stop in enumerate(stops):
        if k:
            cfg.resume = True
        t0 = time.perf_counter()
        summary = train(cfg, stop_at=stop)
        train_s += time.perf_counter() - t0
        hist += summary["history"]
        if stop < iters:
            curve.append({"iteration": stop, "knn": knn_of(summary["model"].teacher["backbone"]),
                          "dino": round(float(np.mean([h["dino_loss"] for h in summary["history"][-10:]])), 4)})
            print(json.dumps({"seed": seed, **curve[-1]}), file=sys.stderr, flush=True)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg).teacher["backbone"]
    res = {"seed": seed, "train_s": round(train_s, 1), "s_per_iter": round(train_s / iters, 4),
           "knn_trained": knn_of(summary["model"].teacher["backbone"]), "knn_untrained": knn_of(untrained)}
    if curve:
        res["curve"] = curve
    last = hist[-max(1, min(20, len(hist) // 10)):]
    res["dino_last"] = round(float(np.mean([h["dino_loss"] for h in last])), 4)
    res["ibot_last"] = round(float(np.mean([h["ibot_loss"] for h in last])), 4)
    res["ln_K"] = round(float(np.log(cfg.head.prototypes)), 4)
    res["dino_below_lnK"] = round(res["ln_K"] - res["dino_last"], 4)
    return res


def main() -> None:
    """Train the small-budget config for a fixed number of iterations per seed; k-NN against baselines."""
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-bank", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="run")
    p.add_argument("--own-schedules", action="store_true",
                   help="keep the config's warm-up and last-layer-freeze lengths (default: iters/10, /3, /20)")
    p.add_argument("--curve", default="", help="comma list of iterations at which the teacher k-NN is also "
                   "scored (the run stops there after a checkpoint and resumes exactly)")
    p.add_argument("--work", default="/tmp/ssl_fashion")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    ARGS = p.parse_args()
    torch.set_num_threads(ARGS.threads)
    data = prepare(ARGS.work)
    xtr, ytr, xte, yte, _ = data
    bank = np.random.default_rng(0).choice(len(xtr), ARGS.n_bank, replace=False)
    test = np.random.default_rng(1000).choice(len(xte), ARGS.n_test, replace=False)
    pixels = knn20(torch.from_numpy(xtr[bank].reshape(len(bank), -1).astype(np.float32)), ytr[bank],
                   torch.from_numpy(xte[test].reshape(len(test), -1).astype(np.float32)), yte[test])
    runs = []
    for seed in [int(s) for s in ARGS.seeds.split(",")]:
        runs.append(run_seed(seed, ARGS.iters, ARGS.overrides, ARGS.work, data, ARGS.n_bank))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)

    def stat(key: str) -> dict:
        v = np.array([r[key] for r in runs], dtype=float)
        return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}

    print(json.dumps({"bench": "ssl_fashion", "config": ARGS.config, "overrides": ARGS.overrides,
                      "own_schedules": ARGS.own_schedules,
                      "iterations": ARGS.iters, "threads": ARGS.threads, "n_bank": ARGS.n_bank,
                      "n_test": ARGS.n_test, "knn_k": 20, "knn_T": 0.07, "raw_pixels": pixels,
                      "trained": stat("knn_trained"), "untrained": stat("knn_untrained"),
                      "dino_below_lnK": stat("dino_below_lnK"), "s_per_iter": stat("s_per_iter"),
                      "runs": runs}))


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
