"""SSL sanity benchmark on Fashion-MNIST: k-NN accuracy of the tiny config after a fixed CPU budget.

Compares the trained teacher with the same backbone at random init and with raw pixels. Needs
`apt-get install -y dataset-fashion-mnist` (idx gz files under /usr/share/datasets/fashion-mnist).
Usage: python bench/ssl_fashion.py [--minutes 8] [--n-bank 10000] [--n-test 2000] [--threads 1]
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tempfile
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


def step_time(overrides: list[str]) -> float:
    """Seconds per optimisation step of the tiny config on synthetic crops (for sizing the run)."""
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import _step, build_model, build_schedules
    from train.masking import sample_masks
    from train.optim import build_optimizer

    cfg = load_config(resolve_config_path("tiny"), overrides)
    model = build_model(cfg).train()
    opt = build_optimizer(model.student, model.arch["depth"], 0.9, 0.2)
    sched = build_schedules(cfg)
    b, c = cfg.optim.batch_size, cfg.crops
    masks, _ = sample_masks(2 * b, (c.global_size // 4,) * 2, np.random.default_rng(0))
    batch = {"global": torch.randn(2 * b, 3, c.global_size, c.global_size), "iteration": 0,
             "local": torch.randn(c.n_local * b, 3, c.local_size, c.local_size), "masks": torch.from_numpy(masks)}
    _step(model, opt, batch, sched.at(0), cfg, torch.device("cpu"))
    t = time.perf_counter()
    for i in range(3):
        _step(model, opt, batch, sched.at(i + 1), cfg, torch.device("cpu"))
    return (time.perf_counter() - t) / 3


def main() -> None:
    """Train the tiny config for the budget, then k-NN evaluate three feature sets."""
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--n-bank", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.eval import knn_accuracy, linear_probe
    from train.loop import build_model, train

    xtr = read_idx(f"{DATA}/train-images-idx3-ubyte.gz")
    ytr = torch.from_numpy(read_idx(f"{DATA}/train-labels-idx1-ubyte.gz").astype(np.int64))
    xte = read_idx(f"{DATA}/t10k-images-idx3-ubyte.gz")
    yte = torch.from_numpy(read_idx(f"{DATA}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    work = args.out or tempfile.mkdtemp(prefix="ssl_fashion_")
    shard_dir = os.path.join(work, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    write_shards(xtr, shard_dir)
    base = [f"optim.batch_size={args.batch}", "data.num_workers=0", "progress=false", f"data.path={shard_dir}"]
    t_iter = step_time(base) * 1.15  # + data pipeline
    iters = max(20, int(args.minutes * 60 / t_iter))
    overrides = base + [f"optim.iterations={iters}", f"optim.warmup_iters={iters // 10}",
                        f"loss.warmup_teacher_temp_iters={iters // 3}", f"head.freeze_last_layer_iters={iters // 20}",
                        f"checkpoint_every={iters}", f"output_dir={os.path.join(work, 'run')}", "resume=false"]
    cfg = load_config(resolve_config_path("tiny"), overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    teacher = summary["model"].teacher["backbone"]
    torch.manual_seed(cfg.seed)
    random_backbone = build_model(cfg).teacher["backbone"]

    rng = np.random.default_rng(0)
    bank = rng.choice(len(xtr), args.n_bank, replace=False)
    test = rng.choice(len(xte), args.n_test, replace=False)
    results = {}
    feats = {
        "raw_pixels": (torch.from_numpy(xtr[bank].reshape(len(bank), -1)).float(),
                       torch.from_numpy(xte[test].reshape(len(test), -1)).float()),
        "random_init": (embed(random_backbone, xtr[bank], cfg.crops.global_size),
                        embed(random_backbone, xte[test], cfg.crops.global_size)),
        "trained": (embed(teacher, xtr[bank], cfg.crops.global_size), embed(teacher, xte[test], cfg.crops.global_size)),
    }
    for name, (ftr, fte) in feats.items():
        knn = knn_accuracy(ftr, ytr[bank], fte, yte[test], ks=(10, 20, 100, 200))
        probe = linear_probe(torch.nn.functional.normalize(ftr, dim=1), ytr[bank],
                             torch.nn.functional.normalize(fte, dim=1), yte[test], steps=200)
        results[name] = {"knn": {str(k): round(v, 4) for k, v in knn.items()}, "linear": round(probe["accuracy"], 4)}
    hist = summary["history"]
    print(json.dumps({"bench": "ssl_fashion", "config": "tiny", "iterations": iters, "batch": args.batch,
                      "train_minutes": round(train_s / 60, 2), "threads": args.threads,
                      "loss_first": round(hist[0]["loss"], 4), "loss_last": round(float(np.mean([h["loss"] for h in hist[-20:]])), 4),
                      "n_bank": args.n_bank, "n_test": args.n_test, "results": results}))


if __name__ == "__main__":
    main()
