"""The bounded-memory Ray paths on a simulated 2-node cluster equal the local computation bit for bit:
k-means passes reduced in part order as parts arrive, copy-graph queries answered by one index holder
per node, and the copy groups' bucket jobs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    """Five float16 parts of clustered unit vectors with planted near copies, one row failed."""
    root = tmp_path_factory.mktemp("rayscale")
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((12, 16))
    x = centers[rng.integers(0, 12, 1500)] + 0.5 * rng.standard_normal((1500, 16))
    x[1::7] = x[0::7][: len(x[1::7])] + 0.01 * rng.standard_normal((len(x[1::7]), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    status = ["ok"] * len(x)
    status[3] = "embed_error"
    start = 0
    for p, size in enumerate([300, 200, 400, 100, 500]):
        np.save(root / f"part-{p:05d}.npy", x[start:start + size].astype(np.float16))
        pq.write_table(pa.table({"id": [f"r{r:05d}" for r in range(start, start + size)],
                                 "status": status[start:start + size]}), root / f"part-{p:05d}.parquet")
        start += size
    return root


def test_ray_kmeans_pass_equals_local(two_nodes, emb_dir, tmp_path):
    """Tasks per chunk of valid rows (chunks spanning parts) write their labels where the local pass puts them."""
    from curate.kmeans import assign_all, local_step_fn
    from curate.kmeans_parts import Assignment, PartVectors, chunk_sizes
    from curate.vectors import EmbeddingParts
    from pipelines.stages.cluster import _ray_step_fn

    base = EmbeddingParts(emb_dir)
    valid = np.setdiff1d(np.arange(base.n), [3, 250, 251, 900])
    sub = base.subset(valid)
    positions = []
    for p, (lo, hi) in enumerate(zip(base.offsets[:-1], base.offsets[1:])):
        np.save(tmp_path / f"rows-{p:05d}.npy", valid[(valid >= lo) & (valid < hi)] - lo)
        positions.append(tmp_path / f"rows-{p:05d}.npy")
    vectors = PartVectors(base.paths, positions)
    centroids = sub.take(np.arange(0, 40) * 30)
    out = Assignment(chunk_sizes(vectors.n, 64), tmp_path / "labels")
    got = _ray_step_fn(vectors, 64, two_nodes)(centroids, out)
    ref, ref_labels, ref_dists = assign_all(local_step_fn(sub, 64), centroids, sub.n, 64)
    assert got.sums.tobytes() == ref.sums.tobytes() and np.array_equal(got.counts, ref.counts)
    assert np.array_equal(got.far_row, ref.far_row) and np.array_equal(got.far_dist, ref.far_dist)
    assert got.inertia == ref.inertia
    labels, dists = Assignment(out.sizes, tmp_path / "labels").arrays()  # read back from the tasks' files
    assert np.array_equal(labels, ref_labels) and dists.tobytes() == ref_dists.tobytes()
    assert len(list((tmp_path / "labels").glob("labels-*.npy"))) == len(out.sizes) == 24


def test_ray_copy_graph_with_an_index_per_node_equals_local(two_nodes, emb_dir, tmp_path):
    from curate.copy_graph_parts import read_edges
    from curate.dedup import as_parts, knn_edges, pool_index, valid_rows
    from curate.index import IndexSpec
    from pipelines.stages.dedup import _ray_edges

    parts = as_parts(str(emb_dir))
    index = pool_index(parts, IndexSpec(kind="flat"))
    ok = valid_rows(parts)
    bounds = np.array([0, parts.n // 3, parts.n])
    files, kind = _ray_edges(emb_dir, IndexSpec(kind="flat"), ok, 8, 0.9, tmp_path, bounds,
                             two_nodes)
    assert kind == "flat"  # built by a task from the spec, the same index as the local one
    assert len(files) >= 16
    i, j, sim = read_edges(files)
    ri, rj, rsim = knn_edges(str(emb_dir), 8, 0.9, index=index)
    assert len(ri) > 150 and 3 not in set(ri) | set(rj)
    assert np.array_equal(i, ri) and np.array_equal(j, rj) and sim.tobytes() == rsim.tobytes()
    assert not list(tmp_path.glob("_index*"))  # the saved index is removed afterwards


def test_ray_copy_groups_in_buckets_equal_group_edges(two_nodes, emb_dir, tmp_path):
    """The copy graph's components, keepers and numbers from jobs over 4 buckets, each a Ray task on
    either node exchanging messages through files, equal group_edges on the driver."""
    from curate.copy_graph_parts import group_edge_files, read_edges, write_edges
    from curate.dedup import as_parts, group_edges, knn_edges, pool_index
    from pipelines.executors import ray_mapper

    parts = as_parts(str(emb_dir))
    edges = knn_edges(parts, 8, 0.9, index=pool_index(parts))
    rng = np.random.default_rng(0)
    ids = np.array([f"{rng.integers(0, 10**6):06d}-{r}" for r in range(parts.n)])
    pixels = rng.integers(1, 3, parts.n) * 64
    bounds = np.array([0, 300, 500, 900, 1500])
    files = []
    for q, (lo, hi) in enumerate([(0, 700), (700, 1500)]):  # two query ranges, as two index holders
        files.append(tmp_path / f"edges-{q}.arrow")
        write_edges(files[-1], knn_edges(parts, 8, 0.9, index=pool_index(parts), query_rows=(lo, hi)), bounds)
    assert all(np.array_equal(a, b) for a, b in zip(read_edges(files), edges))
    part = group_edge_files(tmp_path / "work", bounds, files, lambda rows: (pa.array(ids[rows]), pixels[rows]),
                            ray_mapper(two_nodes), k=8, threshold=0.9, limits=None)
    graph = group_edges(parts.n, edges, lambda rows: (ids[rows], pixels[rows]), k=8, threshold=0.9, limits=None)
    assert graph.stats["groups"] > 80
    assert pa.concat_tables(list(part.group_tables())).combine_chunks().equals(graph.groups.combine_chunks())
    got = pa.concat_tables([part.members(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])])
    assert np.array_equal(got.column("row").to_numpy(), graph.nodes)
    assert got.column("copy_of").combine_chunks().equals(graph.copy_of().cast(pa.string()))
    assert np.array_equal(got.column("group").to_numpy(), graph.group)
    assert {k: v for k, v in part.stats.items() if k != "label_rounds"} == graph.stats
