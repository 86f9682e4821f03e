"""Every stage on Ray vs the local executor: `curate run` on the same generated pool twice (local,
then `executor: ray` on a local Ray), seconds per stage side by side, and whether every file of
every stage is byte-identical.

    python bench/ray_stages.py [--pool 300] [--cpus 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit

CONFIG = """
ingest: {{sources: [{raw}], part_size: 60, workers: {cpus}}}
embed: {{model: "pixels:12", num_workers: 0, batch_size: 16}}
dedup: {{threshold: 0.95, k: 8}}
cluster:
  levels:
    - {{n_clusters: 12, n_iters: 8, resampling_steps: 1, sample_size: 4}}
    - {{n_clusters: 3, n_iters: 8}}
balance: {{target: {target}}}
shards: {{select: "balance:selected", max_count: 25}}
"""


def _files(work: Path) -> dict[str, bytes]:
    skip = {"_MANIFEST.json", "_STARTED.json"}
    return {str(p.relative_to(work)): p.read_bytes() for s in ("ingest", "hashdedup", "embed", "dedup", "cluster",
                                                               "balance", "shards")
            for p in sorted((work / s).rglob("*")) if p.is_file() and p.name not in skip}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=300, help="images in the generated pool (before copies and junk)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray, and local ingest workers")
    args = ap.parse_args()
    import ray

    from pipelines.config import load_config
    from pipelines.run import run_pipeline
    from pipelines.synth import write_pool

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_stages_"))
    write_pool(str(tmp / "raw"), args.pool, seed=3)
    (tmp / "c.yaml").write_text(CONFIG.format(raw=tmp / "raw", cpus=args.cpus, target=args.pool // 2))
    seconds = {}
    for name in ("local", "ray"):
        over = [f"workdir={tmp / name}"]
        t0 = time.perf_counter()
        if name == "ray":
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
            over.append("executor=ray")
        start = time.perf_counter() - t0
        results = run_pipeline(load_config(tmp / "c.yaml", over))
        seconds[name] = {"total": round(time.perf_counter() - t0, 2), "ray_start": round(start, 2),
                         **{r.stage: round(r.seconds, 2) for r in results}}
    ray.shutdown()
    ref, got = _files(tmp / "local"), _files(tmp / "ray")
    identical = sorted(ref) == sorted(got) and all(ref[k] == got[k] for k in ref)
    records = sum(1 for _ in (tmp / "raw").rglob("*") if _.is_file())
    emit("ray_stages", inputs=records, seconds=seconds, files=len(ref), identical=identical,
         ratio_total=round(seconds["ray"]["total"] / seconds["local"]["total"], 2))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
