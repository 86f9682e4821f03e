"""One GPU training check: ViT-L/14 step throughput, MFU and peak memory in bf16 under FSDP2 (with and
without activation checkpointing), or a DDP run when started by torchrun with 2+ processes.

Batches are synthetic tensors of the recipe's shapes (2 x 224 px global, 8 x 98 px local crops, real iBOT
masks), so this measures the model step, not decoding. FLOPs are counted analytically (matmuls of the
backbone, attention and heads; training = 3 x forward for the student, 1 x forward for the teacher).
MFU is against the bf16 dense peak of the GPU when known (H100/H200 989, A100 312 TFLOP/s) and against
a bf16 matmul measured in the same run. Prints one JSON line per measurement (rank 0).
Usage: bench/gpu_train_check.sh (or: python bench/gpu_train_check.py [--steps 10] [--batch 32])
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before bench/ itself: bench/train.py must not shadow the train package

import numpy as np  # noqa: E402
import torch  # noqa: E402

SPEC_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def vit_forward_flops(tokens: int, dim: int, depth: int, hidden: int, patch_in: int, n_patches: int) -> float:
    """Matmul FLOPs of one image through the backbone (qkv, proj, attention, MLP, patch projection)."""
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim
    return depth * per_block + 2 * n_patches * patch_in * dim


def step_flops(cfg, arch: dict, batch: int, head_params: int, masked_patches: int) -> float:
    """Analytic FLOPs of one training step (student fwd+bwd = 3 x fwd, teacher fwd)."""
    p, c = arch["patch_size"], cfg.crops
    hidden = int(arch["embed_dim"] * arch["mlp_ratio"]) if arch["ffn"] == "mlp" else int(8 / 3 * arch["embed_dim"])
    patch_in = 3 * p * p
    ng, nl = (c.global_size // p) ** 2, (c.local_size // p) ** 2
    prefix = 1 + arch["reg_tokens"]
    fg = vit_forward_flops(ng + prefix, arch["embed_dim"], arch["depth"], hidden, patch_in, ng)
    fl = vit_forward_flops(nl + prefix, arch["embed_dim"], arch["depth"], hidden, patch_in, nl)
    student = 2 * batch * fg + c.n_local * batch * fl + 2 * head_params * ((2 + c.n_local) * batch + masked_patches)
    teacher = 2 * batch * fg + 2 * head_params * (2 * batch + masked_patches)
    return 3 * student + teacher


def synthetic_batch(cfg, batch: int, device: torch.device, rng: np.random.Generator) -> dict:
    from train.masking import sample_masks

    c, p = cfg.crops, cfg.model.patch_size
    masks, _ = sample_masks(2 * batch, (c.global_size // p,) * 2, rng, cfg.mask.sample_probability,
                            cfg.mask.ratio_min, cfg.mask.ratio_max)
    return {"global": torch.randn(2 * batch, 3, c.global_size, c.global_size, device=device),
            "local": torch.randn(c.n_local * batch, 3, c.local_size, c.local_size, device=device),
            "masks": torch.from_numpy(masks).to(device), "iteration": 0}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Best FLOP/s of an n x n matmul on the device."""
    if device.type != "cuda":
        n, reps = 512, 3
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: str, overrides: list[str], strategy: str, ac: bool, steps: int, warmup: int,
            batch: int, device: torch.device, peak: float) -> dict:
    """Build, wrap and time `steps` training steps; returns the figures."""
    from train import dist
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import _step, build_model, build_schedules
    from train.optim import build_optimizer

    cfg = load_config(resolve_config_path(config), overrides + [f"optim.batch_size={batch}",
                                                                "optim.iterations=1000", "optim.warmup_iters=10"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    head_params = sum(p.numel() for k, m in model.student.items() if k != "backbone" for p in m.parameters())
    head_params //= max(len(model.student) - 1, 1)
    dist.wrap_model(model, strategy, device, ac)
    opt = build_optimizer(model.student, model.arch["depth"], cfg.optim.layerwise_decay,
                          cfg.optim.patch_embed_lr_mult)
    sched = build_schedules(cfg, batch * dist.world_size())
    rng = np.random.default_rng(dist.rank())
    batches = [synthetic_batch(cfg, batch, device, rng) for _ in range(2)]
    masked = int(batches[0]["masks"].sum())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        _step(model, opt, batches[i % 2], sched.at(20 + i), cfg, device)
    _sync(device)
    t = time.perf_counter()
    for i in range(steps):
        out = _step(model, opt, batches[i % 2], sched.at(30 + i), cfg, device)
    _sync(device)
    dt = (time.perf_counter() - t) / steps
    flops = step_flops(cfg, model.arch, batch, head_params, masked) * dist.world_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = next((v for k, v in SPEC_PEAK.items() if k in name), 0.0)
    res = {"config": config, "strategy": strategy if dist.is_enabled() else "single", "activation_checkpointing": ac,
           "world_size": dist.world_size(), "device": name, "per_gpu_batch": batch, "step_s": round(dt, 4),
           "images_per_s": round(batch * dist.world_size() / dt, 1), "tflops_per_step": round(flops / 1e12, 2),
           "mfu_vs_measured_bf16_matmul": round(flops / dt / (peak * dist.world_size()), 3),
           "mfu_vs_spec": round(flops / dt / (spec * dist.world_size()), 3) if spec else None,
           "loss": round(out.get("loss", float("nan")), 4)}
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    del model, opt, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="vitl14")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch (vitl14 recipe: 32)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--strategies", default="fsdp,fsdp+ac", help="comma list of fsdp, fsdp+ac, ddp")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides (e.g. a tiny model on CPU)")
    a = ap.parse_args()
    import torch.distributed as tdist

    from train import dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = dist.setup(a.device)
    if not dist.is_enabled():  # one process: still a process group, so FSDP2 shards (world size 1)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    for name in a.strategies.split(","):
        strategy, ac = name.split("+")[0], name.endswith("+ac")
        res = measure(a.config, a.overrides, strategy, ac, a.steps, a.warmup, a.batch, device, peak)
        res["measured_matmul_tflops"] = round(peak / 1e12, 1)
        if dist.rank() == 0:
            print(json.dumps(res), flush=True)
    dist.cleanup()


if __name__ == "__main__":
    main()
