"""`curate plan`: every enabled stage estimated, what cannot fit refused with the key named, and the
linear stages linear in the number of records."""

import pytest

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.plan import COSTS, Cluster, PlanRefused, _phash_shared_s, plan

PAPER = Cluster(nodes=20, gpus_per_node=8, cpus_per_node=96, mem_per_node_gb=1024)
PAPER_ARGS = ["--records", "1200000000", "--nodes", "20", "--gpus-per-node", "8", "--cpus-per-node", "96",
              "--mem-per-node", "1024", "--dim", "copy=512"]


def _stages(plans):
    return [p.stage for p in plans]


def test_plan_has_every_enabled_stage_and_its_figures():
    cfg = load_config("configs/demo.yaml")
    plans = plan(cfg, 10_000, Cluster(cpus_per_node=2, mem_per_node_gb=24))
    assert _stages(plans) == ["ingest", "hashdedup", "embed", "dedup", "cluster", "balance", "shards"]
    assert all(p.seconds > 0 and p.mem_process > 0 and p.mem_node >= p.mem_process and p.disk > 0 for p in plans)
    with_eval = load_config("configs/demo.yaml", ["decontaminate.eval_sets=[{name: val, source: /x}]"])
    assert "decontaminate" in _stages(plan(with_eval, 10_000, Cluster()))
    assert _stages(plan(load_config("configs/demo.yaml", ["balance.target=0", "dedup.threshold=1"]), 10_000,
                        Cluster())) == ["ingest", "hashdedup", "embed", "shards"]
    assert all(c.source for c in COSTS.values())
    assert any(c.source.startswith("ASSUMPTION") for k, c in COSTS.items() if k.startswith(("embed_gpu", "gpu")))


