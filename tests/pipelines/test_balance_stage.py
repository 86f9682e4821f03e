"""The balance stage over a generated workdir (ingest and cluster parts, no images): the local and the
Ray executor write the same parts, byte for byte; a run killed mid-write reruns to the same bytes."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate.balance_parts as bp
from curate.balance import balanced_sample
from curate.parts import part_name, read_table
from pipelines.config import load_config
from pipelines.manifest import StageResult, finish
from pipelines.run import run_stage


def make_workdir(work, n=3000, part_size=400, seed=0):
    """ingest parts (ids) and cluster parts (3 levels, long-tailed leaves, 5% not clustered) with manifests."""
    rng = np.random.default_rng(seed)
    l1 = (rng.integers(0, 50, n) ** 2 // 50).astype(np.int32)
    paths = np.stack([l1, l1 // 5, l1 // 20], axis=1)
    sq = rng.random(n).astype(np.float32)
    clustered = rng.random(n) > 0.05
    for stage in ("ingest", "cluster"):
        (work / stage).mkdir(parents=True)
    for k, lo in enumerate(range(0, n, part_size)):
        hi = min(n, lo + part_size)
        ids = pa.array([f"{r:016x}" for r in range(lo, hi)])
        pq.write_table(pa.table({"id": ids, "status": pa.array(["ok"] * (hi - lo))}), work / "ingest" / part_name(k))
        mask = ~clustered[lo:hi]
        cols = {f"cluster_l{lv + 1}": pa.array(paths[lo:hi, lv], mask=mask) for lv in range(3)}
        pq.write_table(pa.table({"id": ids, **cols, "cluster_sq_dist": pa.array(sq[lo:hi], mask=mask)}),
                       work / "cluster" / part_name(k))
    for stage in ("ingest", "cluster"):
        finish(StageResult(stage, str(work / stage), f"made-{stage}", counts={"in": n, "out": n, "dropped": {}}),
               {}, {})
    return paths, sq, clustered


def config(work, *extra):
    return load_config(None, [f"workdir={work}", "balance.target=1100", "balance.levels=all", "balance.seed=3",
                              *extra])


def balance_files(work) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted((work / "balance").glob("part-*.parquet"))}
    m = json.loads((work / "balance" / "_MANIFEST.json").read_text())
    out["manifest"] = json.dumps([m["key"], m["counts"], m["config"]["report"]]).encode()
    return out


@pytest.mark.parametrize("strategy", ["r", "c"])
def test_balance_stage_writes_the_whole_table_selection(tmp_path, strategy):
    paths, sq, clustered = make_workdir(tmp_path)
    (res,) = run_stage("balance", config(tmp_path, f"balance.strategy={strategy}", "balance.multiplier=2"))
    rows = np.flatnonzero(clustered)
    want = balanced_sample(paths[rows], 1100, strategy=strategy, sq_dists=sq[rows], multiplier=2, seed=3, rows=rows)
    t = read_table(tmp_path / "balance")
    assert t.schema.names == ["id", "selected", "repeats", "selected_by", "seed_set", "seed_id", "seed_sim"]
    got = np.array(t.column("repeats").to_pylist(), dtype=object)
    assert np.array_equal(got[rows].astype(np.int64), want.counts) and all(x is None for x in got[~clustered])
    assert res.counts == {"in": len(rows), "out": int(want.selected.sum()), "target": 1100, "shortfall": 0,
                          "dropped": {"not_selected": len(rows) - int(want.selected.sum())}}
    by = np.array(t.column("selected_by").to_pylist(), dtype=object)[rows]
    assert (by[want.selected] == want.selected_by[want.selected]).all() and all(x is None for x in by[~want.selected])


def test_a_run_killed_while_writing_reruns_to_the_same_bytes(tmp_path, monkeypatch):
    make_workdir(tmp_path / "ref")
    run_stage("balance", config(tmp_path / "ref"))
    reference = balance_files(tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "killed", ignore=shutil.ignore_patterns("balance"))
    write, calls = bp.write_part, []

    def dies_on_the_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return write(*args)

    monkeypatch.setattr(bp, "write_part", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_stage("balance", config(tmp_path / "killed"))
    assert len(list((tmp_path / "killed" / "balance").glob("part-*.parquet"))) == 3
    assert not (tmp_path / "killed" / "balance" / "_MANIFEST.json").exists()
    monkeypatch.setattr(bp, "write_part", write)
    run_stage("balance", config(tmp_path / "killed"))
    assert balance_files(tmp_path / "killed") == reference


@pytest.mark.slow
def test_ray_executor_writes_the_local_parts(tmp_path, monkeypatch):
    """A local Ray (2 CPUs): every pass runs as tasks over the parts; with thresholds that take histogram
    passes (small windows) and without, the parts and the report equal the local run's."""
    import ray

    make_workdir(tmp_path / "local")
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    shutil.copytree(tmp_path / "local", tmp_path / "ray-small")
    run_stage("balance", config(tmp_path / "local"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # not another session's Ray
    try:
        run_stage("balance", config(tmp_path / "ray", "executor=ray"))
        monkeypatch.setattr(bp, "WINDOW", 2)  # the driver's side of the thresholds (tasks only bin and collect)
        monkeypatch.setattr(bp, "HIST_CELLS", 64)
        run_stage("balance", config(tmp_path / "ray-small", "executor=ray"))
    finally:
        ray.shutdown()
    reference = balance_files(tmp_path / "local")
    assert balance_files(tmp_path / "ray") == reference
    assert balance_files(tmp_path / "ray-small") == reference
