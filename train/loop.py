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
from train.models import build_backbone, resolve_arch, save_backbone
from train.optim import build_optimizer
from train.schedules import Schedules
from train.ssl_model import SSLMetaArch

TEACHER_BACKBONE = "teacher_backbone.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """Raised when a loss or gradient norm becomes non-finite; the last good checkpoint is untouched."""


def build_model(cfg: TrainConfig) -> SSLMetaArch:
    """Student/teacher model from the config (seeded by the caller); a distillation model when
    `distill.teacher` is set; the backbone starts from `init_weights` when set."""
    if cfg.distill.teacher:
        from train.distill import build_distill_model

        return build_distill_model(cfg)
    model = _build_ssl(cfg)
    if cfg.init_weights:
        from train.export import init_backbones

        init_backbones(model, cfg.init_weights)
    return model


def _build_ssl(cfg: TrainConfig, cls: type = SSLMetaArch, **extra: Any) -> SSLMetaArch:
    m, h, lo = cfg.model, cfg.head, cfg.loss
    arch = resolve_arch(m.arch, m.patch_size, cfg.crops.global_size, m.reg_tokens, m.init_values,
                        m.drop_path_rate, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                        mlp_ratio=m.mlp_ratio, ffn=m.ffn)
    model = cls(arch, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.ibot_separate_head,
                h.ibot_prototypes, h.ibot_bottleneck_dim, lo.centering, lo.center_momentum, lo.sinkhorn_iterations,
                lo.student_temp, lo.dino_weight, lo.ibot_weight, lo.koleo_weight, **extra)
    if m.init == "xavier":  # the EMA copy (teacher; distillation: student_ema) starts equal to the student
        from train.models import xavier_init_

        xavier_init_(model.student["backbone"])
        ema = getattr(model, "student_ema", model.teacher)
        ema["backbone"].load_state_dict(model.student["backbone"].state_dict())
    return model


def build_schedules(cfg: TrainConfig, global_batch: int = 0) -> Schedules:
    """All hyper-parameter schedules for the run (lr scaled by the global batch)."""
    o, lo = cfg.optim, cfg.loss
    return Schedules(o.iterations, global_batch or o.batch_size * dist.world_size(), o.base_lr, o.min_lr, o.warmup_iters,
                     o.weight_decay, o.weight_decay_end, o.momentum_teacher, o.momentum_teacher_end,
                     lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_iters,
                     cfg.head.freeze_last_layer_iters)


def build_batches(cfg: TrainConfig, per_rank_batch: int = 0) -> BatchBuilder:
    """Deterministic per-iteration batch builder for this rank (its slice of each global batch)."""
    c, mk = cfg.crops, cfg.mask
    augment = MultiCropAugment(c.global_size, c.local_size, c.n_local, tuple(c.global_scale),
                               tuple(c.local_scale), tuple(c.blur_probs), c.solarize_prob)
    spec = BatchSpec(cfg.seed, per_rank_batch or cfg.optim.batch_size, dist.world_size(), dist.rank(), cfg.optim.iterations,
                     cfg.model.patch_size, c.global_size, c.local_size, c.high_res_global_size,
                     c.high_res_local_size, c.high_res_iters, mk.sample_probability, mk.ratio_min,
                     mk.ratio_max, mk.min_block_patches, mk.min_aspect, cfg.data.max_decode_retries)
    return BatchBuilder(build_index(cfg.data.source, cfg.data.path), augment, spec)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip and return the total gradient norm (a DTensor norm under FSDP is made whole)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _step(model: SSLMetaArch, optimizer, batch: dict, sched: dict[str, float], cfg: TrainConfig,
          device: torch.device) -> dict[str, float]:
    """One optimisation step; returns {"skipped": reason} when any rank saw a non-finite loss or
    gradient (decided by all ranks together, so every rank skips or stops alike)."""
    it = batch["iteration"]
    # As the official schedule: during the freeze the prototype layers get lr 0 (their gradients
    # still enter the clip norm and AdamW's moments), so they do not move.
    for g in optimizer.param_groups:
        frozen = g["is_last_layer"] and sched["last_layer_frozen"]
        g["lr"] = 0.0 if frozen else sched["lr"] * g["lr_mult"]
        g["weight_decay"] = sched["wd"] * g["wd_mult"]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, terms = model.forward_loss(batch, sched["teacher_temp"])
    optimizer.zero_grad(set_to_none=True)
    if dist.any_rank(not math.isfinite(float(loss.detach())), device):
        return {"skipped": f"non-finite loss at iteration {it}: {terms}"}
    loss.backward()
    norms = {}
    for name, module in model.student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            norms[name] = _grad_norm(params, cfg.optim.clip_grad)
    if dist.any_rank(not all(math.isfinite(v) for v in norms.values()), device):
        optimizer.zero_grad(set_to_none=True)
        return {"skipped": f"non-finite gradient norm at iteration {it}: {norms}"}
    optimizer.step()
    model.update_teacher(sched["momentum"])
    keys = list(terms)
    means = dist.mean_over_ranks([float(loss.detach())] + [terms[k] for k in keys], device)
    return {"loss": means[0], **{f"{k}_loss": v for k, v in zip(keys, means[1:])},
            **{f"grad_norm_{k}": v for k, v in norms.items()}}


def _export_backbone_sd(model: SSLMetaArch, full_sd: dict) -> dict:
    """The exported backbone's weights from the full model state dict (teacher, or student EMA)."""
    prefix = getattr(model, "export_prefix", "teacher.backbone.")
    return {k[len(prefix):]: v for k, v in full_sd.items() if k.startswith(prefix)}


