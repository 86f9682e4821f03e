"""Scale: a synthetic workdir (records and float16 embeddings, no images) run through hashdedup,
dedup, cluster, balance and the shard plan, each stage in a fresh process, with its wall time and
peak RSS; run at two sizes, the RSS ratio per stage says which stages stream.

    python bench/scale.py --records 1000000 --work /tmp/scale-1m
    python bench/scale.py --records 10000000 --work /tmp/scale-10m --compare /tmp/scale-1m/scale.json

The records parts carry every column real ingest writes (statuses, sha256 with planted exact
copies, pHash with planted near copies, sizes, raw-shard locations); the embedding holds the
records hashdedup kept, as the embed stage would: clustered unit vectors plus planted near copies.
Generation is streamed part by part (its own process, measured like a stage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import curate  # noqa: E402,F401  (its OPENBLAS_CORETYPE before faiss loads: curate.blas)

STAGES = ["generate_ingest", "hashdedup", "generate_embed", "dedup", "cluster", "balance", "shard_plan"]
EMBEDDING = "semantic"
BAD_STATUS = 0.02   # share of records ingest would drop (decode_error, too_small)
EXACT_COPY = 0.01   # share of records whose bytes equal an earlier record's (same sha256)
PHASH_COPY = 0.01   # share whose pHash is an earlier record's with two bits flipped
EMBED_COPY = 0.01   # share of embedded records that are near copies of an earlier one (cosine > 0.99)
EMBED_ERROR = 0.001  # share of embedded records that failed to embed
CENTERS = 4096      # concepts the vectors are drawn around


def levels_for(n: int) -> list[dict]:
    """Two k-means levels sized for n: ~1000 points per level-1 cluster, found in split mode with at
    most 100 sub-clusters per split (the reference's layout), then 10 level-1 clusters per level 2."""
    k1 = max(4, n // 1000)
    return [{"n_clusters": k1, "n_iters": 8, "split": max(1, k1 // 100)},
            {"n_clusters": max(2, k1 // 10), "n_iters": 10, "resampling_steps": 2, "sample_size": 3, "sampling": "c"}]


def config_overrides(work: Path, n: int, k: int, ray_address: str | None = None) -> list[str]:
    """The settings every stage of the run uses (copy-descriptor dedup: no images to verify); with a Ray
    address, executor ray on that cluster (its workers are not the stage's children: the measured RSS is
    the driver's)."""
    levels = json.dumps(levels_for(n)).replace(" ", "")
    ray = ["executor=ray", f"ray_address={ray_address}"] if ray_address else []
    return [*ray, f"workdir={work}", f"embed.name={EMBEDDING}", "embed.model=synthetic", f"dedup.embedding={EMBEDDING}",
            "dedup.copy_descriptor=true", "dedup.verify=none", "dedup.threshold=0.95", f"dedup.k={k}",
            "dedup.nprobe=8", f"cluster.embedding={EMBEDDING}", f"cluster.levels={levels}",
            f"balance.target={n // 2}", "balance.strategy=r", "balance.levels=all", "shards.select=balance:selected"]


def _hex(seed: int, rows: np.ndarray, width: int) -> list[str]:
    """Deterministic hex strings (width chars) of row numbers: stand-ins for content hashes."""
    return [hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=width // 2).hexdigest() for r in rows.tolist()]


def generate_ingest(work: Path, n: int, part_size: int, seed: int = 0) -> dict:
    """Records parts as ingest writes them, and its manifest, one part at a time."""
    import pyarrow as pa

    from curate.ingest import RECORD_FIELDS
    from curate.parts import part_name, write_table_atomic
    from pipelines.manifest import StageResult, finish

    d = work / "ingest"
    d.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    n_parts = (n + part_size - 1) // part_size
    for k in range(n_parts):
        lo, hi = k * part_size, min(n, (k + 1) * part_size)
        rows = np.arange(lo, hi)
        m = hi - lo
        rng = np.random.default_rng([seed, k])
        names = [f"synthetic/{r:09d}.jpg" for r in rows.tolist()]
        ids = [hashlib.blake2b(s.encode(), digest_size=8).hexdigest() for s in names]
        u = rng.random(m)
        status = np.where(u < BAD_STATUS / 2, "decode_error", np.where(u < BAD_STATUS, "too_small", "ok"))
        ok = status == "ok"
        # an exact copy repeats the bytes of an earlier row of the part; a pHash copy flips two bits of one
        src = rng.integers(0, np.maximum(np.arange(m), 1))
        v = rng.random(m)
        exact = (v < EXACT_COPY) & (np.arange(m) > 0)
        near = (v >= EXACT_COPY) & (v < EXACT_COPY + PHASH_COPY) & (np.arange(m) > 0)
        origin = np.where(exact, rows[src], rows)
        sha = np.array(_hex(seed, origin, 64), dtype=object)
        phash = rng.integers(0, 2**63, size=m, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        phash[exact] = phash[src[exact]]
        flips = (np.uint64(1) << rng.integers(1, 63, size=m).astype(np.uint64)) | np.uint64(1 << 63)
        phash[near] = phash[src[near]] ^ flips[near]
        width = rng.integers(200, 2000, size=m).astype(np.int32)
        height = rng.integers(200, 2000, size=m).astype(np.int32)
        width[exact], height[exact] = width[src[exact]], height[src[exact]]
        nbytes = rng.integers(20_000, 400_000, size=m)
        offsets = np.concatenate([[0], np.cumsum(((nbytes + 1023) // 512) * 512 + 1536)[:-1]])
        cols = {
            "id": ids, "uri": [f"/data/{s}" for s in names], "name": names, "source": ["synthetic"] * m,
            "status": status.tolist(), "error": np.where(ok, None, "synthetic").tolist(),
            "sha256": np.where(ok, sha, None).tolist(), "phash": pa.array(phash, mask=~ok),
            "width": pa.array(width, mask=~ok), "height": pa.array(height, mask=~ok),
            "nbytes": pa.array(nbytes, mask=~ok), "format": np.where(ok, "JPEG", None).tolist(),
            "ext": np.where(ok, "jpg", None).tolist(), "mode": np.where(ok, "RGB", None).tolist(),
            "n_frames": pa.array(np.ones(m, np.int32), mask=~ok), "http_status": pa.nulls(m, pa.int32()),
            "raw_shard": np.where(ok, f"shards/shard-{k:05d}.tar", None).tolist(),
            "raw_key": np.where(ok, np.array(ids, dtype=object), None).tolist(),
            "raw_offset": pa.array(offsets, mask=~ok),
        }
        table = pa.table({name: pa.array(cols[name], type=t) if not isinstance(cols[name], pa.Array) else
                          cols[name].cast(t) for name, t in RECORD_FIELDS})
        write_table_atomic(table, d / part_name(k))
        for s, c in zip(*np.unique(status, return_counts=True)):
            counts[str(s)] = counts.get(str(s), 0) + int(c)
    result = StageResult("ingest", str(d), f"synthetic-{n}-{part_size}-{seed}", counts={
        "in": n, "out": counts.get("ok", 0), "dropped": {s: c for s, c in counts.items() if s != "ok"},
        "parts": n_parts})
    finish(result, {"synthetic": {"records": n, "part_size": part_size, "seed": seed}}, {})
    return result.counts


def write_part(out: Path, k: int, ids: list[str], x: np.ndarray, errors: list[str]) -> None:
    """An embedding part as curate.embed.write_part writes it (.npy, then the .parquet that marks it done),
    without importing torch."""
    import pyarrow as pa

    from curate.parts import atomic_path, part_name, write_table_atomic

    with atomic_path(out / part_name(k).replace(".parquet", ".npy")) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(x, dtype=np.float16))
    write_table_atomic(pa.table({"id": pa.array(ids, pa.string()),
                                 "status": pa.array(["embed_error" if e else "ok" for e in errors], pa.string()),
                                 "error": pa.array([e or None for e in errors], pa.string())}), out / part_name(k))


def generate_embed(work: Path, dim: int, seed: int = 0) -> dict:
    """Float16 unit vectors of the records hashdedup kept, part by part, and the embed manifest."""
    import pyarrow.compute as pc

    from curate.parts import list_parts, read_aligned
    from pipelines.manifest import StageResult, finish, read_manifest

    dirs = [work / "ingest", work / "hashdedup"]
    out = work / "embed" / EMBEDDING
    out.mkdir(parents=True, exist_ok=True)
    centers = np.random.default_rng([seed, 1]).standard_normal((CENTERS, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    popularity = 1 / (np.arange(CENTERS) + 10.0)
    popularity /= popularity.sum()
    total = ok = 0
    for k in range(len(list_parts(dirs[0]))):
        t = read_aligned(dirs, k, {str(dirs[0]): ["id", "status"], str(dirs[1]): ["dup_of"]})
        t = t.filter(pc.and_(pc.equal(t.column("status"), "ok"), pc.is_null(t.column("dup_of"))))
        m = t.num_rows
        rng = np.random.default_rng([seed, 2, k])
        # concepts of long-tailed popularity, so the tree has dense and sparse regions to balance
        concept = rng.choice(CENTERS, size=m, p=popularity)
        x = centers[concept] + 0.8 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        copy = (rng.random(m) < EMBED_COPY) & (np.arange(m) > 0)
        src = rng.integers(0, np.maximum(np.arange(m), 1))
        x[copy] = x[src[copy]] + 0.02 * rng.standard_normal((int(copy.sum()), dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        failed = rng.random(m) < EMBED_ERROR
        x[failed] = 0
        write_part(out, k, t.column("id").to_pylist(), x, ["synthetic" if f else "" for f in failed])
        total, ok = total + m, ok + int((~failed).sum())
    key = {"model": "synthetic", "dim": dim, "seed": seed, "inputs": read_manifest(dirs[1])["key"]}
    result = StageResult(f"embed/{EMBEDDING}", str(out), json.dumps(key, sort_keys=True), counts={
        "in": total, "out": ok, "dropped": {"embed_error": total - ok} if total > ok else {}, "dim": dim})
    finish(result, {"model": "synthetic", "name": EMBEDDING}, {"hashdedup": read_manifest(dirs[1])["key"]})
    return result.counts


def shard_plan(cfg) -> dict:
    """The shards stage up to its plan (`pipelines.stages.shards.plan_parts`: selected records part by part,
    repeats expanded, samples ordered and cut, the plan written), no image read."""
    import shutil

    from pipelines.stages.shards import plan_parts

    out = Path(cfg.workdir) / "shard_plan"
    shutil.rmtree(out, ignore_errors=True)
    jobs, selected, samples = plan_parts(cfg, out)
    return {"in": selected, "out": samples, "shards": len(jobs)}


def calibrate(dim: int = 64) -> dict:
    """Per-core rates `curate plan` uses (CPU time): faiss nearest-centroid FLOP/s (k = 4096), the rest of a
    k-means pass per record and dimension (float16 read, bookkeeping, float64 sums; k = 16), k-means++ FLOP/s,
    and a flat index's self k-NN (20k x 256, k = 16) per query, indexed vector and dimension."""
    import faiss

    from curate.kmeans import ArrayVectors, kmeans_plusplus, local_step_fn

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((65536, dim)).astype(np.float32)
    index = faiss.IndexFlatL2(dim)
    index.add(x[:4096])
    t0 = time.process_time()
    index.search(x, 1)
    search = time.process_time() - t0
    vectors = ArrayVectors(x.astype(np.float16))
    step = local_step_fn(vectors, 65536)
    t0 = time.process_time()
    for _ in range(5):
        step(x[:16])
    per_pass = (time.process_time() - t0) / 5
    t0 = time.process_time()
    kmeans_plusplus(x[:16384], 128, 0)
    pp = time.process_time() - t0
    flat = faiss.IndexFlatIP(256)  # a flat index's self k-NN (k = 16): the GEMM and the top-k selection
    y = rng.standard_normal((20000, 256)).astype(np.float32)
    flat.add(y)
    t0 = time.process_time()
    flat.search(y, 16)
    knn = time.process_time() - t0
    return {"faiss_flops_per_core": round(2 * len(x) * 4096 * dim / search / 1e9, 1) * 1e9,
            "flat_scan_s": float(f"{knn / len(y) ** 2 / 256:.3g}"),
            "kmeans_pass_s_per_record_dim": per_pass / len(x) / dim,
            "kmeans_pp_flops_per_core": round(2 * 16384 * dim * 128 * (3 + np.log(128)) / pp / 1e9, 1) * 1e9}


def planted_cluster(work: Path, n: int, seed: int = 0) -> dict:
    """cluster's parts and manifest with seeded labels of the levels_for(n) sizes (long-tailed level-1
    sizes), for a size where the k-means itself does not fit the time: balance and the shard plan then
    run on a tree of the real shape."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.parts import list_parts, part_name, read_aligned, write_table_atomic
    from pipelines.manifest import StageResult, finish, read_manifest

    levels = levels_for(n)
    k1, k2 = levels[0]["n_clusters"], levels[1]["n_clusters"]
    emb, d = work / "embed" / EMBEDDING, work / "cluster"
    d.mkdir(parents=True, exist_ok=True)
    popularity = 1 / (np.arange(k1) + 10.0)
    popularity /= popularity.sum()
    total = 0
    for k, path in enumerate(list_parts(work / "ingest")):
        ids = read_aligned([work / "ingest"], k, {str(work / "ingest"): ["id"]}).column("id")
        e = read_aligned([emb], k, {str(emb): ["id", "status"]})
        e = e.filter(pc.equal(e.column("status"), "ok"))
        hit = pc.is_valid(pc.index_in(ids, value_set=e.column("id"))).to_numpy(zero_copy_only=False)
        rng = np.random.default_rng([seed, 3, k])
        l1 = rng.choice(k1, size=len(ids), p=popularity).astype(np.int32)
        mask = ~hit
        write_table_atomic(pa.table({"id": ids, "cluster_l1": pa.array(l1, mask=mask),
                                     "cluster_l2": pa.array((l1 % k2).astype(np.int32), mask=mask),
                                     "cluster_sq_dist": pa.array(rng.random(len(ids)).astype(np.float32), mask=mask)}),
                           d / part_name(k))
        total += int(hit.sum())
    for level, kk in ((1, k1), (2, k2)):
        np.save(d / f"centroids_l{level}.npy", np.zeros((kk, 1), np.float32))
    key = read_manifest(emb)["key"]
    result = StageResult("cluster", str(d), f"planted-{key}", counts={"in": total, "out": total, "dropped": {},
                                                                      "planted": True})
    finish(result, {"embedding": EMBEDDING, "planted": True},
           {"ingest": read_manifest(work / "ingest")["key"], "embedding": key})
    return result.counts


def _dedup_node_peak(m: int) -> float:
    """Peak driver bytes per node of group_edges over 10M records of which m have an edge, with one part's
    keeper ids as the stage's write jobs take them; numpy and Python allocations (tracemalloc) plus Arrow's
    (its pool's peak): the sum of the two peaks, an upper bound of the process's. Run in a fresh process."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.dedup import group_edges

    rng = np.random.default_rng(0)
    nodes = np.sort(rng.choice(10_000_000, m, replace=False))
    pool = pa.default_memory_pool()
    arrow0 = pool.bytes_allocated()
    tracemalloc.start()
    edges = (nodes[0::2], nodes[1::2], rng.random(m // 2).astype(np.float32))  # as merge_edges hands them over

    def node_info(rows):  # ids of 26 characters as ours, as the stage reads them: Arrow strings
        names = pc.binary_join_element_wise("ingest-000123/", pa.array(rows).cast(pa.string()), "")
        return pa.chunked_array([names]), rng.integers(1, 9, len(rows)) * 1000

    g = group_edges(10_000_000, edges, node_info, limits=None)
    part = g.copy_of(0, len(g.nodes) // 100)  # one part's job of a pool in 100 parts
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del part
    return (peak + pool.max_memory() - arrow0) / m


def _dedup_job_peak(m: int, hashes: bool = False, chain: int = 2) -> tuple[float, float]:
    """Peak bytes per node and seconds per node of copy dedup's bucket jobs when one bucket holds all m
    records with an edge (curate.copy_graph_parts, local calls; the edges and ids of _dedup_node_peak,
    counted the same way: numpy/Python and Arrow peaks added; the message files the jobs map are clean
    file pages, not counted). hashes: with hash dedup's extra columns (a pHash and a 64-character sha256
    per node, carried to the members with their keeper's). chain: records per component, linked as chains
    in random row order (2: pairs)."""
    import tempfile
    import tracemalloc

    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.copy_graph_parts import group_edge_files, write_edges

    rng = np.random.default_rng(0)
    nodes = np.sort(rng.choice(10_000_000, m, replace=False))
    bounds = np.array([0, 10_000_000])

    def node_info(rows):
        names = pc.binary_join_element_wise("ingest-000123/", pa.array(rows).cast(pa.string()), "")
        if not hashes:
            return pa.chunked_array([names]), rng.integers(1, 9, len(rows)) * 1000
        sha = pc.utf8_lpad(pa.array(rows).cast(pa.string()), 64, "0")  # 64 characters, as a sha256
        return (pa.chunked_array([names]), rng.integers(1, 9, len(rows)) * 1000,
                {"phash": rng.integers(0, 2**63, len(rows)).astype(np.uint64), "sha": pa.chunked_array([sha])})

    with tempfile.TemporaryDirectory() as tmp:
        c = (nodes if chain == 2 else np.random.default_rng(1).permutation(nodes))[:m // chain * chain]
        c = c.reshape(-1, chain)
        i, j = c[:, :-1].ravel(), c[:, 1:].ravel()
        write_edges(f"{tmp}/e.arrow", (np.minimum(i, j), np.maximum(i, j), rng.random(len(i)).astype(np.float32)),
                    bounds)
        del nodes, c, i, j
        pool = pa.default_memory_pool()
        arrow0 = pool.bytes_allocated()
        tracemalloc.start()
        t0 = time.perf_counter()
        group_edge_files(f"{tmp}/w", bounds, [f"{tmp}/e.arrow"], node_info, limits=None)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return (peak + pool.max_memory() - arrow0) / m, seconds / m


def _band_peak(m: int, kind: str) -> tuple[float, float]:
    """Peak bytes and seconds per record of one hash band's reduce task (`band_edges`, as a Ray reducer
    runs it) over m records: a pHash band whose records share 4 values of the band's field (a band at
    paper scale), or a sha256 band of distinct hashes with 1% copies; numpy/Python and Arrow peaks."""
    import tempfile
    import tracemalloc

    import pyarrow as pa

    from curate.hash_bands import band_edges, phash_fields

    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(10 * m, m, replace=False)).astype(np.int64)
    if kind == "phash":
        shift, width = phash_fields(4)[0]
        keys = rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64) * np.uint64(2)
        keys = (keys & ~np.uint64(((1 << width) - 1) << shift)) | (rng.integers(0, 4, m).astype(np.uint64)
                                                                   << np.uint64(shift))
    else:
        keys = np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(m)], dtype="S64")
        keys[rng.integers(0, m, m // 100)] = keys[rng.integers(0, m, m // 100)]
    chunks = [(rows[a::4], keys[a::4]) for a in range(4)]  # as four map tasks send them
    del rows, keys
    with tempfile.TemporaryDirectory() as tmp:
        pool = pa.default_memory_pool()
        arrow0 = pool.bytes_allocated()
        tracemalloc.start()
        t0 = time.perf_counter()
        band_edges(f"{tmp}/e.arrow", np.array([0, 10 * m]), kind, 4, *chunks)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    inputs = sum(c[0].nbytes + c[1].nbytes for c in chunks)
    return (peak + pool.max_memory() - arrow0 + inputs) / m, seconds / m


def calibrate_bands(sizes: tuple[int, ...] = (250_000, 1_000_000)) -> dict:
    """Hash dedup's reduce task bytes per band record (`hashdedup_band_record_bytes`), its input chunks
    included, and seconds per record, for a pHash and a sha256 band; each in a fresh process. The pHash
    band's seconds per record grow with the records that share its field value: `phash_shared_s`, the
    slope between the two sizes (4 values per band)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out: dict = {}
    for kind in ("phash", "sha"):
        for m in sizes:
            with ctx.Pool(1) as pool:
                b, s = pool.apply(_band_peak, (m, kind))
            out.setdefault(f"{kind}_band_record_bytes", {})[m] = round(b, 1)
            out.setdefault(f"{kind}_band_record_s", {})[m] = float(f"{s:.3g}")
    (m1, s1), (m2, s2) = list(out["phash_band_record_s"].items())[:2]  # records per field value: m / 4
    out["phash_shared_s"] = float(f"{(s2 - s1) / ((m2 - m1) / 4):.3g}")
    return out


def calibrate_dedup(sizes: tuple[int, ...] = (200_000, 1_000_000)) -> dict:
    """Copy dedup's bytes per record with an edge, each size in a fresh process: `dedup_node_bytes` of
    the plan, the peak of a bucket job holding them all (see _dedup_job_peak), with its seconds per node
    (`dedup_node_s`); the same with hash dedup's columns (`hashdedup_node_bytes`); and the peak of group_edges in one process, the driver's before the buckets
    (see _dedup_node_peak)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out: dict = {"dedup_node_bytes": {}, "dedup_node_s": {}, "hashdedup_node_bytes": {}, "group_edges_node_bytes": {}}
    for m in sizes:
        with ctx.Pool(1) as pool:
            b, s = pool.apply(_dedup_job_peak, (m,))
        out["dedup_node_bytes"][m], out["dedup_node_s"][m] = round(b, 1), float(f"{s:.3g}")
        with ctx.Pool(1) as pool:
            out["hashdedup_node_bytes"][m] = round(pool.apply(_dedup_job_peak, (m, True))[0], 1)
        with ctx.Pool(1) as pool:
            out["group_edges_node_bytes"][m] = round(pool.apply(_dedup_node_peak, (m,)), 1)
    for chain in (10, 100):  # more label rounds: not the peak
        with ctx.Pool(1) as pool:
            b, s = pool.apply(_dedup_job_peak, (sizes[-1], False, chain))
        out[f"dedup_node_bytes_chains_of_{chain}"] = {sizes[-1]: round(b, 1)}
        out[f"dedup_node_s_chains_of_{chain}"] = {sizes[-1]: float(f"{s:.3g}")}
    return out


def _round_graph(shape: str, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Edges (i < j) of one component of m rows: a chain with rows rising along it or in a random order,
    a random tree, 1-d points each linked to its 3 nearest on either side (rows in a random order), or
    m / 2 pairs."""
    r = rng.permutation(m) if shape != "chain-up" else np.arange(m)
    if shape == "pairs":
        i, j = r[0::2], r[1::2]
    elif shape.startswith("chain"):
        i, j = r[:-1], r[1:]
    elif shape == "tree":
        i, j = r[1:], r[rng.integers(0, np.arange(1, m))]
    else:
        i = np.concatenate([r[:-d] for d in (1, 2, 3)])
        j = np.concatenate([r[d:] for d in (1, 2, 3)])
    return np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)


def calibrate_rounds(sizes: tuple[int, ...] = (2, 10, 1000, 1_000_000), buckets: int = 4) -> dict:
    """Label rounds of the copy graph's bucket jobs (`dedup_rounds`) per component shape and size, and
    their wall time (local calls) as a ratio to scipy's connected components on the same edges; and the
    core-seconds per node of a label round past a pair's (`dedup_round_node_s`): the largest random chain
    against as many nodes in pairs."""
    import tempfile

    import pyarrow as pa
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from curate.copy_graph_parts import group_edge_files, write_edges

    out: dict = {}
    for shape in ("chain-up", "chain-random", "tree", "knn-1d", "pairs"):
        for m in sizes if shape != "pairs" else sizes[-1:]:
            i, j = _round_graph(shape, m, np.random.default_rng(m))
            bounds = np.linspace(0, m, buckets + 1).astype(np.int64)
            with tempfile.TemporaryDirectory() as d:
                write_edges(f"{d}/e.arrow", (i, j, np.ones(len(i), np.float32)), bounds)
                t0, c0 = time.perf_counter(), time.process_time()
                g = group_edge_files(f"{d}/w", bounds, [f"{d}/e.arrow"], lambda rows: (
                    pa.array(rows.astype(str)), np.ones(len(rows), np.int64)), limits=None, max_component=m)
                took, cpu = time.perf_counter() - t0, time.process_time() - c0
            t0 = time.perf_counter()
            comps = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(m, m)), directed=False)[0]
            base = time.perf_counter() - t0
            assert g.stats["groups"] == comps == (m // 2 if shape == "pairs" else 1)
            out[f"{shape}/{m}"] = {"rounds": g.stats["label_rounds"], "seconds": round(took, 3),
                                   "cpu_s": round(cpu, 3), "vs_scipy": round(took / max(base, 1e-6), 1)}
            print(shape, m, out[f"{shape}/{m}"], file=sys.stderr, flush=True)
    chain, pairs = out[f"chain-random/{sizes[-1]}"], out[f"pairs/{sizes[-1]}"]
    out["dedup_round_node_s"] = float(f"{(chain['cpu_s'] - pairs['cpu_s']) / (chain['rounds'] - 2) / sizes[-1]:.3g}")
    return out


def run_child(stage: str, work: Path, args: argparse.Namespace) -> dict:
    """One stage in this process; returns its counts."""
    from pipelines.config import load_config

    if stage == "generate_ingest":
        return generate_ingest(work, args.records, args.part_size, args.seed)
    if stage == "generate_embed":
        return generate_embed(work, args.dim, args.seed)
    if stage == "planted_hashdedup":
        return planted_hashdedup(work)
    if stage == "planted_cluster":
        return planted_cluster(work, args.records, args.seed)
    cfg = load_config(work / "scale.yaml")
    if stage == "shard_plan":
        return shard_plan(cfg)
    from pipelines.run import run_stage

    return run_stage(stage, cfg)[0].counts


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident set of a live process (field VmHWM: its peak), MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(x.split()[1]) / 1024 for x in fh if x.startswith(field)), 0.0)
    except OSError:
        return 0.0


def measure(stage: str, work: Path, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh process: wall seconds, peak RSS (wait4 of that child) and its counts.
    A stage whose RSS passes --max-rss-gb is stopped and reported as such (how far it got)."""
    cmd = [sys.executable, __file__, "--child", stage, "--work", str(work), "--records", str(args.records),
           "--part-size", str(args.part_size), "--dim", str(args.dim), "--seed", str(args.seed)]
    out = work / f"_{stage}.json"
    t0, killed = time.time(), 0.0
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh)
        while (done := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            rss = _rss_mb(proc.pid)
            if rss > args.max_rss_gb * 1024:
                killed = rss
                proc.kill()
            time.sleep(0.2)
    _, status, usage = done
    seconds = time.time() - t0
    figures = {"stage": stage, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
               "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    if killed:
        return {**figures, "stopped": f"RSS {killed / 1024:.1f} GB passed --max-rss-gb {args.max_rss_gb}"}
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"stage {stage} failed with exit code {code} (command: {' '.join(cmd)})")
    return {**figures, "counts": json.loads(out.read_text())}


def planted_hashdedup(work: Path) -> dict:
    """hashdedup's parts from the planted exact copies (same sha256 in a part: the first one is kept), for a
    size where the real stage passes the memory limit, so the later stages still run on such a pool."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from curate.parts import list_parts, part_name, write_table_atomic
    from pipelines.manifest import StageResult, finish, read_manifest

    d = work / "hashdedup"
    d.mkdir(parents=True, exist_ok=True)
    n_ok = n_dup = 0
    for k, path in enumerate(list_parts(work / "ingest")):
        t = pq.read_table(path, columns=["id", "status", "sha256", "phash"])
        ok = pc.equal(t.column("status"), "ok").to_numpy(zero_copy_only=False)
        ids = np.array(t.column("id").to_pylist(), dtype=object)
        sha = np.array(t.column("sha256").to_pylist(), dtype=object)
        first = {}
        dup = np.full(len(ids), None, dtype=object)
        for i in np.flatnonzero(ok):
            j = first.setdefault(sha[i], i)
            dup[i] = ids[j] if j != i else None
        m, isdup = len(ids), np.array([x is not None for x in dup], dtype=bool)
        write_table_atomic(pa.table({"id": t.column("id"), "dup_of": pa.array(dup.tolist(), pa.string()),
                                     "dup_reason": pa.array(np.where(isdup, "exact", None).tolist(),
                                                            pa.string()),
                                     "dup_group": pa.array(np.full(m, -1, np.int64)),
                                     "dup_distance": pa.array(np.full(m, -1, np.int16))}), d / part_name(k))
        n_ok, n_dup = n_ok + int(ok.sum()), n_dup + int(isdup.sum())
    result = StageResult("hashdedup", str(d), "planted-" + read_manifest(work / "ingest")["key"], counts={
        "in": n_ok, "out": n_ok - n_dup, "dropped": {"duplicate_exact": n_dup}, "planted": True})
    finish(result, {"planted": True}, {"ingest": read_manifest(work / "ingest")["key"]})
    return result.counts


def check_counts(stages: dict) -> list[str]:
    """What does not add up between stages (empty when every stage's input is the one before's output)."""
    c = {s: v.get("counts") for s, v in stages.items()}
    for stage in ("hashdedup", "cluster"):
        if stage not in c and f"planted_{stage}" in c:
            c[stage] = c[f"planted_{stage}"]
    c = {s: v for s, v in c.items() if v is not None}
    links = [("generate_ingest", "hashdedup"), ("balance", "shard_plan")]
    bad = [f"{b} in {c[b]['in']} != {a} out {c[a]['out']}" for a, b in links if a in c and b in c
           and c[a]["out"] != c[b]["in"]]
    if "hashdedup" in c and "generate_embed" in c and c["hashdedup"]["out"] != c["generate_embed"]["in"]:
        bad.append(f"embedded {c['generate_embed']['in']} != hashdedup out {c['hashdedup']['out']}")
    if "generate_embed" in c and "dedup" in c and c["dedup"]["in"] != c["generate_embed"]["in"]:
        bad.append(f"dedup in {c['dedup']['in']} != embedded {c['generate_embed']['in']}")
    if "dedup" in c and "cluster" in c and c["cluster"]["in"] != c["dedup"]["out"]:
        bad.append(f"cluster in {c['cluster']['in']} != dedup out {c['dedup']['out']}")
    if "cluster" in c and "balance" in c and c["balance"]["in"] != c["cluster"]["out"]:
        bad.append(f"balance in {c['balance']['in']} != cluster out {c['cluster']['out']}")
    for s, v in c.items():
        dropped = sum(v.get("dropped", {}).values()) if isinstance(v.get("dropped"), dict) else 0
        if v.get("in") is not None and v["in"] != v["out"] + dropped:
            bad.append(f"{s}: in {v['in']} != out {v['out']} + dropped {dropped}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--part-size", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k", type=int, default=16, help="neighbours per image in the copy graph")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--calibrate", action="store_true", help="only measure the per-core rates `curate plan` uses")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="stop a stage whose RSS passes this")
    ap.add_argument("--calibrate-dedup", action="store_true", help="only measure copy dedup's driver bytes per "
                    "record with an edge (the plan's dedup_node_bytes)")
    ap.add_argument("--ray-address", help="run the stages with executor ray on this running cluster "
                    "(`ray start --head`); the RSS measured is then the driver's")
    ap.add_argument("--calibrate-bands", action="store_true", help="only measure a hash band reduce task's bytes "
                    "and seconds per record")
    ap.add_argument("--calibrate-rounds", action="store_true", help="only count the copy graph's label rounds "
                    "per component shape and size")
    ap.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE (repeatable)")
    ap.add_argument("--compare", type=Path, help="scale.json of a smaller run: RSS and time ratios per stage")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.work, args)))
        return
    if args.calibrate:
        print(json.dumps({"bench": "scale-calibrate", **calibrate()}))
        return
    if args.calibrate_bands:
        print(json.dumps({"bench": "scale-calibrate-bands", **calibrate_bands()}))
        return
    if args.calibrate_dedup:
        print(json.dumps({"bench": "scale-calibrate-dedup", **calibrate_dedup()}))
        return
    if args.calibrate_rounds:
        print(json.dumps({"bench": "scale-calibrate-rounds", **calibrate_rounds()}))
        return
    from pipelines.config import load_config, to_yaml

    if args.work is None:
        ap.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    overrides = config_overrides(args.work, args.records, args.k, args.ray_address) + args.set
    (args.work / "scale.yaml").write_text(to_yaml(load_config(None, overrides)))
    result_path = args.work / "scale.json"
    done = json.loads(result_path.read_text()) if result_path.exists() else {"records": args.records, "stages": {}}
    for stage in args.stages.split(","):
        done["stages"][stage] = measure(stage, args.work, args)
        print(json.dumps(done["stages"][stage]), file=sys.stderr, flush=True)
        result_path.write_text(json.dumps(done, indent=1))
    done["mismatches"] = check_counts(done["stages"])
    if args.compare:
        small = json.loads(args.compare.read_text())
        done["ratios"] = {s: {"rss": round(v["peak_rss_mb"] / small["stages"][s]["peak_rss_mb"], 2),
                              "cpu": round(v["cpu_s"] / max(small["stages"][s]["cpu_s"], 0.1), 2),
                              "time": round(v["seconds"] / max(small["stages"][s]["seconds"], 0.1), 2)}
                          for s, v in done["stages"].items() if s in small["stages"]}
        done["compared_with"] = small["records"]
    result_path.write_text(json.dumps(done, indent=1))
    print(json.dumps({"bench": "scale", "cpus": os.cpu_count(), **done}))


if __name__ == "__main__":
    main()
