"""`curate run` as a whole: SIGKILL at several points then a rerun, and the Ray executor (a local
Ray, and simulated 3-node clusters that lose a worker node mid-stage: during ingest tasks, embedding
actors, copy-graph index holders and the groups' bucket jobs), all giving the outputs of an
uninterrupted local run."""

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.synth import write_pool
from pipelines.config import load_config
from pipelines.run import run_pipeline
from tests.conftest import ROOT
from tests.pipelines.test_kill_resume import _curate, _kill_when

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
decontaminate:
  eval_sets: [{{name: bench, source: {ev}}}]
  threshold: 0.9
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
    (root / "ev").mkdir()  # an evaluation set: byte copies of 4 pool images and 3 images of its own
    for src in sorted(p for p in (root / "raw").rglob("*") if p.is_file())[:40:10]:
        shutil.copy(src, root / "ev" / f"copy-{src.name}")
    write_pool(str(root / "ev" / "own"), 3, seed=99)
    (root / "c.yaml").write_text(CONFIG.format(raw=root / "raw", ev=root / "ev"))
    cfg = load_config(root / "c.yaml", [f"workdir={root / 'ref'}"])
    t0 = time.time()
    run_pipeline(cfg)
    return root, _shards(root / "ref" / "shards"), time.time() - t0


def test_sigkill_at_several_points_of_curate_run(setup, cli_env):
    """SIGKILL `curate run` at four points of its progress (mid-ingest, once embedding parts exist, once
    clustering began, once a curated shard exists), then rerun: the shards equal an uninterrupted run's.
    The points are files appearing, not wall-clock fractions, so they land mid-run at any load."""
    root, reference, _ = setup
    assert sum(1 for n in reference if n.endswith(".tar")) == 5
    args = ["run", str(root / "c.yaml")]
    points = {
        "ingest": lambda w: any((w / "ingest").glob("part-*.parquet")),
        "embed": lambda w: any((w / "embed").rglob("part-*.npy")),
        "cluster": lambda w: (w / "cluster").exists(),
        "shards": lambda w: any((w / "shards").glob("*.tar")),
    }
    kills = 0
    for name, reached in points.items():
        work = root / f"killed-{name}"
        kills += _kill_when(_curate([*args, f"workdir={work}"], cli_env), lambda: reached(work))
        proc = _curate([*args, f"workdir={work}"], cli_env)
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
        assert _shards(work / "shards") == reference, f"killed at {name}"
        shutil.rmtree(work)
    assert kills >= 3


def _outputs(work: Path) -> dict[str, bytes]:
    """Every file every curation stage wrote (records parts, raw and curated shards, embeddings,
    centroids, plans), and each stage's key and counts; not the manifests' timings, nor the report."""
    out = {}
    for stage in ("ingest", "hashdedup", "embed", "dedup", "cluster", "balance", "shards"):
        for p in sorted((work / stage).rglob("*")):
            if p.is_file() and p.name not in ("_MANIFEST.json", "_STARTED.json"):
                out[str(p.relative_to(work))] = p.read_bytes()
            elif p.name == "_MANIFEST.json":
                m = json.loads(p.read_text())
                out[str(p.relative_to(work))] = json.dumps([m["key"], m["counts"], m["inputs"]]).encode()
    return out


def _figures(work: Path) -> dict:
    """report.json without what names the workdir or times it."""
    rep = json.loads((work / "report" / "report.json").read_text())
    rep.pop("workdir", None)
    for s in rep["funnel"]["stages"]:
        s.pop("seconds", None)
    return rep


def test_ray_executor_gives_every_stage_output_of_the_local_run(setup):
    """A local Ray (2 CPUs): ingest, hash dedup and dedup (their groups in buckets of 1-2 parts), embed,
    cluster and shards run as Ray tasks or actors; every file of every stage equals the local run's, byte
    for byte, and so do the report figures."""
    import ray

    from pipelines.executors import ray_map

    root, reference, _ = setup
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        @ray.remote
        def where() -> str:
            import pipelines

            return pipelines.__file__

        assert ray.get(where.remote()).startswith(str(ROOT))  # the workers run this checkout's code
        with pytest.raises(json.JSONDecodeError, match="^Expecting property name"):  # a task's own error
            list(ray_map(json.loads, [("7",), ("{",)]))
        # hash and copy groups from buckets of at most 100 rows (whole parts of 60): jobs exchanging
        # messages, the local run's one bucket's result
        run_pipeline(load_config(root / "c.yaml", [f"workdir={root / 'ray'}", "executor=ray",
                                                    "dedup.bucket_records=100", "hashdedup.bucket_records=100"]))
    finally:
        ray.shutdown()
    assert _shards(root / "ray" / "shards") == reference
    ref, got = _outputs(root / "ref"), _outputs(root / "ray")
    assert sorted(got) == sorted(ref) and any(k.startswith("hashdedup/part-") for k in ref)
    # decontamination ran as Ray tasks over the pool parts and matched 3 of the 4 copies: the 4th copies
    # copy000107.webp, which hash dedup left as a pHash copy of an edited original (below cosine 0.9)
    assert pq.read_table(root / "ray" / "decontaminate" / "matches-bench.parquet").num_rows == 3
    assert [k for k in ref if got[k] != ref[k]] == []
    assert _figures(root / "ray") == _figures(root / "ref")


