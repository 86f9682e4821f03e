"""torch.distributed for the trainer: process group setup, per-rank seeds, collective decisions,
DDP / FSDP2 wrapping, full (world-size-free) state dicts and a local multi-process launcher.

Every helper degrades to a single-process no-op when no process group is initialised.
"""
from __future__ import annotations

import importlib
import os
import socket
from typing import Any, Callable

import torch
from torch import nn


def is_enabled() -> bool:
    """True when a process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_enabled() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's LOCAL_RANK), 0 by default."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; identity when single-process."""
    if is_enabled():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def setup(device_name: str = "auto", backend: str = "auto") -> torch.device:
    """The device of this rank; joins the process group when launched with WORLD_SIZE > 1.

    CUDA ranks use cuda:LOCAL_RANK (set as the current device before NCCL starts); CPU ranks use gloo.
    """
    if device_name == "auto":
        device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_enabled():
        import torch.distributed as dist

        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return device


def cleanup() -> None:
    """Leave the process group (if this process joined one)."""
    if is_enabled():
        import torch.distributed as dist

        dist.destroy_process_group()


def rank_seed(seed: int, rank_: int, *extra: int) -> int:
    """A deterministic 31-bit seed for (seed, rank, ...): distinct streams per rank."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank_, *extra]).generate_state(1)[0] & 0x7FFFFFFF)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (all-reduce MAX)."""
    if not is_enabled():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean of a list of floats over ranks (equal per-rank batches: the global-batch mean)."""
    if not is_enabled():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    all_reduce_sum_(t)
    return (t / world_size()).tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list when single-process)."""
    if not is_enabled():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for all ranks."""
    if is_enabled():
        import torch.distributed as dist

        dist.barrier()


def _checkpoint_blocks(backbone: nn.Module) -> None:
    """Activation checkpointing: each transformer block recomputes its activations in backward."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    def run(fwd: Callable, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(fwd, *args, use_reentrant=False, **kwargs)
        return fwd(*args, **kwargs)

    for blk in backbone.vit.blocks:
        blk.forward = partial(run, blk.forward)


def _fully_shard_tree(tree: nn.ModuleDict, mp_policy: Any) -> None:
    """FSDP2: one shard group per transformer block, per backbone remainder and per head."""
    from torch.distributed.fsdp import fully_shard

    for name, module in tree.items():
        if name == "backbone":
            for blk in module.vit.blocks:
                fully_shard(blk, mp_policy=mp_policy, reshard_after_forward=True)
        fully_shard(module, mp_policy=mp_policy, reshard_after_forward=True)


def wrap_model(model: nn.Module, strategy: str, device: torch.device, activation_checkpointing: bool = False) -> None:
    """Make the SSL model multi-process: DDP on the student step, or FSDP2 on student and teacher.

    DDP: the student forward runs through DistributedDataParallel(StudentRunner) (bucketed, overlapped
    gradient all-reduce). FSDP2: student and teacher are sharded alike (so the EMA runs on local
    shards), with bf16 parameters and fp32 gradient reduction on CUDA. Single process: plain modules.
    """
    from train.ssl_model import StudentRunner

    if activation_checkpointing:
        _checkpoint_blocks(model.student["backbone"])
    runner = StudentRunner(model.student, model.ibot_key)
    if strategy == "fsdp" and is_enabled():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
        _fully_shard_tree(model.student, mp)
        _fully_shard_tree(model.teacher, mp)
        if hasattr(model, "student_ema"):  # distillation: the EMA must be sharded like the student
            _fully_shard_tree(model.student_ema, mp)
        fully_shard(runner, mp_policy=mp, reshard_after_forward=True)
        model.set_student_runner(runner)
    elif is_enabled():
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model.set_student_runner(DistributedDataParallel(runner, device_ids=ids))
    else:
        model.set_student_runner(runner)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded CPU (model, optimizer) state dicts keyed by parameter names: the same for any world
    size or strategy (a collective under FSDP; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load what `full_state` produced into a (possibly sharded) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    # set_optimizer_state_dict turns tuple hyper-parameters (AdamW's betas) into lists: the same
    # values, but the next checkpoint would not be byte-identical to an uninterrupted run's.
    for group, saved in zip(optimizer.param_groups, optim_sd.get("param_groups", [])):
        for key, value in saved.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(local: int, target: str, nproc: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    module, name = target.split(":")
    code = getattr(importlib.import_module(module), name)(*args)
    cleanup()
    # Leave without interpreter finalization: a gloo worker thread still holding a finished work's
    # tensors can abort a rank there ("terminate called without an active exception", about 1 run in
    # 10 here) after all its results are written. Exceptions still go through spawn's error queue.
    import gc
    import sys

    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def launch(target: str, nproc: int, *args: Any) -> int:
    """Run `module:function(*args)` in `nproc` spawned local ranks (torchrun's env, 127.0.0.1, a free
    port); returns 0, or the first non-zero exit code of a rank."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_worker, args=(target, nproc, free_port(), args), nprocs=nproc, join=True)
    except mp.ProcessExitedException as e:
        return int(e.exit_code or 1)
    except mp.ProcessRaisedException as e:
        first = str(e).strip().splitlines()
        raise RuntimeError(f"a training rank failed: {first[-1] if first else e}") from None
    return 0
