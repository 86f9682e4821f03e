"""Crash consistency of `curate run`: SIGKILL at random points, rerun, compare with a clean run.

Drives the CLI only by subprocess (`python -m pipelines.cli run CONFIG workdir=...`), so it checks
what a user gets. A small labelled pool and a config modelled on configs/demo.yaml (ingest in 2
worker processes; `--executor ray`: `executor: ray`, each run starting its own local Ray;
`--train-iters N`: a tiny-ViT `train:` section checkpointing every 5 iterations) are written under
--root. After an uninterrupted reference run, each of --points kill times is drawn uniformly over
the reference duration; the workdir is killed there (SIGKILL of the driver alone; a run that ends
first is redone, up to twice, with the point scaled to its own duration), rerun to the end and
compared: curated shards, shard index, every stage's record parts and embeddings byte for
byte, counts that reconcile and, with training, last.pt / last_good.pt / teacher_backbone.pt byte
for byte and tensor by tensor, metrics.jsonl's iterations and values. Every run uses the same
workdir path (the reference is moved aside), so paths stored in checkpoints match.

Orphans: every run carries CHAOS_RUN=<tag> in its environment, inherited by its workers and by
the Ray processes it starts (raylet, gcs_server, workers); a live process (not a zombie) with the
tag after the kill is the run's. Non-Ray ones alive 1 s after the kill are `orphans` (a failure).
Ray ones are followed until gone (`ray_gone_seconds`); those alive --ray-grace s after the kill
are `ray_late_processes`, a failure for the raylet, GCS or workers (`ray_late_core`), reported
for Ray's node agents, which outlive the raylet ~60 s; any alive --ray-wait s after the last
run are killed and counted (`ray_never_gone`, a failure). One JSON line reports it.

    python bench/chaos.py [--points 50] [--pool 300] [--seed 0] [--root /tmp/chaos]
                          [--executor local|ray] [--train-iters 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from _common import ROOT, emit

CONFIG = """
executor: {executor}
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
CHECKPOINT_EVERY = 5
TRAIN = """
train:
  config: tiny
  overrides: [optim.iterations={iters}, checkpoint_every={every}, log_every=1, progress=false,
              data.num_workers=0, optim.batch_size=8, optim.warmup_iters=5, model.depth=2, model.embed_dim=48,
              head.prototypes=256, head.ibot_prototypes=256, head.hidden_dim=64, head.bottleneck_dim=32,
              head.freeze_last_layer_iters=5, loss.warmup_teacher_temp_iters=10, crops.n_local=2]
"""
CHECKPOINTS = ("last.pt", "last_good.pt", "teacher_backbone.pt")
SKIP = {"_MANIFEST.json", "_STARTED.json"}  # hold timestamps
ORPHANS: list[int] = []  # killed runs that left a non-Ray process alive 1 s after the kill
LEFT_AFTER_EXIT: list[int] = []  # completed runs that left a process of theirs alive


def outputs(work: Path) -> dict[str, bytes]:
    """Everything a run promises to reproduce: shards, index, record parts, embeddings, checkpoints."""
    found = {}
    for p in sorted(work.rglob("*")):
        if not p.is_file() or p.name in SKIP or "/_" in f"/{p.relative_to(work)}":
            continue
        rel = str(p.relative_to(work))
        if rel.startswith("shards/") or p.name.startswith("part-") or rel in {f"train/{c}" for c in CHECKPOINTS}:
            found[rel] = p.read_bytes()
    return found


def files(work: Path) -> set[str]:
    """Every file of a workdir but manifests, locks and scratch (for stray leftovers of a kill)."""
    return {str(p.relative_to(work)) for p in work.rglob("*")
            if p.is_file() and p.name not in SKIP and "/_" not in f"/{p.relative_to(work)}"
            and not p.name.endswith(".lock")}