def _stuck_site(module: str, name: str) -> str:
    """A sitecustomize.py installed on one simulated worker node only (through its PYTHONPATH): every
    call of module.name that starts there says so in a file and then hangs, as on a node that stopped
    responding mid-task."""
    return f"""
import os, sys
if "default_worker.py" in " ".join(sys.argv):
    import time
    from pathlib import Path

    import {module}

    def {name}(*args, **kwargs):
        Path(os.environ["CURATE_TEST_STUCK"], f"started-{{os.getpid()}}").touch()
        while True:
            time.sleep(1)

    {module}.{name} = {name}
"""


STUCK_NODE_SITE = _stuck_site("curate.ingest", "run_part")  # every ingest part hangs there


def test_curate_run_on_three_nodes_survives_losing_a_worker_mid_stage(setup, monkeypatch, tmp_path):
    """Head + 2 workers (1 CPU each); on one worker every ingest part hangs. Once the first part is
    back from another node and a part hangs on that worker, the worker node is removed: the stage can
    only finish by Ray rerunning the lost task elsewhere, and every stage's output equals the local
    run's, byte for byte."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines import executors

    root, reference, _ = setup
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "sitecustomize.py").write_text(STUCK_NODE_SITE)
    fired = []
    real = executors.ray_map

    def ray_map(fn, jobs, *args, **kwargs):
        for n, item in enumerate(real(fn, jobs, *args, **kwargs)):
            if fn.__name__ == "run_part" and n == 0:
                end = time.time() + 120
                while not list(stuck.glob("started-*")) and time.time() < end:
                    time.sleep(0.05)
                assert list(stuck.glob("started-*")), "no ingest part started on the stuck node"
                cluster.remove_node(node)
                fired.append(len(jobs) - 1)
            yield item

    monkeypatch.setattr(executors, "ray_map", ray_map)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1, env_vars={"CURATE_TEST_STUCK": str(stuck),
                                                  "PYTHONPATH": os.pathsep.join([str(stuck), str(ROOT)])})
    cluster.add_node(num_cpus=1)
    try:
        run_pipeline(load_config(root / "c.yaml", [f"workdir={root / 'ray3'}", "executor=ray",
                                                    f"ray_address={cluster.address}"]), until="shards")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert fired == [4]  # mid-stage: 4 of the 5 ingest parts were still out, one of them hanging
    ref, got = _outputs(root / "ref"), _outputs(root / "ray3")
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if got[k] != ref[k]] == []
    assert _shards(root / "ray3" / "shards") == reference


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


STUCK_HOLDER_SITE = _stuck_site("curate.dedup", "knn_edges")  # every copy-graph query range hangs there


@contextmanager
def _losing_a_node(tmp_path: Path, site: str):
    """Head + 2 workers (1 CPU each), `site` installed as sitecustomize on one worker only; that node is
    removed once a call has started there. Yields (cluster address, removal times); shuts all down."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "sitecustomize.py").write_text(site)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=1, env_vars={"CURATE_TEST_STUCK": str(stuck),
                                                  "PYTHONPATH": os.pathsep.join([str(stuck), str(ROOT)])})
    cluster.add_node(num_cpus=1)
    removed: list[float] = []

    def remove_when_stuck():
        end = time.time() + 120
        while not list(stuck.glob("started-*")) and time.time() < end:
            time.sleep(0.05)
        if list(stuck.glob("started-*")):
            cluster.remove_node(node)
            removed.append(time.time())

    watcher = threading.Thread(target=remove_when_stuck, daemon=True)
    watcher.start()
    try:
        yield cluster.address, removed
    finally:
        watcher.join(timeout=130)
        ray.shutdown()
        cluster.shutdown()


def test_copy_graph_survives_losing_the_node_of_an_index_holder_mid_query(setup, tmp_path):
    """Head + 2 workers; the index holder on one worker hangs in its first query range. That node is
    removed while the range is out: the holder dies with it, its range goes back to the queue, the
    other holders answer it, and the edges equal one local search, bit for bit."""
    import numpy as np

    from curate.copy_graph_parts import read_edges
    from curate.dedup import as_parts, knn_edges, pool_index, valid_rows
    from curate.index import IndexSpec
    from pipelines.stages.dedup import _ray_edges

    root, _, _ = setup
    emb_dir = root / "ref" / "embed" / "pixels-12"
    parts = as_parts(str(emb_dir))
    index = pool_index(parts, IndexSpec(kind="flat"))
    ok = valid_rows(parts)
    ref = knn_edges(str(emb_dir), 8, 0.5, index=index)  # a low threshold: most k-NN pairs are edges
    with _losing_a_node(tmp_path, STUCK_HOLDER_SITE) as (address, removed):
        files, _ = _ray_edges(emb_dir, IndexSpec(kind="flat"), ok, 8, 0.5, tmp_path,
                              np.array([0, parts.n]), address)
        i, j, sim = read_edges(files)
    assert removed, "no query range started on the stuck node"
    assert len(ref[0]) > 300
    assert np.array_equal(i, ref[0]) and np.array_equal(j, ref[1]) and sim.tobytes() == ref[2].tobytes()


