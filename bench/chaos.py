"""Crash consistency of `curate run`: SIGKILL at random points, rerun, compare with a clean run.

Drives the CLI only by subprocess (`python -m pipelines.cli run CONFIG workdir=...`), so it checks
what a user gets. A small labelled pool and a config modelled on configs/demo.yaml (local
executor, ingest in 2 worker processes) are written under --root. After an uninterrupted
reference run, each of --points kill times is drawn uniformly over the reference duration; a
fresh workdir is killed there (SIGKILL of the driver alone: its workers must die with it; a
process of the run still alive, not a zombie, a second later is an orphan), rerun to the end
and compared: curated shards, shard index, every stage's record parts and embeddings byte for
byte, and counts that reconcile. One JSON line reports the figures.

    python bench/chaos.py [--points 50] [--pool 300] [--seed 0] [--root /tmp/chaos]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, emit

CONFIG = """
ingest:
  sources: [{raw}]
  part_size: 60
  workers: 2
embed:
  model: "pixels:12"
  name: copy
  num_workers: 0
  batch_size: 32
extra_embeds:
  - {{model: "colorhist:4", name: semantic, batch_size: 32}}
dedup:
  embedding: copy
  threshold: 0.98
  k: 8
cluster:
  embedding: semantic
  levels:
    - {{n_clusters: 12, n_iters: 8, resampling_steps: 2, sample_size: 4, sampling: r}}
    - {{n_clusters: 3, n_iters: 8, resampling_steps: 2, sample_size: 2, sampling: r}}
balance:
  target: {target}
shards:
  select: "balance:selected"
  max_count: 25
"""
SKIP = {"_MANIFEST.json", "_STARTED.json"}  # hold timestamps
ORPHANS: list[int] = []  # killed runs that left a process behind for more than a second


def outputs(work: Path) -> dict[str, bytes]:
    """Everything a run promises to reproduce: shards, index, record parts and embeddings."""
    found = {}
    for p in sorted(work.rglob("*")):
        if not p.is_file() or p.name in SKIP or "/_" in f"/{p.relative_to(work)}":
            continue
        rel = str(p.relative_to(work))
        if rel.startswith("shards/") or p.name.startswith("part-"):
            found[rel] = p.read_bytes()
    return found


def reconcile(work: Path, n_inputs: int) -> list[str]:
    """Counts that must add up: one record per input in every stage, index = selection."""
    import pyarrow.parquet as pq

    problems = []
    rows: dict[str, int] = {}
    for stage in sorted(d for d in work.iterdir() if d.is_dir()):
        parts = sorted(stage.glob("part-*.parquet"))
        if parts:
            rows[stage.name] = sum(pq.read_metadata(p).num_rows for p in parts)
    for stage, n in rows.items():
        if n != n_inputs:
            problems.append(f"{stage}: {n} records for {n_inputs} inputs")
    selected = 0
    for p in sorted((work / "balance").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["selected", "repeats"]).to_pylist()
        selected += sum(max(r["repeats"] or 1, 1) for r in t if r["selected"])
    index = pq.read_metadata(work / "shards" / "index.parquet").num_rows
    if index != selected:
        problems.append(f"index has {index} samples, balance selected {selected}")
    return problems


def _group_alive(pgid: int) -> bool:
    """True when a live (not zombie) process of the killed run's process group remains."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def run(config: Path, work: Path, env: dict, kill_after: float | None = None) -> tuple[int, float]:
    """Run `curate run`; SIGKILL its process group after `kill_after` s. Returns (rc or -9, seconds)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config), f"workdir={work}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 3600)
    except subprocess.TimeoutExpired:
        proc.kill()  # the driver only: its workers must die with it
        proc.communicate()
        seconds = time.time() - start
        time.sleep(1.0)
        if _group_alive(proc.pid):
            ORPHANS.append(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
        return -9, seconds
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
    return proc.returncode, time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="/tmp/chaos")
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from pipelines.synth_pool import write_labelled_pool

    write_labelled_pool(root / "pool", args.pool, seed=args.seed, eval_per_class=(1, 1))
    n_inputs = sum(1 for p in (root / "pool" / "raw").iterdir() if p.is_file())
    config = root / "chaos.yaml"
    config.write_text(CONFIG.format(raw=root / "pool" / "raw", target=max(1, args.pool // 2)))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    rc, full = run(config, root / "ref", env)
    if rc != 0:
        sys.exit(f"reference run failed (rc {rc})")
    reference = outputs(root / "ref")
    problems = [f"reference: {p}" for p in reconcile(root / "ref", n_inputs)]
    rng = random.Random(args.seed)
    points = sorted(rng.uniform(0.02, 0.98) for _ in range(args.points))
    killed = identical = 0
    rerun_seconds = []
    for i, point in enumerate(points):
        work = root / f"kill-{i:03d}"
        rc, _ = run(config, work, env, kill_after=full * point)
        killed += rc == -9
        rc, seconds = run(config, work, env)
        rerun_seconds.append(seconds)
        got = outputs(work)
        if rc != 0:
            problems.append(f"point {point:.3f}: rerun failed (rc {rc})")
        elif got != reference:
            diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
            problems.append(f"point {point:.3f}: {len(diff)} files differ, e.g. {diff[:3]}")
        else:
            identical += 1
            problems += [f"point {point:.3f}: {p}" for p in reconcile(work, n_inputs)]
        shutil.rmtree(work)
    emit("chaos", points=args.points, pool=args.pool, inputs=n_inputs, seed=args.seed,
         reference_seconds=round(full, 1), killed=killed, identical=identical,
         mean_rerun_seconds=round(sum(rerun_seconds) / max(1, len(rerun_seconds)), 1),
         files_compared=len(reference), orphans=len(ORPHANS), problems=problems[:20])
    sys.exit(1 if problems or ORPHANS else 0)


if __name__ == "__main__":
    main()
