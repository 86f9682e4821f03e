"""dedup -> decontaminate -> shards through the stage runners, and `curate dedup --calibrate`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.parts import read_table
from pipelines.synth import encode, make_image, reencode, resized
from pipelines.cli import main
from pipelines.config import EvalSetConfig, load_config
from pipelines.run import run_pipeline


@pytest.fixture
def cfg(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(50):
        img = make_image(4000 + i, (72, 72))
        (raw / f"{i:03d}.png").write_bytes(encode(img, "PNG"))
        if i < 6:  # edited copies that pHash is told to ignore, so the embedding must catch them
            (raw / f"{i:03d}-copy.jpg").write_bytes(reencode(resized(img, 1.3), 80))
    c = load_config(None, [f"workdir={tmp_path / 'w'}", "ingest.workers=1", "embed.num_workers=0",
                           "embed.model=pixels:16", "hashdedup.phash_max_distance=-1", "dedup.threshold=0.9"])
    c.ingest.sources = [str(raw)]
    return c


def _names(tmp_path, stage, pred):
    uri = {r["id"]: r["uri"].rsplit("/", 1)[1] for r in read_table(tmp_path / "w" / "ingest").to_pylist()}
    return {uri[r["id"]] for r in read_table(tmp_path / "w" / stage).to_pylist() if pred(r)}


def test_copies_are_grouped_and_left_out_of_the_shards(cfg, tmp_path):
    results = {r.stage: r for r in run_pipeline(cfg)}
    assert results["dedup"].counts["dropped"] == {"copy_duplicate": 6}
    dropped = _names(tmp_path, "dedup", lambda r: r["copy_of"] is not None)
    assert dropped == {f"{i:03d}.png" for i in range(6)}  # the 1.3x copies have more pixels: they are kept
    groups = pq.read_table(tmp_path / "w" / "dedup" / "groups.parquet")
    assert groups.num_rows == 6 and set(groups.column("size").to_pylist()) == {2}
    assert results["shards"].counts["out"] == 50


def test_decontamination_removes_the_copies_of_an_eval_set_and_their_components(cfg, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    for i in (2, 30, 41):  # image 2 also has a pool copy: both leave
        (ev / f"e{i}.jpg").write_bytes(reencode(resized(make_image(4000 + i, (72, 72)), 0.9), 85))
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="bench", source=str(ev))]
    cfg.decontaminate.threshold = 0.9  # thresholds are per model: distinct images reach ~0.8 in pixel space
    results = {r.stage: r for r in run_pipeline(cfg)}
    gone = _names(tmp_path, "decontaminate", lambda r: r["contaminated"])
    assert gone == {"002.png", "002-copy.jpg", "030.png", "041.png"}
    # 002.png already left as a copy of 002-copy.jpg, so the decontaminate funnel counts the other 3
    assert sum(results["decontaminate"].counts["dropped"].values()) == 3
    matches = pq.read_table(tmp_path / "w" / "decontaminate" / "matches-bench.parquet").to_pylist()
    assert all(m["sim"] > 0.9 for m in matches) and len({m["eval_id"] for m in matches}) == 3
    # the summary names the real file of each set, not a placeholder
    assert results["decontaminate"].outputs["matches[bench]"] == str(tmp_path / "w" / "decontaminate" / "matches-bench.parquet")
    assert results["shards"].counts["out"] == 50 - 3  # groups: 002's whole component, 030 and 041


def test_calibrate_recommends_a_threshold(cfg, tmp_path, capsys):
    run_pipeline(cfg, until="embed")
    cfg_args = ["dedup", "--workdir", str(tmp_path / "w"), "--calibrate", "--set", "dedup.calibrate_sample=30",
                "--set", "embed.model=pixels:16"]
    assert main(cfg_args) == 0
    out = capsys.readouterr().out
    assert "recommended threshold" in out or "no threshold reaches" in out
    assert "| hash or verified |" in out and "recommended: --verify" in out and "ms per candidate pair" in out
    summary = json.loads((tmp_path / "w" / "dedup_calibration" / "pixels-16.json").read_text())
    assert summary["positives"] == 30 and summary["target_precision"] == 0.95
    methods = summary["methods"]["by_method"]
    assert set(methods) == {"hash", "embedding", "verified", "hash or verified", "hash or embedding"}
    assert methods["hash"]["jpeg"]["fn"] + methods["hash"]["jpeg"]["tp"] == 30 // 8 + (30 % 8 > 2)


def test_decontamination_without_copy_dedup(cfg, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "e7.jpg").write_bytes(reencode(resized(make_image(4007, (72, 72)), 0.9), 85))
    cfg.dedup.threshold = 1.0  # dedup off: every image is its own component
    cfg.decontaminate.threshold = 0.9
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="bench", source=str(ev))]
    results = {r.stage: r for r in run_pipeline(cfg)}
    assert "dedup" not in results
    assert _names(tmp_path, "decontaminate", lambda r: r["contaminated"]) == {"007.png"}
    assert results["shards"].counts["out"] == 56 - 1


def test_refusal_commits_nothing_and_names_the_settings(cfg, tmp_path, capsys):
    run_pipeline(cfg, until="embed")
    w = tmp_path / "w"
    args = ["dedup", "--workdir", str(w), "--set", "embed.model=pixels:16", "--set", "hashdedup.phash_max_distance=-1",
            "--verify", "none"]
    assert main([*args, "--threshold", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("curate dedup: error: copy dedup refused (cosine > 0.2): largest component ")
    assert "max_component_share >= 0.982 and max_removed_share >= 0.964" in err
    assert sorted(p.name for p in (w / "dedup").iterdir()) == []  # no parts, no manifest, no start marker
    assert main([*args, "--threshold", "0.2", "--set", "dedup.max_component_share=1",
                 "--set", "dedup.max_removed_share=1"]) == 0  # the named settings allow it
    manifest = json.loads((w / "dedup" / "_MANIFEST.json").read_text())
    assert manifest["counts"]["largest_component"] > 28


def test_auto_threshold_is_calibrated_on_the_pool_and_recorded(cfg, tmp_path):
    run_pipeline(cfg, until="embed")
    w = tmp_path / "w"
    assert main(["dedup", "--workdir", str(w), "--set", "embed.model=pixels:16", "--set", "hashdedup.phash_max_distance=-1",
                 "--set", "dedup.calibrate_sample=30", "--verify", "none", "--threshold", "auto"]) == 0
    manifest = json.loads((w / "dedup" / "_MANIFEST.json").read_text())
    choice = manifest["config"]["threshold_choice"]
    assert choice["threshold_how"] == "calibrated on pool" and choice["calibration_positives"] == 30
    assert manifest["config"]["threshold"] is None
    assert manifest["config"]["stats"]["threshold"] == choice["threshold"] < 0.9  # not DINOv2's 0.6
    assert _names(tmp_path, "dedup", lambda r: r["copy_of"] is not None) == {f"{i:03d}.png" for i in range(6)}
    assert manifest["counts"]["decision"] == f"cosine > {choice['threshold']}"


def test_local_verification_is_the_default_and_finds_flips_and_crops(tmp_path):
    from PIL import ImageOps

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(24):
        img = make_image(6000 + i, (256, 192), n_shapes=30)
        (raw / f"{i:03d}.png").write_bytes(encode(img, "PNG"))
        if i < 3:
            (raw / f"{i:03d}-flip.png").write_bytes(encode(ImageOps.mirror(img), "PNG"))
        elif i < 6:
            (raw / f"{i:03d}-crop.png").write_bytes(encode(img.crop((30, 20, 230, 170)), "PNG"))
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "ingest.workers=1", "embed.num_workers=0",
                             "embed.model=pixels:16", "hashdedup.phash_max_distance=-1", "dedup.threshold=0.95"])
    cfg.ingest.sources = [str(raw)]
    ev = tmp_path / "eval"
    ev.mkdir()  # a flipped and a cropped copy of two pool images: decontamination uses the same verifier
    (ev / "e10.png").write_bytes(encode(ImageOps.mirror(make_image(6010, (256, 192), n_shapes=30)), "PNG"))
    (ev / "e11.jpg").write_bytes(reencode(make_image(6011, (256, 192), n_shapes=30).crop((16, 8, 240, 184)), 85))
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="bench", source=str(ev))]
    results = {r.stage: r for r in run_pipeline(cfg)}
    assert _names(tmp_path, "decontaminate", lambda r: r["contaminated"]) == {"010.png", "011.png"}
    uri = {r["id"]: r["uri"].rsplit("/", 1)[1] for r in read_table(tmp_path / "w" / "ingest").to_pylist()}
    groups = pq.read_table(tmp_path / "w" / "dedup" / "groups.parquet").to_pylist()
    assert sorted(sorted(uri[m] for m in g["members"]) for g in groups) == [
        [f"{i:03d}-{'flip' if i < 3 else 'crop'}.png", f"{i:03d}.png"] for i in range(6)]
    assert results["dedup"].counts["decision"].startswith("local verification")
    manifest = json.loads((tmp_path / "w" / "dedup" / "_MANIFEST.json").read_text())
    assert manifest["config"]["verify"] == "local" and manifest["config"]["linked"]["verified"] == 6
    assert manifest["config"]["verify_stats"]["ms_per_pair"] > 0
    assert manifest["config"]["threshold_choice"]["threshold_how"] == "given"
    assert manifest["config"]["verify_settings"]["max_side"] == 512

    # cut into jobs, as Ray tasks run them (executor ray), hashing and verification give the same values
    import numpy as np

    from curate.dedup import local_map
    from pipelines.aligned import RowMap
    from pipelines.copy_images import content_hashes, verify_image_pairs, verify_settings

    ingest, emb_dir = tmp_path / "w" / "ingest", tmp_path / "w" / "embed" / "pixels-16"
    emb_rows = RowMap(ingest, emb_dir).emb_rows
    whole, cut = content_hashes(ingest, emb_rows, rows_per_job=10**6), content_hashes(ingest, emb_rows, local_map, 7)
    assert whole[2].all() and all(np.array_equal(x, y) for x, y in zip(whole[:3], cut[:3]))
    rng = np.random.default_rng(0)
    n = len(emb_rows)
    i, j = rng.integers(0, n, 40), rng.integers(0, n, 40)  # both orders of a pair, in no order
    keep = i != j
    i, j = i[keep], j[keep]
    one = verify_image_pairs([(ingest, emb_rows)], i, j, verify_settings(cfg))
    jobs = verify_image_pairs([(ingest, emb_rows)], i, j, verify_settings(cfg), local_map, pairs_per_job=3)
    assert jobs.stats["pieces"] == -(-len(i) // 3) and one.stats["pieces"] == 1
    assert np.array_equal(one.i, np.minimum(i, j)) and np.array_equal(one.j, np.maximum(i, j))
    for name in ("i", "j", "verified", "inliers", "share", "mirrored", "keypoints", "abstained"):
        assert np.array_equal(getattr(one, name), getattr(jobs, name)), name
    assert one.reason == jobs.reason and one.stats["images"] == jobs.stats["images"]


def test_eval_set_changes_and_unrun_or_stale_decontamination_are_never_silent(cfg, tmp_path):
    """Images added to an evaluation set redo decontamination; a configured decontamination that has
    not run, or that ran before the copy dedup now finished, stops the stages after it."""
    from pipelines.run import run_stage

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "e30.jpg").write_bytes(reencode(resized(make_image(4030, (72, 72)), 0.9), 85))
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="bench", source=str(ev))]
    cfg.decontaminate.threshold = 0.9
    for stage in ("ingest", "hashdedup", "embed"):
        run_stage(stage, cfg)
    with pytest.raises(RuntimeError, match="decontaminate is configured"):
        run_stage("shards", cfg)  # would ship 030.png, the copy of an evaluation image
    run_stage("decontaminate", cfg)  # before copy dedup
    run_stage("dedup", cfg)
    with pytest.raises(RuntimeError, match="redo it"):
        run_stage("shards", cfg)
    (res,) = run_stage("decontaminate", cfg, force=True)
    assert _names(tmp_path, "decontaminate", lambda r: r["contaminated"]) == {"030.png"}
    (ev / "e41.jpg").write_bytes(reencode(resized(make_image(4041, (72, 72)), 0.9), 85))
    with pytest.raises(Exception, match="other settings or inputs"):
        run_stage("decontaminate", cfg)  # the set changed: not "already done"
    run_stage("decontaminate", cfg, force=True)
    assert _names(tmp_path, "decontaminate", lambda r: r["contaminated"]) == {"030.png", "041.png"}
    (shards,) = run_stage("shards", cfg)
    assert shards.counts["out"] == 50 - 2


def test_local_dedup_goes_on_when_calibration_finds_no_cosine(tmp_path):
    """A pool too small (or too uniform) to calibrate a cosine on: local verification still decides
    what it can judge, pairs too flat to judge are not linked, and the summary says so."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "only.png").write_bytes(encode(make_image(1, (72, 72)), "PNG"))
    c = load_config(None, [f"workdir={tmp_path / 'w'}", "ingest.workers=1", "embed.num_workers=0",
                           "embed.model=pixels:16"])
    c.ingest.sources = [str(raw)]
    results = {r.stage: r for r in run_pipeline(c, until="dedup")}
    dedup = results["dedup"]
    assert dedup.counts["in"] == dedup.counts["out"] == 1
    assert any("pairs too flat to verify are not linked" in n for n in dedup.notes)
    manifest = json.loads((tmp_path / "w" / "dedup" / "_MANIFEST.json").read_text())
    assert manifest["config"]["threshold_choice"]["threshold_how"] == "none (calibration found none)"


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_dedup_parts_equal_the_whole_table_copy_dedup(cfg, tmp_path, executor):
    """The stage holds only the records with an edge and writes part by part (as Ray tasks with
    executor ray); its parts and groups are the bytes of copy_dedup over every record written whole."""
    import numpy as np
    import pyarrow.compute as pc

    from curate.dedup import copy_dedup
    from curate.index import IndexSpec
    from curate.parts import list_parts
    from pipelines.aligned import RowMap, embedding_ids
    from pipelines.embedding import resolve_embedding

    (tmp_path / "raw" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # an ingest row with no embedding
    cfg.ingest.part_size = 16  # several parts, most with some group members, the broken row in one
    cfg.dedup.verify = "none"
    cfg.executor = executor
    if executor == "ray":
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        res = {r.stage: r for r in run_pipeline(cfg, until="dedup")}["dedup"]
    finally:
        if executor == "ray":
            ray.shutdown()
    w = tmp_path / "w"
    emb = resolve_embedding(cfg, None)
    rows = RowMap(w / "ingest", emb)
    assert len(rows.emb_rows) < rows.n and len(list_parts(w / "ingest")) >= 3
    width, height = (pc.fill_null(rows.column(w / "ingest", c), 0).to_numpy().astype(np.int64) for c in ("width", "height"))
    whole = copy_dedup(str(emb), embedding_ids(emb), (width * height)[rows.emb_rows], k=cfg.dedup.k, threshold=0.9,
                       index_spec=IndexSpec(kind=cfg.dedup.index, nprobe=cfg.dedup.nprobe))
    assert whole.stats["dropped"] == res.counts["dropped"]["copy_duplicate"] == 6
    rows.write(tmp_path / "whole", rows.emb_rows, {
        "copy_of": (whole.dup_of, pa.string()), "copy_group": (whole.group, pa.int64()),
        "copy_max_sim": (whole.max_sim, pa.float32())})
    stage = list_parts(w / "dedup")
    assert [p.name for p in stage] == [p.name for p in list_parts(tmp_path / "whole")]
    for p in stage:
        assert p.read_bytes() == (tmp_path / "whole" / p.name).read_bytes(), p.name
    whole_groups = tmp_path / "groups.parquet"
    pq.write_table(whole.groups, whole_groups)
    assert pq.read_table(w / "dedup" / "groups.parquet").equals(pq.read_table(whole_groups))


def test_decontaminate_parts_equal_the_whole_table_decontamination(cfg, tmp_path):
    """The stage holds only the removed records and writes part by part (Ray tasks with executor ray): its
    parts and matches are the bytes of decontaminate over every record, written whole."""
    import numpy as np
    import pyarrow.compute as pc
    import ray

    from curate.decontam import decontaminate
    from curate.index import IndexSpec
    from curate.parts import list_parts
    from pipelines.aligned import RowMap, embedding_ids
    from pipelines.embedding import embed_reference_set, resolve_embedding
    from pipelines.run import run_stage

    ev = tmp_path / "eval"
    ev.mkdir()
    for i in (2, 30, 41):  # 2 has a pool copy: its component goes too
        (ev / f"e{i}.jpg").write_bytes(reencode(resized(make_image(4000 + i, (72, 72)), 0.9), 85))
    (tmp_path / "raw" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # an ingest row with no embedding
    cfg.decontaminate.eval_sets = [EvalSetConfig(name="bench", source=str(ev))]
    cfg.decontaminate.threshold, cfg.dedup.verify, cfg.ingest.part_size = 0.9, "none", 16
    results = {r.stage: r for r in run_pipeline(cfg, until="decontaminate")}
    w = tmp_path / "w"
    emb = resolve_embedding(cfg, None)
    rows = RowMap(w / "ingest", emb)
    assert len(rows.emb_rows) < rows.n and len(list_parts(w / "ingest")) >= 3
    group = pc.fill_null(rows.column(w / "dedup", "copy_group"), -1).to_numpy().astype(np.int64)[rows.emb_rows]
    alive = pc.is_null(rows.column(w / "dedup", "copy_of")).to_numpy(zero_copy_only=False)[rows.emb_rows]
    ids = embedding_ids(emb)
    sets = {"bench": embed_reference_set(cfg, emb, "bench", str(ev), w / "decontaminate" / "eval_sets" / "bench")}
    whole = decontaminate(str(emb), ids, group, sets, threshold=0.9, index_spec=IndexSpec(kind="auto", nprobe=cfg.dedup.nprobe))
    contam_set = np.where(whole.keep, None, "bench").astype(object)
    rows.write(tmp_path / "whole", rows.emb_rows, {
        "contaminated": (~whole.keep, pa.bool_()), "contam_reason": (whole.reason, pa.string()),
        "contam_set": (contam_set.tolist(), pa.string())})
    counts = results["decontaminate"].counts
    assert counts["in"] == int(alive.sum()) and counts["out"] == int((alive & whole.keep).sum())
    reason = np.array(whole.reason, dtype=object)
    expected = {f"contaminated_{r}": int((alive & (reason == r)).sum()) for r in ("direct", "component")}
    assert counts["dropped"] == {k: v for k, v in expected.items() if v} and sum(expected.values()) == 3

    def same_bytes():
        stage = list_parts(w / "decontaminate")
        assert [p.name for p in stage] == [p.name for p in list_parts(tmp_path / "whole")]
        assert all(p.read_bytes() == (tmp_path / "whole" / p.name).read_bytes() for p in stage)
        assert pq.read_table(w / "decontaminate" / "matches-bench.parquet").equals(whole.pairs["bench"])

    same_bytes()
    cfg.executor = "ray"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        [again] = run_stage("decontaminate", cfg, force=True)
    finally:
        ray.shutdown()
    assert again.counts == counts
    same_bytes()