def test_paper_scale_recipe_fits_20_nodes_and_cli_prints_it(capsys):
    plans = plan(load_config("configs/lvd142m.yaml"), 1_200_000_000, PAPER, {"copy": 512})
    assert _stages(plans) == ["ingest", "hashdedup", "embed", "dedup", "cluster", "balance", "shards"]
    assert max(p.mem_node for p in plans) <= PAPER.mem
    assert plans[-1].records == 142_000_000
    assert main(["plan", "configs/lvd142m.yaml", *PAPER_ARGS]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{s} " in out for s in _stages(plans)) and "ASSUMPTION" not in out and "assumptions" in out


@pytest.mark.parametrize("override, key", [
    ("dedup.index=ivf_flat", "dedup.index"),  # ~1B x 512 float32 in one process: ~2 TB
    ("cluster.levels=[{n_clusters: 10000000, n_iters: 5, split: 100000}]", "cluster.levels[0].split_assign"),
    ("cluster.levels=[{n_clusters: 2000000, n_iters: 5}]", "cluster.levels[0].n_clusters"),
])
def test_a_config_that_cannot_fit_is_refused_naming_the_key(override, key, capsys):
    cfg = load_config("configs/lvd142m.yaml", [override])
    with pytest.raises(PlanRefused, match=key.replace("[", r"\[").replace("]", r"\]")):
        plan(cfg, 1_200_000_000, PAPER, {"copy": 512})
    assert main(["plan", "configs/lvd142m.yaml", override, *PAPER_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and "GB per node" in err


def test_lloyd_pass_tasks_count_their_gpus_and_their_gpu_memory():
    """With executor ray the passes of every level are Ray tasks, cluster.ray_gpus_per_task GPUs each: more tasks
    per GPU read more chunks at once (fewer hours), until their centroid indexes outgrow a GPU (refused)."""
    def cluster_plan(*overrides, cl=PAPER):
        cfg = load_config("configs/lvd142m.yaml", list(overrides))
        return next(p for p in plan(cfg, 1_200_000_000, cl, {"copy": 512}) if p.stage == "cluster")

    shared, one, on_cpus = (cluster_plan(f"cluster.ray_gpus_per_task={g}") for g in (0.125, 1, 0))
    assert shared.seconds < one.seconds < on_cpus.seconds
    assert "every Lloyd pass as Ray tasks (160 GPU(s))" in " ".join(shared.notes)
    assert "every Lloyd pass as Ray tasks (1920 core(s))" in " ".join(on_cpus.notes)
    assert "on the driver (8 GPU(s))" in " ".join(cluster_plan("executor=local").notes)
    big = Cluster(nodes=20, gpus_per_node=8, cpus_per_node=96, mem_per_node_gb=4096)
    level = "cluster.levels=[{n_clusters: 10000000, n_iters: 5, split: 100000}]"  # every point against 10M: 41 GB
    assert cluster_plan(level, "cluster.ray_gpus_per_task=1", cl=big).seconds > 0
    with pytest.raises(PlanRefused, match=r"cluster.ray_gpus_per_task: 4 Lloyd-pass task\(s\) per GPU"):
        cluster_plan(level, "cluster.ray_gpus_per_task=0.25", cl=big)


def test_linear_stages_scale_linearly_and_clustering_does_not():
    cfg = load_config("configs/lvd142m.yaml")
    small, big = (plan(cfg, n, PAPER, {"copy": 512}) for n in (300_000_000, 1_200_000_000))
    for a, b in zip(small, big):
        if a.stage in ("ingest", "hashdedup", "embed", "balance"):
            assert b.disk == pytest.approx(4 * a.disk, rel=1e-3), a.stage
            if a.stage == "hashdedup":  # a pHash band's search per record grows with the records sharing its
                # field value (quadratic past the 9.8M records the rates were measured on), and the bucket jobs
                # (fixed size) run side by side: more of them, same time
                assert 4 * a.seconds < b.seconds < 16 * a.seconds
                assert _phash_shared_s(9.8e6, 4) == 0 < _phash_shared_s(1e8, 4)
                assert _phash_shared_s(1.2e9, 4) - _phash_shared_s(1.2e8, 4) == pytest.approx(
                    COSTS["phash_shared_s"].value * 1.08e9 * (4 / 2**13 + 1 / 2**12))  # 4 fields of 13 bits, one 12
            else:
                assert b.seconds == pytest.approx(4 * a.seconds, rel=1e-3), a.stage
    assert big[-1].seconds == small[-1].seconds  # the same 142M selected from either pool
    cl = {p.stage: p for p in small}["cluster"], {p.stage: p for p in big}["cluster"]
    assert cl[1].seconds != pytest.approx(4 * cl[0].seconds, rel=0.01)  # levels above 1 do not grow with N


def test_decontamination_memory_follows_the_evaluation_sets_not_the_pool():
    """The pool streams through an index of the evaluation sets: memory per process is the same at 100M and
    1.2B records and grows with --eval-images; the time grows with the pool (flat search below 200,000
    evaluation images, IVF above, so more evaluation images can take less time)."""
    cfg = load_config("configs/lvd142m.yaml", ["decontaminate.eval_sets=[{name: val, source: /x}]"])

    def decon(records, eval_images):
        return next(p for p in plan(cfg, records, PAPER, {"copy": 512}, eval_images) if p.stage == "decontaminate")

    small, large, more_eval = decon(100_000_000, 100_000), decon(1_200_000_000, 100_000), decon(100_000_000, 2_000_000)
    assert small.mem_process == large.mem_process < more_eval.mem_process < 16 * 2**30
    assert large.seconds == pytest.approx(12 * small.seconds, rel=0.01)
    assert "flat index of 100,000" in small.notes[0] and "ivf_flat index of 2,000,000" in more_eval.notes[0]
    assert "100,000 evaluation images" in small.notes[0] and "streams" in small.notes[0]


def test_kmeans_plusplus_shards_spread_the_seeding_over_the_cluster():
    """Level 2's seeding (k = 500k over a 4M sample) on 20 actors takes ~1/20 of the driver's time plus the
    actors' round trips on CPU nodes, its FLOPs on 20 GPUs plus the round trips on GPU nodes; on the local
    executor, or with one shard, it stays on the driver."""
    import math
    from dataclasses import replace

    from pipelines.plan_kmeans import init_sample_rows, pp_seconds, pp_sharded

    cfg = load_config("configs/lvd142m.yaml")
    assert cfg.cluster.pp_shard_rows == 200_000
    driver = pp_seconds(10_000_000, 500_000, 1024, PAPER)
    trips = 500_000 * COSTS["pp_ray_step_s"].value
    cpus = replace(PAPER, gpus_per_node=0)
    assert pp_sharded(10_000_000, 500_000, 1024, cpus, cfg) == pytest.approx(driver / 20 + trips)
    flops = 2.0 * init_sample_rows(10_000_000, 500_000) * 1024 * 500_000 * (3 + math.log(500_000))
    on_gpus = pp_sharded(10_000_000, 500_000, 1024, PAPER, cfg)
    assert on_gpus == pytest.approx(flops / (20 * COSTS["gpu_flops"].value) + trips) and on_gpus < trips * 1.1
    one = load_config("configs/lvd142m.yaml", ["cluster.pp_shard_rows=4000000"])
    local = load_config("configs/lvd142m.yaml", ["executor=local"])
    assert pp_sharded(10_000_000, 500_000, 1024, PAPER, one) == driver
    assert pp_sharded(10_000_000, 500_000, 1024, PAPER, local) == driver
    times = {p.stage: p.seconds for p in plan(cfg, 1_200_000_000, PAPER, {"copy": 512})}
    assert times["cluster"] < 2 * 86400  # 10.4 days while every seeding ran on the driver


def test_ingest_hash_dedup_and_shards_spread_over_the_nodes_with_executor_ray():
    """The three run as Ray tasks with executor ray (one per part, banded map/reduce, one per shard): the plan
    counts every node; with the local executor they stay on one machine."""
    ray_cfg = load_config("configs/lvd142m.yaml")
    local_cfg = load_config("configs/lvd142m.yaml", ["executor=local"])
    on_ray = {p.stage: p for p in plan(ray_cfg, 1_200_000_000, PAPER, {"copy": 512})}
    local = {p.stage: p for p in plan(local_cfg, 1_200_000_000, PAPER, {"copy": 512})}
    for stage in ("ingest", "hashdedup", "shards"):
        assert on_ray[stage].where == "cluster" and local[stage].where in ("node", "driver"), stage
        assert on_ray[stage].seconds < local[stage].seconds / 5, stage
    # downloads over 20 nodes' links instead of one: 120 TB at 25 GB/s, and one call a part to the name holders
    calls = 1_200_000_000 / ray_cfg.ingest.part_size * COSTS["ray_call_s"].value
    assert on_ray["ingest"].seconds == pytest.approx(on_ray["ingest"].network / (20 * COSTS["net_bytes_s"].value)
                                                     + calls)
    # the planner's names on 20 actors (one per node), none on the driver; all of them in the local planner
    names = 1_200_000_000 * COSTS["ingest_plan_bytes"].value
    assert on_ray["ingest"].mem_process == pytest.approx(COSTS["base_rss"].value + names / 20)
    assert local["ingest"].mem_process == pytest.approx(COSTS["ingest_rss"].value + names)
    # hash dedup's largest process is a band task or a bucket job, whatever the pool: no driver grows with it
    half = {p.stage: p for p in plan(ray_cfg, 600_000_000, PAPER, {"copy": 512})}["hashdedup"]
    assert on_ray["hashdedup"].mem_process == half.mem_process < 2**30


def test_local_verification_is_estimated_and_refused_where_its_jobs_cannot_fit():
    """dedup.verify local runs as jobs (pipelines.copy_verify): the plan counts the brute-force pHash search
    over all 2n hashes (n^2 over its jobs), the verified pairs (n), the index per node and the candidates
    exchanged, keeps the driver at O(parts), and refuses where a cap or search job cannot fit one per core."""
    from curate.hashing import brute_force_seconds

    def dedup(records, mem=1024, verify="local", bucket=2_000_000):
        cfg = load_config("configs/lvd142m.yaml", [f"dedup.verify={verify}", f"dedup.bucket_records={bucket}"])
        cl = Cluster(nodes=20, gpus_per_node=8, cpus_per_node=96, mem_per_node_gb=mem)
        return next(p for p in plan(cfg, records, cl, {"copy": 512}) if p.stage == "dedup")

    small, large, none = dedup(100_000_000), dedup(1_200_000_000), dedup(1_200_000_000, verify="none")
    search_s = brute_force_seconds((2 * large.records) ** 2, 1920)  # every core busy: 7,393 search jobs
    assert 6 * 86400 < search_s < large.seconds < 14 * 86400
    assert large.seconds > 100 * none.seconds and large.network > none.network > 0  # candidates exchanged too
    assert small.seconds < large.seconds / 20
    assert large.mem_process == none.mem_process  # the index holders; the jobs hold 5.6 GB each, the driver little
    assert "local verification by jobs (tasks)" in large.notes[-1] and "7,393 job(s)" in large.notes[-1]
    with pytest.raises(PlanRefused, match="dedup.verify local: a cap or search job"):
        dedup(1_200_000_000, mem=512)
    with pytest.raises(PlanRefused, match="dedup.verify local: a cap or search job"):
        dedup(1_200_000_000, bucket=4_000_000)  # 11.5 GB, over 1024 GB / 96 cores
