"""The ingest planner under executor ray counts names on one actor per node: the plan is the local plan's, byte
for byte, and a holder lost with its node makes a fresh plan, not a wrong one."""

from __future__ import annotations

import numpy as np
import pytest


def _url_list(path, n: int = 3000, distinct: int = 1700) -> str:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.writelines(f"http://127.0.0.1:9/img/{i}.jpg\n" for i in rng.integers(0, distinct, n))
    return str(path)


def _files(d) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_ray_plan_counts_names_on_actors_and_survives_losing_one(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import ray
    from ray.exceptions import RayActorError

    from curate.ingest import plan
    from pipelines.stages import ingest as stage

    urls = _url_list(tmp_path / "urls.txt")
    assert plan([urls], tmp_path / "local", 400) == 8
    want = _files(tmp_path / "local" / "_plan")
    statuses = [s for part in sorted((tmp_path / "local" / "_plan").glob("part-*.parquet"))
                for s in pq.read_table(part).column("status").to_pylist()]
    assert 1500 < statuses.count("duplicate_uri") < 1700  # ~1,600 repeats, numbered by the count of names

    made = []
    real = stage.ray_seen

    def loses_a_holder(address):
        seen, actors = real(address)
        made.append(actors)
        if len(made) == 1:  # the first plan's holder dies after a few parts
            inner, calls = seen.take_parts, []

            def take_parts(keys):
                calls.append(1)
                if len(calls) == 3:
                    ray.kill(actors[0], no_restart=True)
                    with pytest.raises(RayActorError):  # dead before the next count is asked of it
                        ray.get(actors[0].take.remote(np.zeros(0, dtype=np.uint64)))
                return inner(keys)

            seen.take_parts = take_parts
        return seen, actors

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert stage.ray_plan([urls], tmp_path / "ray", 400, None) == 8
        monkeypatch.setattr(stage, "ray_seen", loses_a_holder)
        assert stage.ray_plan([urls], tmp_path / "ray2", 400, None) == 8
    finally:
        ray.shutdown()
    assert len(made) == 2  # the lost holder's plan was dropped and made again on fresh actors
    assert _files(tmp_path / "ray" / "_plan") == want and _files(tmp_path / "ray2" / "_plan") == want
