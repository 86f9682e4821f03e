import json

import pyarrow.parquet as pq
import pytest

from curate.parts import read_table
from pipelines.synth import encode, make_image, reencode, resized
from pipelines.cli import main


def _pool(root):
    root.mkdir()
    for i in range(12):
        img = make_image(300 + i, (96, 80))
        data = encode(img, "PNG")
        (root / f"img{i:02d}.png").write_bytes(data)
        if i < 3:
            (root / f"copy{i:02d}.png").write_bytes(data)
        if 3 <= i < 6:
            (root / f"edit{i:02d}.jpg").write_bytes(reencode(resized(img, 1.5), 70))
    (root / "junk.jpg").write_bytes(b"\x00" * 100)


def test_ingest_hashdedup_shards_verify_end_to_end(tmp_path, capsys):
    _pool(tmp_path / "raw")
    w = str(tmp_path / "w")
    assert main(["ingest", str(tmp_path / "raw"), "--workdir", w, "--part-size", "5", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "in 19  ->  out 18" in out and "not_image" in out
    assert main(["hashdedup", "--workdir", w]) == 0
    assert "in 18  ->  out 12" in capsys.readouterr().out
    dd = {r["id"]: r for r in read_table(tmp_path / "w" / "hashdedup").to_pylist()}
    recs = {r["id"]: r for r in read_table(tmp_path / "w" / "ingest").to_pylist()}
    reasons = {recs[i]["uri"].rsplit("/", 1)[1]: r["dup_reason"] for i, r in dd.items() if r["dup_reason"]}
    # of identical bytes the smaller id is kept; a 1.5x edit has more pixels, so it beats its original
    assert sorted(reasons.values()) == ["exact"] * 3 + ["near"] * 3
    assert {n for n, r in reasons.items() if r == "near"} == {"img03.png", "img04.png", "img05.png"}
    for i, r in dd.items():
        if r["dup_reason"] == "near":
            assert recs[r["dup_of"]]["uri"].rsplit("/", 1)[1].startswith("edit")
    assert main(["shards", "--workdir", w, "--max-count", "5"]) == 0
    out = capsys.readouterr().out
    assert "in 12  ->  out 12" in out and "shards 3" in out
    assert main(["shards", "--verify", str(tmp_path / "w" / "shards")]) == 0
    assert "12 samples: OK" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "w" / "ingest" / "_MANIFEST.json").read_text())
    assert manifest["counts"]["in"] == manifest["counts"]["out"] + sum(manifest["counts"]["dropped"].values())
    assert len(pq.read_table(tmp_path / "w" / "shards" / "index.parquet")) == 12


def test_rerun_is_a_no_op_and_conflicts_are_refused(tmp_path, capsys):
    _pool(tmp_path / "raw")
    w = str(tmp_path / "w")
    args = ["ingest", str(tmp_path / "raw"), "--workdir", w, "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "already done, nothing to do" in capsys.readouterr().out
    assert main(args + ["--min-side", "100"]) == 2
    assert "use --force" in capsys.readouterr().err
    assert main(args + ["--min-side", "100", "--force"]) == 0
    assert "too_small" in capsys.readouterr().out


def test_typo_in_a_setting_is_an_error(tmp_path, capsys):
    _pool(tmp_path / "raw")
    # OmegaConf refuses keys that the schema does not have: one line, exit 2, nothing written
    assert main(["ingest", str(tmp_path / "raw"), "--workdir", str(tmp_path / "w"), "--set", "ingest.part_sise=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "part_sise" in err and "part_size" in err and "Traceback" not in err
    assert not (tmp_path / "w" / "ingest").exists()
    with pytest.raises(Exception, match="part_sise"):  # --debug shows the real exception
        main(["ingest", str(tmp_path / "raw"), "--workdir", str(tmp_path / "w"), "--set", "ingest.part_sise=3", "--debug"])


def test_config_defaults_match_the_library_and_the_demo_config_loads():
    from curate.hashing import DEFAULT_MAX_DISTANCE
    from pipelines.config import Config, load_config
    from pipelines.demo import DEMO_CONFIG

    assert Config().hashdedup.phash_max_distance == DEFAULT_MAX_DISTANCE
    cfg = load_config(DEMO_CONFIG, ["shards.max_count=7"])
    assert cfg.ingest.part_size == 500 and cfg.shards.max_count == 7


def test_run_executes_stages_in_order_and_skips_done_ones(tmp_path, capsys):
    _pool(tmp_path / "raw")
    (tmp_path / "c.yaml").write_text(f"workdir: {tmp_path / 'w'}\ningest:\n  sources: [{tmp_path / 'raw'}]\n"
                                     "  workers: 1\nembed:\n  num_workers: 0\n  model: 'pixels:8'\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--until", "hashdedup"]) == 0
    out = capsys.readouterr().out
    assert "[ingest] done" in out and "[hashdedup] done" in out and "embed" not in out
    assert main(["run", str(tmp_path / "c.yaml"), "shards.max_count=5"]) == 0
    out = capsys.readouterr().out
    assert "[ingest] already done" in out and "[hashdedup] already done" in out
    assert "[embed/pixels-8] done" in out and "shards 3" in out
    assert "max_count: 5" in (tmp_path / "w" / "config.yaml").read_text()
    assert main(["run", str(tmp_path / "c.yaml"), "--from", "embed", "--until", "ingest"]) == 2


def test_paper_scale_config_loads():
    from pathlib import Path

    from pipelines.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "lvd142m.yaml")
    assert [lv.n_clusters for lv in cfg.cluster.levels] == [10_000_000, 500_000, 50_000, 10_000]
    assert cfg.balance.target == 142_000_000 and cfg.executor == "ray"
