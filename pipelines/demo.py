"""`curate demo`: generate a labelled, long-tailed web-like pool offline, then curate it with
configs/demo.yaml, train the tiny ViT on the curated shards and evaluate it with k-NN, all through
`curate run` on the local executor; verify the shards and print what each step did."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.config import EvalSetConfig, load_config
from pipelines.run import run_pipeline, stopped_early
from pipelines.synth_pool import write_labelled_pool
from pipelines.ui import print_summary

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def class_balance(labels: list[int], n_classes: int) -> dict:
    """Class entropy normalised by ln(n_classes) (1 = uniform; an absent class counts), max/min
    class ratio over the classes present, and how many classes are absent."""
    counts = np.array(sorted(Counter(labels).values()), dtype=float)
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(n_classes)) if n_classes > 1 else 1.0
    return {"images": int(counts.sum()), "entropy": round(entropy, 3), "max_min": round(counts[-1] / counts[0], 1),
            "absent": n_classes - len(counts)}


def _balance_summary(root: Path, work: Path) -> str:
    labels = json.loads((root / "labels.json").read_text())
    index = pq.read_table(work / "shards" / "index.parquet", columns=["uri"]).column("uri").to_pylist()
    curated = [labels[Path(u).name] for u in index if Path(u).name in labels]
    pool = list(labels.values())
    rng = np.random.default_rng(0)
    random = [pool[i] for i in rng.choice(len(pool), min(len(curated), len(pool)), replace=False)]
    n = len(set(pool))
    rows = {"pool": class_balance(pool, n), "random subset": class_balance(random, n),
            "curated": class_balance(curated, n)}
    lines = [f"[balance] {n} classes (labels never shown to the pipeline; entropy / ln {n})"]
    lines += [f"  {k:<14} {v['images']:>6,} images  entropy {v['entropy']:.3f}  max/min {v['max_min']:>5}"
              + (f"  ({v['absent']} classes absent)" if v["absent"] else "") for k, v in rows.items()]
    return "\n".join(lines)


def run_demo(workdir: str | None, pool_size: int, seed: int = 0, train_iters: int = 0) -> int:
    """Generate the pool (once), run every stage, train and evaluate; returns an exit code."""
    started = time.time()
    root = Path(workdir) if workdir else Path.cwd() / time.strftime("demo-%Y%m%d-%H%M%S")
    marker = root / "raw.done"
    if not marker.exists():
        print(f"demo: generating a labelled raw pool of {pool_size:,} images (+ copies, junk, leaked "
              f"evaluation images) in {root / 'raw'}", file=sys.stderr)
        planted = write_labelled_pool(root, pool_size, seed=seed)
        marker.write_text(json.dumps(planted))
    else:
        planted = json.loads(marker.read_text())
    work = root / "work"
    cfg = load_config(DEMO_CONFIG if DEMO_CONFIG.exists() else None,
                      [f"workdir={work}", f"balance.target={max(1, pool_size // 2)}"])
    cfg.ingest.sources = [str(root / "raw")]
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="benchmark", source=str(root / "eval"))]
    if train_iters > 0:
        cfg.train.config, cfg.train.output_dir = "tiny", str(root / "train")
        cfg.train.eval_train, cfg.train.eval_test = str(root / "eval" / "train"), str(root / "eval" / "test")
        cfg.train.overrides = [
            f"optim.iterations={train_iters}", "optim.batch_size=32", f"checkpoint_every={max(1, train_iters // 2)}",
            "progress=false", "data.num_workers=0", f"optim.warmup_iters={max(1, train_iters // 10)}",
            f"loss.warmup_teacher_temp_iters={max(1, train_iters // 3)}",
            f"head.freeze_last_layer_iters={max(0, train_iters // 10)}"]
        print(f"demo: the tiny ViT trains for {train_iters} iterations on the curated shards at the end", file=sys.stderr)
    results = run_pipeline(cfg)
    if stopped_early(results):
        print_summary(results, started)
        return 2
    print(f"demo pool: {root}  (planted: {', '.join(f'{k} {v}' for k, v in planted.items())})")
    print_summary(results, started)
    from curate.shards import verify_shards

    shards = next(r for r in results if r.stage == "shards")
    report = verify_shards(shards.outputs["shards"])
    print(f"[verify] {report.shards} shards, {report.samples:,} samples: {'OK' if report.ok else report.errors[:5]}")
    print(_balance_summary(root, work))
    ev = next((r for r in results if r.stage == "evaluate"), None)
    if ev is not None:
        knn = ", ".join(f"k={k[4:]}: {v:.3f}" for k, v in ev.counts.items() if k.startswith("knn@"))
        print(f"[eval] k-NN accuracy on the labelled evaluation set: {knn}; linear probe {ev.counts['linear']:.3f}")
    html = next((r.outputs.get("html") for r in results if r.stage == "report"), None)
    print(f"[report] {html}\ntotal {time.time() - started:.0f}s")
    return 0 if report.ok else 1
