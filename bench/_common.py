"""Shared helpers of the benchmarks: repo on sys.path, a synthetic folder, JSON output."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_folder(root: Path, n: int, size: tuple[int, int] = (128, 96), seed: int = 0) -> list[Path]:
    """n distinct JPEGs under root (reused when already there)."""
    from pipelines.synth import encode, make_image

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"{i // 1000:04d}" / f"{i:07d}.jpg"
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(encode(make_image(seed * 10_000_019 + i, size), "JPEG", quality=85))
        paths.append(p)
    return paths


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its largest waited-for child), MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def emit(name: str, **figures: object) -> None:
    """Print one JSON line with the benchmark's figures and the machine."""
    print(json.dumps({"bench": name, "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M"), **figures}))
