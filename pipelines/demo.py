"""`curate demo`: generate a raw pool offline and run the pipeline on it on the local executor.

The pipeline is configs/demo.yaml through `curate run` (+ a verify of the shards).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from curate.synth import write_pool
from pipelines.cli import print_summary
from pipelines.config import load_config
from pipelines.run import run_pipeline

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(workdir: str | None, pool_size: int, seed: int = 0) -> int:
    """Generate the pool (once), run every stage, print the summary; returns an exit code."""
    started = time.time()
    root = Path(workdir) if workdir else Path.cwd() / time.strftime("demo-%Y%m%d-%H%M%S")
    raw = root / "raw"
    marker = root / "raw.done"
    if not marker.exists():
        print(f"demo: generating a raw pool of {pool_size:,} images (+ copies and junk) in {raw}", file=sys.stderr)
        planted = write_pool(str(raw), pool_size, seed)
        marker.write_text(json.dumps(planted))
    else:
        planted = json.loads(marker.read_text())
    cfg = load_config(DEMO_CONFIG if DEMO_CONFIG.exists() else None, [f"workdir={root / 'work'}"])
    cfg.ingest.sources = [str(raw)]
    results = run_pipeline(cfg)
    print(f"demo pool: {root}  (planted: {', '.join(f'{k} {v}' for k, v in planted.items())})")
    print_summary(results, started)
    from curate.shards import verify_shards

    shards = next(r for r in results if r.stage == "shards")
    report = verify_shards(shards.outputs["shards"])
    print(f"[verify] {report.shards} shards, {report.samples:,} samples: {'OK' if report.ok else report.errors[:5]}")
    return 0 if report.ok else 1