def flat(obj, prefix: str = "") -> dict:
    """Nested dicts/lists of a checkpoint as {path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):  # a list and a tuple of the same values differ, as in the bytes
        left, right = "[]" if isinstance(obj, list) else "()"
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{left}{i}{right}").items()}
    return {prefix: obj}


def tensors_differ(a: Path, b: Path) -> list[str]:
    """Leaves (tensors exactly: dtype, shape, values; plain data by ==) that differ between two checkpoints."""
    import torch

    fa, fb = (flat(torch.load(p, map_location="cpu", weights_only=True)) for p in (a, b))
    diff = sorted(set(fa) ^ set(fb))
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
        else:
            same = x == y
        if not same:
            diff.append(k)
    return diff


def metrics(work: Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl records (cut lines dropped) and the problems of their order."""
    path = work / "train" / "metrics.jsonl"
    records, problems = [], []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            problems.append(f"metrics.jsonl: cut line {line[:40]!r}")
    its = [r["iteration"] for r in records]
    for prev, it in itertools.pairwise(its):
        # a resumed run logs again from its checkpoint: a step back must land on one
        if it != prev + 1 and not (it <= prev and it % CHECKPOINT_EVERY == 0):
            problems.append(f"metrics.jsonl: iteration {it} after {prev}")
    return records, problems


def compare_training(work: Path, ref: Path, ref_metrics: list[dict], iters: int) -> list[str]:
    """Checkpoint tensors and the logged iterations of a resumed run against the reference."""
    problems = []
    for name in CHECKPOINTS:
        a, b = work / "train" / name, ref / "train" / name
        if not a.exists():
            problems.append(f"train/{name} missing")
            continue
        diff = tensors_differ(a, b)
        if diff:
            problems.append(f"train/{name}: {len(diff)} entries differ, e.g. {diff[:3]}")
    records, problems_order = metrics(work)
    problems += problems_order
    last = {r["iteration"]: r for r in records}  # the resumed run's value of each iteration
    if sorted(last) != list(range(iters)):
        problems.append(f"metrics.jsonl: iterations {sorted(set(range(iters)) - set(last))[:5]} missing")
    timing = {"images_per_s"}
    for r in ref_metrics:
        got = last.get(r["iteration"])
        if got is not None and {k: v for k, v in got.items() if k not in timing} != \
                {k: v for k, v in r.items() if k not in timing}:
            problems.append(f"metrics.jsonl: iteration {r['iteration']} logged other values")
            break
    # every logged iteration, the repeated ones too, must equal the reference's values
    for r in records:
        want = ref_metrics[r["iteration"]] if r["iteration"] < len(ref_metrics) else None
        if want is None or r["loss"] != want["loss"]:
            problems.append(f"metrics.jsonl: iteration {r['iteration']} (a repeated one) logged loss {r['loss']}")
            break
    return problems