def _checkpoint(cfg: TrainConfig, model: SSLMetaArch, optimizer, next_iter: int, decode_errors: int,
                global_size: int, global_batch: int) -> None:
    """World-size-free checkpoint (full state dicts, every rank's RNG); collective, rank 0 writes."""
    model_sd, optim_sd = dist.full_state(model, optimizer)
    rngs = dist.gather_objects(rng_state())
    if dist.rank() != 0:
        return
    state = {
        "iteration": next_iter,
        "model": model_sd,
        "optimizer": optim_sd,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "world_size": len(rngs),
        "global_batch_size": global_batch,
        "data": {"seed": cfg.seed, "next_iteration": next_iter, "decode_errors": decode_errors},
        "config": to_yaml(cfg),
        "arch": model.arch,
        "eval_size": cfg.eval_size or global_size,
    }
    save_checkpoint(cfg.output_dir, state)
    export_arch = getattr(model, "export_arch", model.arch)
    with torch.random.fork_rng(devices=[]):  # building a module draws init values: keep the run's RNG
        backbone = build_backbone(dict(export_arch, drop_path_rate=0.0))
    backbone.load_state_dict(_export_backbone_sd(model, model_sd))
    save_backbone(os.path.join(cfg.output_dir, TEACHER_BACKBONE), backbone, export_arch,
                  cfg.eval_size or global_size)


def resolve_global_batch(cfg: TrainConfig, world: int, ckpt: dict | None) -> int:
    """Images per iteration over all ranks: the setting, else the resumed checkpoint's, else batch x world."""
    saved = int(ckpt.get("global_batch_size", 0)) if ckpt else 0
    g = cfg.dist.global_batch_size or saved or cfg.optim.batch_size * world
    if saved and g != saved:
        raise ValueError(f"{cfg.output_dir} was trained with a global batch of {saved}, the config asks for {g}; "
                         f"set dist.global_batch_size={saved} or use a new output_dir")
    if g % world:
        raise ValueError(f"global batch {g} does not split over {world} processes")
    return g


def _seed_rank(seed: int, rank: int, *extra: int) -> None:
    """Per-rank RNG streams (distinct drop-path masks per rank, deterministic)."""
    s = dist.rank_seed(seed, rank, *extra)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _restore(model: SSLMetaArch, optimizer, ckpt: dict, seed: int) -> None:
    """Load model/optimizer state and this rank's RNG (a rank the checkpoint did not have is seeded)."""
    first = ckpt["optimizer"].get("param_groups", [{}])[0].get("params", [""])
    if first and isinstance(first[0], int):  # an optimizer.state_dict() (older single-process checkpoint)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        dist.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    states = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if dist.rank() < len(states):
        set_rng_state(states[dist.rank()])
    else:
        _seed_rank(seed, dist.rank(), int(ckpt["iteration"]))


def train(cfg: TrainConfig, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) training to `cfg.optim.iterations`; returns a summary of the run.

    Under torchrun (WORLD_SIZE > 1) it joins the process group; the global batch, schedules and
    data stream do not depend on the number of processes. `stop_at` ends this process early at
    that iteration (after a checkpoint), e.g. to simulate preemption.
    """
    device = dist.setup(cfg.device, cfg.dist.backend)
    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(device)
    model.train()
    os.makedirs(cfg.output_dir, exist_ok=True)
    dist.barrier()
    ckpt_path = find_checkpoint(cfg.output_dir) if cfg.resume else None
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    global_batch = resolve_global_batch(cfg, world, ckpt)
    dist.wrap_model(model, cfg.dist.strategy, device, cfg.dist.activation_checkpointing)
    optimizer = build_optimizer(model.student, model.arch["depth"], cfg.optim.layerwise_decay,
                                cfg.optim.patch_embed_lr_mult, (cfg.optim.beta1, cfg.optim.beta2))
    schedules = build_schedules(cfg, global_batch)
    start, decode_errors = 0, 0
    if ckpt is not None:
        _restore(model, optimizer, ckpt, cfg.seed)
        start, decode_errors = ckpt["iteration"], ckpt["data"]["decode_errors"]
        del ckpt
    else:
        _seed_rank(cfg.seed, rank)
    if is_main:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    builder = build_batches(cfg, global_batch // world)
    total = cfg.optim.iterations
    end = total if stop_at is None else min(stop_at, total)
    loader = make_loader(builder, start, end, cfg.data.num_workers, cfg.seed)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc="train")
    metrics_path = os.path.join(cfg.output_dir, METRICS)
    history: list[dict[str, float]] = []
    t_last, n_since, skips = time.perf_counter(), 0, 0
    for batch in loader:
        it = batch["iteration"]
        decode_errors += batch["decode_errors"]
        sched = schedules.at(it)
        out = _step(model, optimizer, _to_device(batch, device), sched, cfg, device)
        if "skipped" in out:
            skips += 1
            if cfg.dist.nonfinite == "stop" or skips > cfg.dist.max_skips:
                raise TrainingDiverged(out["skipped"])
            if is_main:
                print(f"skipped step: {out['skipped']}", flush=True)
        else:
            skips = 0
            n_since += 1
            record = {"iteration": it, **out, "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
                      "teacher_temp": sched["teacher_temp"], "decode_errors": decode_errors}
            history.append(record)
            if is_main and ((it + 1) % cfg.log_every == 0 or it + 1 == total):
                now = time.perf_counter()
                record["images_per_s"] = global_batch * n_since / max(now - t_last, 1e-9)
                t_last, n_since = now, 0
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{sched['lr']:.2e}")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        bar.update(1)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == end:
            _checkpoint(cfg, model, optimizer, it + 1, decode_errors, builder.spec.crop_sizes(it)[0], global_batch)
    bar.close()
    dist.barrier()
    return {"iterations": end, "start_iteration": start, "history": history, "decode_errors": decode_errors,
            "model": model, "global_batch_size": global_batch, "world_size": world}
