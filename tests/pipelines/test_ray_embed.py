"""The embed stage on Ray (a local Ray, and a simulated 2-node cluster) equals the local executor."""

from pathlib import Path

import numpy as np
import pytest

from pipelines.synth import encode, make_image
from pipelines.config import load_config
from pipelines.embedding import embedding_dir
from pipelines.stages.embed import run_one as run_embed
from pipelines.stages.hashdedup import run as run_hashdedup
from pipelines.stages.ingest import run as run_ingest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayembed")
    raw = tmp / "raw"
    raw.mkdir()
    for i in range(40):
        (raw / f"{i:03d}.jpg").write_bytes(encode(make_image(900 + i, (72, 64)), "JPEG"))
    cfg = load_config(None, [f"workdir={tmp / 'w'}", "ingest.part_size=8", "ingest.workers=1"])
    cfg.ingest.sources = [str(raw)]
    run_ingest(cfg)
    run_hashdedup(cfg)
    cfg.embed.model, cfg.embed.num_workers, cfg.embed.name = "pixels:8", 0, "local"
    run_embed(cfg)
    return cfg


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("part-*"))}


def _run_on_ray(cfg, name, address):
    import ray

    cfg.executor, cfg.ray_address, cfg.embed.name = "ray", address, name
    try:
        run_embed(cfg)
    finally:
        ray.shutdown()
        cfg.executor, cfg.ray_address = "local", None


def test_local_ray_gives_identical_parts(workdir):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    _run_on_ray(workdir, "ray-local", None)
    local = _files(embedding_dir(workdir, "local"))
    assert len(local) == 10 and _files(embedding_dir(workdir, "ray-local")) == local


def test_simulated_two_node_cluster_gives_identical_parts(workdir):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        _run_on_ray(workdir, "ray-cluster", cluster.address)
    finally:
        cluster.shutdown()
    local = _files(embedding_dir(workdir, "local"))
    assert _files(embedding_dir(workdir, "ray-cluster")) == local
    ids = np.concatenate([np.load(p) for p in sorted(embedding_dir(workdir, "ray-cluster").glob("*.npy"))])
    assert ids.shape == (40, 192)


def test_kmeans_lloyd_passes_on_ray_give_the_local_clusters(workdir):
    import ray

    from curate.parts import read_table
    from pipelines.stages.cluster import run as run_cluster
    from pipelines.config import LevelConfig

    workdir.cluster.embedding = "local"
    workdir.cluster.levels = [LevelConfig(6, n_iters=4, resampling_steps=1, sample_size=3), LevelConfig(2, n_iters=3)]
    run_cluster(workdir)
    local = read_table(f"{workdir.workdir}/cluster")
    centroids = np.load(f"{workdir.workdir}/cluster/centroids_l1.npy")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    workdir.executor = "ray"
    try:
        run_cluster(workdir, force=True)
    finally:
        ray.shutdown()
        workdir.executor = "local"
    assert read_table(f"{workdir.workdir}/cluster").equals(local)
    assert np.array_equal(np.load(f"{workdir.workdir}/cluster/centroids_l1.npy"), centroids)


def test_copy_dedup_queries_on_ray_give_the_local_groups(workdir):
    import ray

    from pipelines.stages.dedup import run as run_dedup

    workdir.dedup.embedding, workdir.dedup.threshold, workdir.dedup.k = "local", 0.5, 8
    workdir.dedup.verify = "none"  # the cosine k-NN graph is what Ray spreads
    workdir.dedup.max_removed_share = 1.0  # cosine 0.5 on pixels removes 35% of this pool, past the refusal
    run_dedup(workdir)
    local = _files(Path(workdir.workdir) / "dedup")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    workdir.executor = "ray"
    try:
        res = run_dedup(workdir, force=True)
    finally:
        ray.shutdown()
        workdir.executor = "local"
    assert res.counts["pairs"] > 0  # the threshold links some images, so the equality below means something
    assert _files(Path(workdir.workdir) / "dedup") == local  # byte-identical parts (NaN-safe)
