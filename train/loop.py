"""Iteration-based DINOv2 training loop with exact resume, NaN guard, logging and checkpoints."""
from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch

from train import dist
from train.augment import MultiCropAugment
from train.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from train.config import TrainConfig, to_yaml
from train.data import BatchBuilder, BatchSpec, build_index, make_loader
from train.models import resolve_arch, save_backbone
from train.optim import build_optimizer
from train.schedules import Schedules
from train.ssl_model import SSLMetaArch

TEACHER_BACKBONE = "teacher_backbone.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient norm becomes non-finite; the last good checkpoint is untouched."""


def _maybe_init_distributed(device: torch.device) -> None:
    """Join a torch.distributed group when launched by torchrun with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_enabled():
        import torch.distributed as tdist

        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def build_model(cfg: TrainConfig) -> SSLMetaArch:
    """Student/teacher model from the config (seeded by the caller)."""
    m, h, lo = cfg.model, cfg.head, cfg.loss
    arch = resolve_arch(m.arch, m.patch_size, cfg.crops.global_size, m.reg_tokens, m.init_values,
                        m.drop_path_rate, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                        mlp_ratio=m.mlp_ratio, ffn=m.ffn)
    return SSLMetaArch(arch, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.ibot_separate_head,
                       h.ibot_prototypes, h.ibot_bottleneck_dim, lo.centering, lo.center_momentum, lo.sinkhorn_iterations,
                       lo.student_temp, lo.dino_weight, lo.ibot_weight, lo.koleo_weight)


def build_schedules(cfg: TrainConfig) -> Schedules:
    """All hyper-parameter schedules for the run (lr scaled by the global batch)."""
    o, lo = cfg.optim, cfg.loss
    return Schedules(o.iterations, o.batch_size * dist.world_size(), o.base_lr, o.min_lr, o.warmup_iters,
                     o.weight_decay, o.weight_decay_end, o.momentum_teacher, o.momentum_teacher_end,
                     lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_iters,
                     cfg.head.freeze_last_layer_iters)


def build_batches(cfg: TrainConfig) -> BatchBuilder:
    """Deterministic per-iteration batch builder for this rank."""
    c, mk = cfg.crops, cfg.mask
    augment = MultiCropAugment(c.global_size, c.local_size, c.n_local, tuple(c.global_scale),
                               tuple(c.local_scale), tuple(c.blur_probs), c.solarize_prob)
    spec = BatchSpec(cfg.seed, cfg.optim.batch_size, dist.world_size(), dist.rank(), cfg.optim.iterations,
                     cfg.model.patch_size, c.global_size, c.local_size, c.high_res_global_size,
                     c.high_res_local_size, c.high_res_iters, mk.sample_probability, mk.ratio_min,
                     mk.ratio_max, mk.min_block_patches, mk.min_aspect, cfg.data.max_decode_retries)
    return BatchBuilder(build_index(cfg.data.source, cfg.data.path), augment, spec)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step(model: SSLMetaArch, optimizer, batch: dict, sched: dict[str, float], cfg: TrainConfig,
          device: torch.device) -> dict[str, float]:
    """One optimisation step; raises TrainingDiverged on a non-finite loss or gradient."""
    it = batch["iteration"]
    # As the official schedule: during the freeze the prototype layers get lr 0 (their gradients
    # still enter the clip norm and AdamW's moments), so they do not move.
    for g in optimizer.param_groups:
        frozen = g["is_last_layer"] and sched["last_layer_frozen"]
        g["lr"] = 0.0 if frozen else sched["lr"] * g["lr_mult"]
        g["weight_decay"] = sched["wd"] * g["wd_mult"]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, terms = model.forward_loss(batch, sched["teacher_temp"])
    if not math.isfinite(float(loss.detach())):
        raise TrainingDiverged(f"non-finite loss at iteration {it}: {terms}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dist.world_size() > 1:
        for p in model.student.parameters():
            if p.grad is not None:
                dist.all_reduce_sum_(p.grad).div_(dist.world_size())
    norms = {}
    for name, module in model.student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad))
    if not all(math.isfinite(v) for v in norms.values()):
        raise TrainingDiverged(f"non-finite gradient norm at iteration {it}: {norms}")
    optimizer.step()
    model.update_teacher(sched["momentum"])
    return {"loss": float(loss.detach()), **{f"{k}_loss": v for k, v in terms.items()},
            **{f"grad_norm_{k}": v for k, v in norms.items()}}


def _checkpoint(cfg: TrainConfig, model: SSLMetaArch, optimizer, next_iter: int, decode_errors: int,
                global_size: int) -> None:
    state = {
        "iteration": next_iter,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "data": {"seed": cfg.seed, "next_iteration": next_iter, "decode_errors": decode_errors},
        "config": to_yaml(cfg),
        "arch": model.arch,
        "eval_size": cfg.eval_size or global_size,
    }
    save_checkpoint(cfg.output_dir, state)
    save_backbone(os.path.join(cfg.output_dir, TEACHER_BACKBONE), model.teacher["backbone"], model.arch,
                  cfg.eval_size or global_size)


def train(cfg: TrainConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) training to `cfg.optim.iterations`; returns a summary of the run.

    `stop_at` ends this process early at that iteration (after a checkpoint), e.g. to simulate preemption.
    """
    device = _device(cfg.device)
    _maybe_init_distributed(device)
    is_main = dist.rank() == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(device)
    model.train()
    optimizer = build_optimizer(model.student, model.arch["depth"], cfg.optim.layerwise_decay,
                                cfg.optim.patch_embed_lr_mult, (cfg.optim.beta1, cfg.optim.beta2))
    schedules = build_schedules(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    start, decode_errors = 0, 0
    ckpt_path = find_checkpoint(cfg.output_dir) if cfg.resume else None
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, decode_errors = ckpt["iteration"], ckpt["data"]["decode_errors"]
    if is_main:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    builder = build_batches(cfg)
    total = cfg.optim.iterations
    end = total if stop_at is None else min(stop_at, total)
    loader = make_loader(builder, start, end, cfg.data.num_workers, cfg.seed)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc="train")
    metrics_path = os.path.join(cfg.output_dir, METRICS)
    history: list[dict[str, float]] = []
    t_last, n_since = time.perf_counter(), 0
    images_per_iter = cfg.optim.batch_size * dist.world_size()
    for batch in loader:
        it = batch["iteration"]
        decode_errors += batch["decode_errors"]
        sched = schedules.at(it)
        out = _step(model, optimizer, _to_device(batch, device), sched, cfg, device)
        n_since += 1
        record = {"iteration": it, **out, "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                  "teacher_temp": sched["teacher_temp"], "decode_errors": decode_errors}
        history.append(record)
        bar.update(1)
        if is_main and ((it + 1) % cfg.log_every == 0 or it + 1 == total):
            now = time.perf_counter()
            record["images_per_s"] = images_per_iter * n_since / max(now - t_last, 1e-9)
            t_last, n_since = now, 0
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{sched['lr']:.2e}")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if is_main and ((it + 1) % cfg.checkpoint_every == 0 or it + 1 == end):
            _checkpoint(cfg, model, optimizer, it + 1, decode_errors, builder.spec.crop_sizes(it)[0])
    bar.close()
    return {"iterations": end, "start_iteration": start, "history": history, "decode_errors": decode_errors,
            "model": model}