STUCK_BUCKET_SITE = _stuck_site("curate.copy_graph_parts", "_spread")  # every spread round hangs there


def test_copy_groups_in_buckets_survive_losing_a_worker_node_mid_round(tmp_path):
    """Head + 2 workers; on one worker every label-spreading job hangs. That node is removed while a
    job is out: Ray reruns the lost task elsewhere (each job rewrites whole files from the previous
    round's), and the groups equal group_edges' on the driver."""
    import numpy as np
    import pyarrow as pa
    import ray

    from curate.copy_graph_parts import group_edge_files, write_edges
    from curate.dedup import group_edges
    from pipelines.executors import ray_mapper

    rng = np.random.default_rng(1)
    n = 600
    chain = rng.permutation(n)[:300]  # chains of 10: several label rounds
    i = np.concatenate([c[:-1] for c in chain.reshape(30, 10)])
    j = np.concatenate([c[1:] for c in chain.reshape(30, 10)])
    edges = (np.minimum(i, j), np.maximum(i, j), rng.uniform(0.9, 1, len(i)).astype(np.float32))
    ids = np.array([f"{rng.integers(0, 10**6):06d}-{r}" for r in range(n)])
    pixels = rng.integers(1, 3, n) * 64
    bounds = np.array([0, 150, 300, 450, 600])
    write_edges(tmp_path / "edges.arrow", edges, bounds)
    with _losing_a_node(tmp_path, STUCK_BUCKET_SITE) as (address, removed):
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        part = group_edge_files(tmp_path / "work", bounds, [tmp_path / "edges.arrow"],
                                lambda rows: (pa.array(ids[rows]), pixels[rows]), ray_mapper(address), limits=None)
    assert removed, "no label round started on the stuck node"
    graph = group_edges(n, edges, lambda rows: (ids[rows], pixels[rows]), limits=None)
    assert part.stats.pop("label_rounds") >= 6 and part.stats == graph.stats
    assert pa.concat_tables(list(part.group_tables())).combine_chunks().equals(graph.groups.combine_chunks())
    got = pa.concat_tables([part.members(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])])
    assert got.column("copy_of").combine_chunks().equals(graph.copy_of().cast(pa.string()))
    assert np.array_equal(got.column("group").to_numpy(), graph.group)


STUCK_HASH_SITE = _stuck_site("pipelines.copy_verify", "hash_job")  # local verification's hash jobs hang there


def test_local_verification_survives_losing_a_worker_node_mid_round(setup, tmp_path):
    """Head + 2 workers; on one worker every hash job of local verification (pipelines.copy_verify, its
    first round) hangs. That node is removed while a job is out: Ray reruns the lost task elsewhere (each
    job rewrites whole files), the later rounds run on the nodes left, and the verified edges and the
    manifest's counts equal the local executor's."""
    import numpy as np

    from curate.copy_graph_parts import part_buckets, read_edges
    from curate.dedup import as_parts
    from pipelines.aligned import EmbeddingLayout
    from pipelines.executors import ray_mapper
    from pipelines.stages.dedup import _verified_edges, valid_files

    root, _, _ = setup
    emb_dir = root / "ref" / "embed" / "pixels-12"
    layout = EmbeddingLayout(root / "ref" / "ingest", emb_dir)
    parts = as_parts(str(emb_dir))
    bounds = part_buckets(layout.offsets, 100)  # 3 buckets of 1-2 parts

    def edges(work, cfg, mapper):
        valid_at, _ = valid_files(parts.paths, work, mapper)
        files, info = _verified_edges(cfg, emb_dir, layout, parts, valid_at, 0.95, work, bounds, mapper)
        return read_edges(files), info

    local, info = edges(tmp_path / "local", load_config(root / "c.yaml", [f"workdir={root / 'ref'}"]), None)
    with _losing_a_node(tmp_path, STUCK_HASH_SITE) as (address, removed):
        cfg = load_config(root / "c.yaml", [f"workdir={root / 'ref'}", "executor=ray", f"ray_address={address}"])
        got, got_info = edges(tmp_path / "ray", cfg, ray_mapper(address))
    assert removed, "no hash job started on the stuck node"
    assert len(bounds) - 1 == 3 and len(local[0]) >= 1, info
    assert all(np.array_equal(a, b) for a, b in zip(got, local))
    assert got_info["linked"] == info["linked"] and info["candidates"]["kept"] > 100
    same = ("found_by_search", "sent_by_search", "kept")  # messages: as the k-NN queries were cut into ranges
    assert {k: got_info["candidates"][k] for k in same} == {k: info["candidates"][k] for k in same}
