"""cluster -> balance -> shards through the stage runners: exact target, tree paths in the shard
metadata, seed-set retrieval with the seed recorded."""

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from curate.parts import read_table
from pipelines.synth import encode, make_image, reencode, resized
from pipelines.cli import main
from pipelines.config import LevelConfig, SeedSetConfig, load_config
from pipelines.run import run_pipeline


@pytest.fixture
def cfg(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(90):
        (raw / f"{i:03d}.png").write_bytes(encode(make_image(3000 + i, (64, 64)), "PNG"))
    c = load_config(None, [f"workdir={tmp_path / 'w'}", "ingest.workers=1", "ingest.part_size=40",
                           "embed.num_workers=0", "embed.model=pixels:8", "balance.target=30",
                           "shards.select=balance:selected", "dedup.threshold=1.0"])
    c.ingest.sources = [str(raw)]
    c.cluster.levels = [LevelConfig(9, n_iters=5), LevelConfig(3, n_iters=5)]
    return c


def test_balance_meets_the_target_and_shards_carry_the_tree_path(cfg, tmp_path):
    cfg.balance.levels = "all"  # the whole tree, whatever its structure
    results = {r.stage: r for r in run_pipeline(cfg)}
    assert results["balance"].counts["out"] == 30 and results["balance"].counts["shortfall"] == 0
    bal = read_table(tmp_path / "w" / "balance").to_pylist()
    assert sum(1 for r in bal if r["selected"]) == 30 and len(bal) == 90
    clusters = read_table(tmp_path / "w" / "cluster").to_pylist()
    assert all(r["cluster_l1"] is not None and 0 <= r["cluster_l2"] < 3 for r in clusters)
    assert len(np.load(tmp_path / "w" / "cluster" / "centroids_l1.npy")) == 9
    metas = []
    for shard in sorted((tmp_path / "w" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            metas += [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    chosen = {r["id"]: r for r in bal if r["selected"]}
    assert {m["id"] for m in metas} == set(chosen)
    by_id = {r["id"]: r for r in clusters}
    for m in metas:
        assert m["cluster_l1"] == by_id[m["id"]]["cluster_l1"] and m["selected_by"].startswith("l2:")
    # a rerun skips every stage
    assert all(r.skipped for r in run_pipeline(cfg) if r.stage != "report")  # the report is always rewritten


def test_balance_only_picks_images_that_survive_copy_dedup(cfg, tmp_path):
    cfg.dedup.threshold = 0.75  # pixel features: this merges many distinct images, on purpose,
    cfg.dedup.verify = "none"  # by the cosine alone,
    cfg.dedup.max_component_share = cfg.dedup.max_removed_share = 1.0  # past the refusal limits
    results = {r.stage: r for r in run_pipeline(cfg)}
    dropped = results["dedup"].counts["dropped"]["copy_duplicate"]
    assert dropped > 0 and results["cluster"].counts["in"] == 90 - dropped
    assert results["balance"].counts["out"] == results["shards"].counts["out"] == 30


def test_seed_retrieval_finds_the_edited_copies(cfg, tmp_path):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i in (5, 17, 60):
        (seeds / f"s{i}.jpg").write_bytes(reencode(resized(make_image(3000 + i, (64, 64)), 1.2), 85))
    cfg.balance.target = 0
    cfg.balance.seed_cluster_max = 0  # force sample-based retrieval
    cfg.balance.seeds = [SeedSetConfig(name="museum", source=str(seeds), n_per_seed=1)]
    run_pipeline(cfg)
    ing = {r["id"]: r["uri"] for r in read_table(tmp_path / "w" / "ingest").to_pylist()}
    got = {ing[r["id"]].rsplit("/", 1)[1]: r for r in read_table(tmp_path / "w" / "balance").to_pylist()
           if r["selected"]}
    assert set(got) == {"005.png", "017.png", "060.png"}
    assert all(r["seed_set"] == "museum" and r["seed_sim"] > 0.9 for r in got.values())
    assert len(pq.read_table(tmp_path / "w" / "shards" / "index.parquet")) == 3


def test_cluster_and_balance_commands(cfg, tmp_path, capsys):
    cfg.balance.target = 0
    run_pipeline(cfg, until="embed")
    w = str(tmp_path / "w")
    assert main(["cluster", "--workdir", w, "--levels", "6,2", "--iters", "3"]) == 0
    assert "levels 6/2" in capsys.readouterr().out
    assert main(["balance", "--workdir", w, "--target", "200"]) == 0
    out = capsys.readouterr().out
    assert "in 90  ->  out 90" in out and "shortfall 110" in out


def test_multiplier_repeats_reach_the_shards(cfg, tmp_path):
    cfg.balance.target, cfg.balance.multiplier = 150, 2  # more than the 90 images: some repeat
    results = {r.stage: r for r in run_pipeline(cfg)}
    assert results["balance"].counts["shortfall"] == 0
    # records in and out of the shards stage reconcile with balance; the repeats are samples
    shards = results["shards"].counts
    assert shards["in"] == shards["out"] == results["balance"].counts["out"] and shards["samples"] == 150
    report = json.loads((tmp_path / "w" / "report" / "report.json").read_text())
    assert report["funnel"]["reconcile"]["ok"], report["funnel"]
    index = pq.read_table(tmp_path / "w" / "shards" / "index.parquet").to_pylist()
    assert len(index) == 150 and len({r["key"] for r in index}) == 150
    assert all(r["key"] == r["id"] or r["key"].startswith(r["id"] + "_r") for r in index)
    assert max(sum(1 for r in index if r["id"] == x["id"]) for x in index) == 2


def test_balance_levels_auto_goes_over_the_structured_levels_only(cfg, tmp_path):
    from curate.balance import structured_levels
    from pipelines.run import run_stage

    cfg.cluster.levels = [LevelConfig(12, n_iters=5), LevelConfig(4, n_iters=5), LevelConfig(2, n_iters=5)]
    results = {r.stage: r for r in run_pipeline(cfg, until="balance")}
    cluster = tmp_path / "w" / "cluster"
    want = structured_levels([np.load(cluster / f"centroids_l{lv}.npy") for lv in (1, 2, 3)])
    manifest = json.loads((tmp_path / "w" / "balance" / "_MANIFEST.json").read_text())
    assert manifest["config"]["report"]["levels_balanced"] == want
    assert any(n.startswith(f"balanced over cluster levels 1..{want} of 3") for n in results["balance"].notes) == (want < 3)

    def top_levels() -> set[str]:
        return {r["selected_by"].split(":")[0] for r in read_table(tmp_path / "w" / "balance").to_pylist()
                if r["selected"]}

    assert top_levels() == {f"l{want}"}  # the sampling starts at the top kept level
    for levels, top in (("all", "l3"), ("1", "l1"), ("2", "l2")):
        cfg.balance.levels = levels
        (res,) = run_stage("balance", cfg, force=True)
        assert res.counts["out"] == 30 and top_levels() == {top}, levels
    cfg.balance.levels = "4"
    with pytest.raises(ValueError, match="levels 1..3"):
        run_stage("balance", cfg, force=True)


STREAMED_LEVELS = [LevelConfig(12, n_iters=4, split=3, resampling_steps=1),
                   LevelConfig(4, n_iters=4, resampling_steps=3, sample_size=2, sampling="r")]


def _whole_array_cluster(cfg, out):
    """The stage as it was computed before it streamed (every label in memory, RowMap.write), as a reference."""
    from curate.kmeans_tree import LevelSpec, hierarchical_kmeans
    from curate.vectors import EmbeddingParts
    from pipelines.aligned import RowMap, embedding_status
    from pipelines.framework import dropped_by

    from pipelines.embedding import resolve_embedding

    w = cfg.workdir
    emb = resolve_embedding(cfg, cfg.cluster.embedding)
    rows = RowMap(f"{w}/ingest", emb)
    keep = ~dropped_by("dedup", rows.column(f"{w}/dedup", "copy_of")).to_numpy(zero_copy_only=False).astype(bool)
    valid = np.flatnonzero(keep[rows.emb_rows] & embedding_status(emb))
    levels = [LevelSpec(**{k: getattr(lv, k) for k in ("n_clusters", "n_iters", "resampling_steps", "sample_size",
                                                      "sampling", "init", "split", "split_assign")})
              for lv in cfg.cluster.levels]
    from curate.kmeans_pp import PlusPlus

    tree = hierarchical_kmeans(EmbeddingParts(emb).subset(valid), levels, seed=cfg.cluster.seed,
                               chunk_size=cfg.cluster.chunk_size, pp=PlusPlus(cfg.cluster.pp_shard_rows))
    paths = tree.paths()
    columns = {f"cluster_l{lv + 1}": (paths[:, lv], pa.int32()) for lv in range(paths.shape[1])}
    columns["cluster_sq_dist"] = (tree.sq_dists, pa.float32())
    out.mkdir()
    rows.write(out, rows.emb_rows[valid], columns)
    for lv, c in enumerate(tree.centroids, start=1):
        np.save(out / f"centroids_l{lv}.npy", c)


def _outputs(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("part-", "centroids_"))}


def test_streamed_stage_writes_the_bytes_of_the_whole_array_computation(cfg, tmp_path, monkeypatch):
    """Labels per chunk on disk (chunks of 16 rows spanning the 40-row parts), parts written one by one: the same
    files as the computation holding every label, with copy-dedup drops and failed embeddings left null."""
    from pipelines.run import run_stage

    cfg.dedup.threshold, cfg.dedup.verify = 0.75, "none"  # many merged (as in the test above), so the clustered
    cfg.dedup.max_component_share = cfg.dedup.max_removed_share = 1.0  # rows are a subset of the parts
    cfg.cluster.levels, cfg.cluster.chunk_size = STREAMED_LEVELS, 16
    cfg.cluster.pp_shard_rows = 32  # level 1's k-means++ over 3 shards: in the process, then as Ray actors
    results = {r.stage: r for r in run_pipeline(cfg, until="cluster")}
    assert results["dedup"].counts["dropped"].get("copy_duplicate", 0) > 0
    _whole_array_cluster(cfg, tmp_path / "ref")
    got = _outputs(tmp_path / "w" / "cluster")
    assert len(got) == 3 + 2 and got == _outputs(tmp_path / "ref")
    assert not (tmp_path / "w" / "cluster" / "_rows").exists()
    assert read_table(tmp_path / "w" / "cluster").column("cluster_l1").null_count == results["dedup"].counts["dropped"][
        "copy_duplicate"]
    ckpt = tmp_path / "w" / "cluster" / "_ckpt"
    assert len(list((ckpt / "assign_l1_step0").glob("labels-*.npy"))) == -(-results["cluster"].counts["out"] // 16)
    from pipelines.stages import cluster

    passes = []  # every level's passes go through the Ray step: level 1 over the parts, level 2 over its points,
    # and level 2's two resampling refits over their samples (2 per cluster, read back from a file by the tasks)
    real = cluster._ray_step_fn
    monkeypatch.setattr(cluster, "_ray_step_fn", lambda v, *a: passes.append(v.n) or real(v, *a))
    gpus, real_gpus = [], cluster.pass_gpus  # a Ray with a (logical) GPU: every pass task asks for one
    monkeypatch.setattr(cluster, "pass_gpus", lambda g: gpus.append(real_gpus(g)) or gpus[-1])
    groups, real_shards = [], cluster.RayShards
    monkeypatch.setattr(cluster, "RayShards", lambda parts, c: groups.append(len(parts)) or real_shards(parts, c))
    cfg.executor = "ray"  # the same stage as Ray tasks (a local Ray): the same bytes
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        run_stage("cluster", cfg, force=True)
        assert real_gpus(0.5) == 0.5 and real_gpus(0) == 0.0  # cluster.ray_gpus_per_task, when set
    finally:  # later tests start Ray their own way
        ray.shutdown()
    assert _outputs(tmp_path / "w" / "cluster") == got and gpus == [1.0] * 4
    assert passes[:2] == [results["cluster"].counts["out"], 12] and len(passes) == 4
    assert all(4 <= m <= 8 for m in passes[2:])
    assert groups == [3]  # level 1's k-means++ on three actors; level 2's (one shard each) on the driver
    cfg.executor = "local"
    [again] = run_stage("cluster", cfg)  # the same settings: the finished stage is reused
    assert again.skipped and again.key == results["cluster"].key
    cfg.cluster.chunk_size = 24  # another chunk layout (level 1's checkpointed labels) is another run
    from pipelines.manifest import StageConflict

    with pytest.raises(StageConflict, match="other settings"):
        run_stage("cluster", cfg)
    [redone] = run_stage("cluster", cfg, force=True)
    assert not redone.skipped and redone.key != again.key and _outputs(tmp_path / "w" / "cluster") == got
    cfg.cluster.pp_shard_rows = 64  # other k-means++ shards draw other centres: another run too
    with pytest.raises(StageConflict, match="other settings"):
        run_stage("cluster", cfg)


def test_a_killed_kmeans_plusplus_actor_restarts_the_seeding_with_the_same_centres():
    """Ray actors hold the shards, each with its share of the cluster's GPUs; one killed (as when its node goes) is
    a ShardLost: fresh actors, the same centres as the shards in the process (no CUDA here: numpy shards)."""
    import ray

    from curate.kmeans import kmeans_plusplus
    from pipelines.stages.cluster import RayShards

    x = np.random.default_rng(2).normal(size=(600, 12)).astype(np.float32)
    want = kmeans_plusplus(x, 25, [0, 1], chunk_size=64, shard_rows=200)
    groups = []

    def first_loses_an_actor(parts, chunk):
        g = RayShards(parts, chunk)
        groups.append(g)
        if len(groups) == 1:
            assert ray.get([a.on_gpu.remote() for a in g.actors]) == [False] * 3
            assert ray.available_resources().get("GPU", 0) == pytest.approx(1 - 3 * 0.3333)  # a third each
            ray.kill(g.actors[1], no_restart=True)
        return g

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        got = kmeans_plusplus(x, 25, [0, 1], chunk_size=64, shard_rows=200, shards=first_loses_an_actor)
        assert len(groups) == 2 and len(groups[1].actors) == 0  # closed after use
        assert got.tobytes() == want.tobytes()
    finally:
        ray.shutdown()


def test_kmeans_plusplus_actors_run_the_loop_themselves_with_the_in_process_centres(monkeypatch):
    """The shard actors run the seeding among themselves (two gloo collectives a step, no call from the driver per
    step): the in-process shards' centres byte for byte, also when every point sits on a centre before k."""
    import ray

    from curate.kmeans import kmeans_plusplus
    from curate.kmeans_pp import ShardLost
    from pipelines.stages.cluster import RayShards

    rng = np.random.default_rng(4)
    spread = rng.normal(size=(700, 10)).astype(np.float32)
    spread[5], spread[5, 0] = 40.0, -0.0  # a far point (drawn first of all), its -0.0 exchanged as itself
    few = np.repeat(rng.normal(size=(6, 10)).astype(np.float32), 50, axis=0)[rng.permutation(300)]  # 6 distinct
    calls = []
    monkeypatch.setattr(RayShards, "score", lambda *a: calls.append("score"))  # the driver never drives a step
    monkeypatch.setattr(RayShards, "advance", lambda *a: calls.append("advance"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        for x, k in ((spread, 30), (few, 9)):
            want = kmeans_plusplus(x, k, [0, 2], chunk_size=64, shard_rows=250)
            got = kmeans_plusplus(x, k, [0, 2], chunk_size=64, shard_rows=250, shards=RayShards)
            assert got.tobytes() == want.tobytes()
            if x is spread:
                assert any(c[0] == 0 and np.signbit(c[0]) for c in got)
        assert len({r.tobytes() for r in got}) == 6 and calls == []
        g = RayShards([spread[:300], spread[300:]], 64)
        ray.kill(g.actors[1], no_restart=True)  # a peer gone before the group forms: ShardLost, not a hang
        with pytest.raises(ShardLost):
            g.seed_all(np.array([0, 300, 700]), 5, 10, np.random.default_rng(0), 3)
        g.close()
    finally:
        ray.shutdown()
