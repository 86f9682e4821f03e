"""Every GPU-only measurement in one go (under 10 minutes on one GPU); skips them without a GPU.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py [--n 2048]

1. CUDA embedding throughput, ViT-L/14 (DINOv2 architecture, random init) at 224 px, bf16:
   bare forward on pre-made batches vs the whole embed stage (raw shards -> DataLoader decode ->
   forward -> float16 parts), images/s and the ratio.
2. faiss GPU k-NN (exact inner product, 1M x 256 base, 10k queries, k = 10) vs faiss CPU on the
   same data, when faiss was built with GPU support; otherwise a torch matmul top-k on the GPU.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, make_folder


def embed_check(n: int, batch: int) -> None:
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from curate.embed import EmbedSettings, embed_parts
    from curate.ingest import IngestSettings, ingest
    from curate.parts import read_table

    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    model = model.cuda().eval().to(memory_format=torch.channels_last)
    transform = create_transform(**resolve_data_config({"input_size": (3, 224, 224)}, model=model))
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = max(1, n // batch)
        for _ in range(steps):
            model(x)
        torch.cuda.synchronize()
    bare = steps * batch / (time.perf_counter() - t0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    make_folder(tmp / "folder", n, size=(320, 240))
    ingest([str(tmp / "folder")], tmp / "ingest", IngestSettings(part_size=512))
    records = read_table(tmp / "ingest").to_pylist()
    jobs = [(k, records[i:i + 512]) for k, i in enumerate(range(0, len(records), 512))]
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    settings = EmbedSettings(batch_size=batch, num_workers=workers, device="cuda", precision="bf16")
    t0 = time.perf_counter()
    embed_parts(jobs, tmp / "ingest", tmp / "emb", model, transform, model.num_features, settings)
    torch.cuda.synchronize()
    stage = n / (time.perf_counter() - t0)
    emit("gpu_embed_vitl14_224_bf16", device=torch.cuda.get_device_name(0), n=n, batch=batch, workers=workers,
         forward_images_per_s=round(bare, 1), stage_images_per_s=round(stage, 1), ratio=round(stage / bare, 3))
    shutil.rmtree(tmp, ignore_errors=True)


def knn_check(nb: int, nq: int, d: int = 256, k: int = 10) -> None:
    import faiss
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((nb, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(nb, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d), dtype=np.float32)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb)
    t0 = time.perf_counter()
    _, i_cpu = cpu.search(xq[:1000], k)
    cpu_qps = 1000 / (time.perf_counter() - t0)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        gpu.search(xq[:10], k)
        t0 = time.perf_counter()
        _, i_gpu = gpu.search(xq, k)
        gpu_qps = nq / (time.perf_counter() - t0)
        agree = float((i_gpu[:1000] == i_cpu).mean())
        emit("gpu_knn_faiss", nb=nb, nq=nq, d=d, k=k, gpu_qps=round(gpu_qps), cpu_qps=round(cpu_qps),
             speedup=round(gpu_qps / cpu_qps, 1), top_k_agreement=round(agree, 4))
        return
    base = torch.from_numpy(xb).cuda().half()
    q = torch.from_numpy(xq).cuda().half()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, nq, 1000):
        torch.topk(q[s:s + 1000] @ base.T, k, dim=1)
    torch.cuda.synchronize()
    emit("gpu_knn_torch_topk", note="faiss has no GPU support here (install the gpu extra)", nb=nb, nq=nq,
         d=d, k=k, gpu_qps=round(nq / (time.perf_counter() - t0)), faiss_cpu_qps=round(cpu_qps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048, help="images for the embedding check")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--nb", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=10_000)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        emit("gpu_check", skipped=True, reason="no CUDA device: GPU embedding and faiss GPU k-NN skipped")
        return
    for name, fn in (("embed", lambda: embed_check(args.n, args.batch)), ("knn", lambda: knn_check(args.nb, args.nq))):
        try:
            fn()
        except Exception as exc:  # report and go on to the next measurement
            emit(f"gpu_check_{name}", failed=True, error=f"{type(exc).__name__}: {exc}"[:300])
            print(f"gpu_check: {name} failed", file=sys.stderr)


if __name__ == "__main__":
    main()
