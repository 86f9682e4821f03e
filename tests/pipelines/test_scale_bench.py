"""bench/scale.py at a small size: every stage runs in its own process on the generated workdir and
the records each stage reads are the ones the stage before it kept."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_runs_every_stage_and_counts_add_up(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--records", "6000", "--part-size",
                           "1000", "--work", str(tmp_path)], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = out["stages"]
    assert list(stages) == ["generate_ingest", "hashdedup", "generate_embed", "dedup", "cluster", "balance",
                            "shard_plan"]
    assert out["mismatches"] == []
    c = {s: v["counts"] for s, v in stages.items()}
    assert c["generate_ingest"]["in"] == 6000 and c["generate_ingest"]["parts"] == 6
    assert c["hashdedup"]["in"] == c["generate_ingest"]["out"] and c["hashdedup"]["dropped"]  # planted copies found
    assert c["generate_embed"]["in"] == c["hashdedup"]["out"] == c["dedup"]["in"]
    assert c["dedup"]["dropped"]["copy_duplicate"] > 0 and c["cluster"]["in"] == c["dedup"]["out"]
    assert c["balance"]["in"] == c["cluster"]["out"] and c["balance"]["out"] == 3000
    assert c["shard_plan"]["in"] == c["shard_plan"]["out"] == 3000
    assert all(v["peak_rss_mb"] > 50 and v["seconds"] > 0 for v in stages.values())
