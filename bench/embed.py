"""Embedding stage throughput vs the bare model forward on the same pre-decoded batches.

    python bench/embed.py [--n 256] [--models vits14,pixels] [--batch-size 32]

Whole stage = read raw shards, decode, preprocess (DataLoader workers), forward, normalise, write
parts. Baselines, same run, same batch size, all cores: (1) the model forward only, on the same
images decoded and preprocessed beforehand; (2) a plain sequential loop (decode, preprocess,
forward, no writing). For a real model (1) is the ceiling; for `pixels` the forward is nearly
free, so (2) is the meaningful baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, make_folder


def _model(name: str):
    import timm
    from timm.data import create_transform, resolve_data_config

    from pipelines.embedding import load_embedder

    if name == "pixels":
        e = load_embedder("pixels:16")
        return e.model, e.transform, e.dim
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    cfg = resolve_data_config({"input_size": (3, 224, 224)}, model=model)
    return model, create_transform(**cfg, is_training=False), model.num_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--models", default="vits14,pixels")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch
    from PIL import Image

    from curate.embed import EmbedSettings, embed_parts
    from curate.ingest import IngestSettings, ingest
    from curate.parts import read_table

    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    make_folder(tmp / "folder", args.n, size=(320, 240))
    ingest([str(tmp / "folder")], tmp / "ingest", IngestSettings(part_size=128))
    records = read_table(tmp / "ingest").to_pylist()
    jobs = [(k, records[i:i + 128]) for k, i in enumerate(range(0, len(records), 128))]
    out = {}
    for name in args.models.split(","):
        model, transform, dim = _model(name)
        settings = EmbedSettings(batch_size=args.batch_size, num_workers=args.workers, device="cpu",
                                 threads=args.threads)
        torch.set_num_threads(os.cpu_count() or 1)
        batches = []
        for i in range(0, len(records), args.batch_size):
            imgs = [transform(Image.open(r["uri"]).convert("RGB")) for r in records[i:i + args.batch_size]]
            batches.append(torch.stack(imgs))
        with torch.inference_mode():
            model(batches[0])  # warm-up
            t0 = time.perf_counter()
            for b in batches:
                torch.nn.functional.normalize(model(b).float(), dim=-1)
            bare = args.n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(records), args.batch_size):
                imgs = [transform(Image.open(r["uri"]).convert("RGB")) for r in records[i:i + args.batch_size]]
                torch.nn.functional.normalize(model(torch.stack(imgs)).float(), dim=-1)
        loop = args.n / (time.perf_counter() - t0)
        shutil.rmtree(tmp / "emb", ignore_errors=True)
        t0 = time.perf_counter()
        embed_parts(jobs, tmp / "ingest", tmp / "emb", model, transform, dim, settings)
        stage = args.n / (time.perf_counter() - t0)
        out[name] = {"stage_images_per_s": round(stage, 1), "forward_images_per_s": round(bare, 1),
                     "ratio_vs_forward": round(stage / bare, 3), "plain_loop_images_per_s": round(loop, 1),
                     "ratio_vs_plain_loop": round(stage / loop, 3)}
    emit("embed", n=args.n, batch_size=args.batch_size, workers=args.workers, threads=args.threads or "auto",
         image="320x240 jpeg", **out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
