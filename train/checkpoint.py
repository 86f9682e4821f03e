"""Atomic training checkpoints (last + last-good) and RNG-state capture for exact resume.

`last.pt` is the newest checkpoint. When a new one is written, the previous `last.pt` becomes
`last_good.pt`: training has run `checkpoint_every` finite iterations past it, so it is known good.
Only all-finite states are ever written; the NaN guard stops before saving.
Checkpoints hold only tensors and plain data (dicts, lists, str, numbers) and are read with
`torch.load(weights_only=True)`: a file holding any other pickled object is refused, never run.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

LAST = "last.pt"
LAST_GOOD = "last_good.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is not ours: unreadable, or holding objects other than tensors and plain data."""


def rng_state() -> dict[str, Any]:
    """Current torch (CPU and CUDA), numpy and python global RNG states, as tensors and plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(obj: Any) -> bool:
    """True if every floating tensor nested in dicts/lists/tuples is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str, state: dict[str, Any]) -> str:
    """Write `state` as last.pt (rotating the old one to last_good.pt); refuses non-finite states."""
    if not all_finite({k: state[k] for k in ("model", "optimizer") if k in state}):
        raise FloatingPointError("refusing to checkpoint a state with non-finite values")
    os.makedirs(output_dir, exist_ok=True)
    last = os.path.join(output_dir, LAST)
    tmp = last + ".new"
    atomic_save(state, tmp)
    if os.path.exists(last):
        os.replace(last, os.path.join(output_dir, LAST_GOOD))
    os.replace(tmp, last)
    return last


def find_checkpoint(output_dir: str) -> str | None:
    """The checkpoint to resume from: last.pt, else last_good.pt, else None."""
    for name in (LAST, LAST_GOOD):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            return path
    return None


def safe_load(path: str) -> Any:
    """torch.load without arbitrary unpickling (tensors and plain data only); a clear error otherwise."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a dinocurate checkpoint (only tensors and plain data are accepted; "
                              f"pickled objects are refused, not executed): {first}") from None


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a training checkpoint on CPU (weights only); CheckpointError for foreign or old files."""
    state = safe_load(path)
    if not isinstance(state, dict) or not {"model", "optimizer", "iteration", "rng"} <= set(state):
        raise CheckpointError(f"{path}: not a dinocurate training checkpoint (missing model/optimizer/rng)")
    return state
