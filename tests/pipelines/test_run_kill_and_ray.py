"""`curate run` as a whole: SIGKILL at several points then a rerun, and the Ray executor (a local
Ray and a simulated 2-node cluster), all giving the curated shards of an uninterrupted local run."""

import random
import shutil
import time
from pathlib import Path

import pytest

from pipelines.synth import write_pool
from pipelines.config import load_config
from pipelines.run import run_pipeline
from tests.pipelines.test_kill_resume import _curate, _kill_after

pytestmark = pytest.mark.slow

CONFIG = """
ingest:
  sources: [{raw}]
  part_size: 60
  workers: 2
embed:
  model: "pixels:12"
  num_workers: 0
  batch_size: 16
dedup:
  threshold: 0.95
  k: 8
cluster:
  levels:
    - {{n_clusters: 12, n_iters: 8, resampling_steps: 1, sample_size: 4}}
    - {{n_clusters: 3, n_iters: 8}}
balance:
  target: 120
shards:
  select: "balance:selected"
  max_count: 25
"""


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*")) if p.name.endswith((".tar", ".parquet"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runall")
    write_pool(str(root / "raw"), 220, seed=3)
    (root / "c.yaml").write_text(CONFIG.format(raw=root / "raw"))
    cfg = load_config(root / "c.yaml", [f"workdir={root / 'ref'}"])
    t0 = time.time()
    run_pipeline(cfg)
    return root, _shards(root / "ref" / "shards"), time.time() - t0


def test_sigkill_at_several_points_of_curate_run(setup, cli_env):
    root, reference, _ = setup
    assert sum(1 for n in reference if n.endswith(".tar")) == 5
    args = ["run", str(root / "c.yaml")]
    t0 = time.time()
    proc = _curate([*args, f"workdir={root / 'timing'}"], cli_env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    full = time.time() - t0
    rng = random.Random(11)
    kills = 0
    for point in (0.2, 0.4, 0.6, 0.8):
        work = root / f"killed{point}"
        kills += _kill_after(_curate([*args, f"workdir={work}"], cli_env), full * point * rng.uniform(0.9, 1.1))
        proc = _curate([*args, f"workdir={work}"], cli_env)
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
        assert _shards(work / "shards") == reference, f"killed at {point}"
        shutil.rmtree(work)
    assert kills >= 3


def test_ray_local_and_two_node_cluster_give_the_local_shards(setup):
    import ray
    from ray.cluster_utils import Cluster

    root, reference, _ = setup
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        run_pipeline(load_config(root / "c.yaml", [f"workdir={root / 'ray'}", "executor=ray"]))
    finally:
        ray.shutdown()
    assert _shards(root / "ray" / "shards") == reference
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        run_pipeline(load_config(root / "c.yaml", [f"workdir={root / 'ray2'}", "executor=ray",
                                                    f"ray_address={cluster.address}"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert _shards(root / "ray2" / "shards") == reference


def test_embedding_survives_losing_a_worker_node_mid_stage(setup):
    """Three simulated nodes; once the first part is back, the node of a busy actor is removed: its
    part goes back to the queue and the embeddings equal the local run's, byte for byte."""
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from curate.embed import EmbedSettings
    from pipelines.executors import ray_embed
    from pipelines.stages.embed import embed_jobs

    root, _, _ = setup
    cfg = load_config(root / "c.yaml", [f"workdir={root / 'ref'}"])
    jobs = embed_jobs(cfg)
    settings = {**EmbedSettings(batch_size=16, num_workers=0).__dict__}
    ref = {int(p.stem.split("-")[1]): np.load(p) for p in (root / "ref" / "embed" / "pixels-12").glob("part-*.npy")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        got = {}
        removed = False
        for k, vecs, errs in ray_embed("pixels:12", settings, jobs, str(root / "ref" / "ingest"), actors=3,
                                       address=cluster.address):
            got[k] = vecs
            if not removed:
                cluster.remove_node(workers[0])
                removed = True
        assert removed and sorted(got) == sorted(ref)
        for k in ref:
            assert np.array_equal(got[k], ref[k]), k
    finally:
        ray.shutdown()
        cluster.shutdown()