def reconcile(work: Path, n_inputs: int, iters: int = 0) -> list[str]:
    """Counts that must add up: one record per input in every stage, index = selection, iterations."""
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
    if iters:
        import torch

        for name, want in (("last.pt", iters), ("last_good.pt", (iters - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY)):
            got = torch.load(work / "train" / name, map_location="cpu", weights_only=True)["iteration"]
            if got != want:
                problems.append(f"train/{name} at iteration {got}, not {want}")
    return problems


def stage_at(work: Path, stages: list[str]) -> str:
    """The first enabled stage not finished (manifest; report.json; train: none): where a kill landed."""
    for name in stages:
        d = work / name
        done = (d / "_MANIFEST.json").exists() or any(d.glob("*/_MANIFEST.json")) or (d / "report.json").exists()
        if not done:
            return name
    return "done"


def tagged() -> dict[str, list[tuple[int, str]]]:
    """{tag: [(pid, name)]} of live, non-zombie processes whose environment holds CHAOS_RUN=tag."""
    import psutil

    found: dict[str, list[tuple[int, str]]] = {}
    for proc in psutil.process_iter(["status", "name", "cmdline"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, psutil.Error):
            continue
        for item in env:
            if item.startswith(b"CHAOS_RUN="):
                cmd = " ".join(proc.info["cmdline"] or [])
                name = (cmd.split()[0].rsplit("/", 1)[-1] if cmd.startswith("ray::") or "ray/" not in cmd
                        else next((w.rsplit("/", 1)[-1] for w in cmd.split() if "ray/" in w), proc.info["name"]))
                found.setdefault(item[10:].decode(), []).append((proc.pid, name))
    return found


def is_ray(name: str) -> bool:
    return name.startswith("ray::") or name in RAY_NAMES


# Ray's node agents: they notice the raylet's death at once but then hang ~60 s reporting it to the
# dead GCS (Ray's gcs_rpc_server_reconnect_timeout_s); reported apart from the raylet, GCS and workers.
RAY_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent", "agent.py", "main.py"}
RAY_NAMES = {"raylet", "gcs_server", "monitor.py", "dashboard.py", "log_monitor.py", "agent.py", "main.py",
             "default_worker.py", "setup_worker.py"}


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayWatch(threading.Thread):
    """Follows the Ray processes of killed runs until they are gone: how long each run's outlive
    their driver, and which are still alive `grace` s after the kill."""

    def __init__(self, grace: float) -> None:
        super().__init__(daemon=True)
        self.grace, self.pending, self.lock = grace, {}, threading.Lock()
        self.gone: list[float] = []  # seconds from the kill until the run's last Ray process was gone
        self.late: list[str] = []  # tags with a Ray process alive `grace` s after the kill
        self.late_names: Counter = Counter()  # those processes, by name

    def add(self, tag: str, killed_at: float) -> None:
        with self.lock:
            self.pending[tag] = killed_at

    def run(self) -> None:
        while True:
            time.sleep(0.25)
            with self.lock:
                if self.pending:
                    self.poll()

    def poll(self) -> None:
        alive, now = tagged(), time.time()
        for tag, killed_at in list(self.pending.items()):
            left = [(pid, name) for pid, name in alive.get(tag, []) if is_ray(name)]
            if not left:
                self.gone.append(now - killed_at)
                del self.pending[tag]
            elif now - killed_at >= self.grace and tag not in self.late:
                self.late.append(tag)
                self.late_names.update(name for _, name in left)

    def finish(self, wait: float) -> int:
        """Wait up to `wait` s for the rest to go; kill what is left; returns how many runs that was."""
        deadline = time.time() + wait
        while time.time() < deadline and self.pending:
            time.sleep(0.5)
        with self.lock:
            alive = tagged()
            _kill([pid for tag in self.pending for pid, _ in alive.get(tag, [])])
            return len(self.pending)


def run(config: Path, work: Path, env: dict, kill_after: float | None = None,
        watch: RayWatch | None = None) -> tuple[int, float]:
    """Run `curate run`; SIGKILL the driver after `kill_after` s. Returns (rc or -9, seconds)."""
    tag = uuid.uuid4().hex
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config), f"workdir={work}"],
                            cwd=ROOT, env={**env, "CHAOS_RUN": tag}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 3600)
    except subprocess.TimeoutExpired:
        proc.kill()  # the driver only: its workers must die with it
        killed_at = time.time()
        proc.communicate()
        if watch is not None:
            watch.add(tag, killed_at)
        time.sleep(1.0)
        left = [pid for pid, name in tagged().get(tag, []) if not is_ray(name)]
        if left:
            ORPHANS.append(proc.pid)
            _kill(left)
        return -9, killed_at - start
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
    seconds = time.time() - start
    for _ in range(20):  # a clean exit must not leave anything behind either (5 s to shut down)
        time.sleep(0.25)
        left = tagged().get(tag, [])
        if not left:
            break
    else:
        LEFT_AFTER_EXIT.append(proc.pid)
        _kill([pid for pid, _ in left])
    return proc.returncode, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="/tmp/chaos")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--train-iters", type=int, default=0, help="tiny-ViT training iterations (0 = no train stage)")
    ap.add_argument("--ray-grace", type=float, default=5.0, help="seconds Ray processes may outlive a killed driver")
    ap.add_argument("--ray-wait", type=float, default=180.0, help="seconds to wait at the end for the rest to go")
    args = ap.parse_args()
    if 0 < args.train_iters <= CHECKPOINT_EVERY:
        sys.exit(f"--train-iters must be above {CHECKPOINT_EVERY} (last_good.pt is compared too)")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.framework import enabled
    from pipelines.run import STAGES
    from pipelines.synth_pool import write_labelled_pool

    write_labelled_pool(root / "pool", args.pool, seed=args.seed, eval_per_class=(1, 1))
    n_inputs = sum(1 for p in (root / "pool" / "raw").iterdir() if p.is_file())
    config = root / "chaos.yaml"
    text = CONFIG.format(raw=root / "pool" / "raw", target=max(1, args.pool // 2), executor=args.executor)
    if args.train_iters:
        text += TRAIN.format(iters=args.train_iters, every=CHECKPOINT_EVERY)
    config.write_text(text)
    stages = [s for s in STAGES if enabled(load_config(config), s)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    work, ref = root / "work", root / "ref"  # one workdir path for every run: stored paths match

    rc, full = run(config, work, env)
    if rc != 0:
        sys.exit(f"reference run failed (rc {rc})")
    work.rename(ref)
    reference, ref_files = outputs(ref), files(ref)
    problems = [f"reference: {p}" for p in reconcile(ref, n_inputs, args.train_iters)]
    ref_metrics, order = metrics(ref) if args.train_iters else ([], [])
    problems += [f"reference: {p}" for p in order]
    if args.train_iters and [r["iteration"] for r in ref_metrics] != list(range(args.train_iters)):
        problems.append("reference: metrics.jsonl does not log every iteration once")
    rng = random.Random(args.seed)
    watch = RayWatch(args.ray_grace)
    watch.start()
    points = sorted(rng.uniform(0.02, 0.98) for _ in range(args.points))
    killed = identical = 0
    landed: Counter = Counter()
    stray: Counter = Counter()
    rerun_seconds = []
    for point in points:
        duration = full
        for _ in range(3):  # a run faster than the reference can end before its kill time: retry the
            # point on a fresh workdir, scaled to the duration just seen, so the load cannot void a point
            rc, seconds = run(config, work, env, kill_after=duration * point,
                              watch=watch if args.executor == "ray" else None)
            if rc == -9:
                break
            duration = seconds
            shutil.rmtree(work)
        killed += rc == -9
        at = stage_at(work, stages) if rc == -9 else "done"
        landed[at] += 1
        rc, seconds = run(config, work, env)
        rerun_seconds.append(seconds)
        got = outputs(work)
        where = f"point {point:.3f} [{at}]"
        if rc != 0:
            problems.append(f"{where}: rerun failed (rc {rc})")
        else:
            if got != reference:
                diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
                problems.append(f"{where}: {len(diff)} files differ, e.g. {diff[:3]}")
            else:
                identical += 1
            problems += [f"{where}: {p}" for p in reconcile(work, n_inputs, args.train_iters)]
            if args.train_iters:
                problems += [f"{where}: {p}" for p in compare_training(work, ref, ref_metrics, args.train_iters)]
        for extra in files(work) - ref_files:
            stray[re.sub(r"\d+", "N", extra)] += 1
        shutil.rmtree(work)
    never_gone = watch.finish(args.ray_wait)
    late_core = sum(n for name, n in watch.late_names.items() if name not in RAY_AGENTS)
    emit("chaos", points=args.points, pool=args.pool, inputs=n_inputs, seed=args.seed, executor=args.executor,
         train_iters=args.train_iters, reference_seconds=round(full, 1), killed=killed,
         killed_in=dict(landed), identical=identical,
         mean_rerun_seconds=round(sum(rerun_seconds) / max(1, len(rerun_seconds)), 1),
         files_compared=len(reference),
         compared=sorted(k for k in reference if k.startswith("train/")), orphans=len(ORPHANS), left_after_exit=len(LEFT_AFTER_EXIT),
         ray_late=len(watch.late), ray_late_processes=dict(watch.late_names), ray_late_core=late_core,
         ray_gone_seconds=sorted(round(g, 1) for g in watch.gone), ray_never_gone=never_gone,
         stray_files=dict(stray), problems=problems[:20])
    sys.exit(1 if problems or ORPHANS or LEFT_AFTER_EXIT or never_gone or late_core else 0)


if __name__ == "__main__":
    main()
