"""The curation report on a small demo workdir: figures reconcile, the HTML is self-contained and renders."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipelines.demo import run_demo
from pipelines.stages.report import write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """A demo workdir on a 150-image pool and its written report (json figures, html text)."""
    root = tmp_path_factory.mktemp("report")
    assert run_demo(str(root / "d"), pool_size=150) == 0
    work = root / "d" / "work"
    paths = write_report(work)
    assert Path(paths["json"]).parent == work / "report"
    return Path(paths["html"]), json.loads(Path(paths["json"]).read_text()), Path(paths["html"]).read_text()


def test_funnel_reconciles(report: tuple[Path, dict, str]) -> None:
    _, rep, _ = report
    stages = rep["funnel"]["stages"]
    assert [s["stage"] for s in stages][:2] == ["ingest", "hashdedup"]
    for s in stages:
        assert s["in"] == s["out"] + sum(s["dropped"].values())
    for prev, cur in zip(stages, stages[1:]):
        assert cur["in"] == prev["out"]
    r = rep["funnel"]["reconcile"]
    assert r["ok"] is True
    assert r["ingest_in"] == r["final_out"] + sum(sum(s["dropped"].values()) for s in stages)
    assert r["final_out"] == stages[-1]["out"]


def test_figures_add_up(report: tuple[Path, dict, str]) -> None:
    _, rep, _ = report
    stages = {s["stage"]: s for s in rep["funnel"]["stages"]}
    ok = rep["images"]["ok"]
    assert ok == stages["ingest"]["out"]
    assert sum(rep["images"]["short_side"]["counts"]) == ok
    assert sum(rep["images"]["aspect_ratio"]["counts"]) == ok
    hd = rep["duplicates"]["hash"]
    assert hd["dropped"] == stages["hashdedup"]["in"] - stages["hashdedup"]["out"]
    assert sum(int(k) * v for k, v in hd["size_distribution"].items()) == hd["records_in_groups"]
    cl = rep["clusters"]
    assert sum(cl["before"]["sizes"].values()) == cl["clustered"] == stages["cluster"]["out"]
    assert sum(cl["after"]["sizes"].values()) == cl["after"]["selected"] == stages["balance"]["out"]
    for key in ("before", "after"):
        assert 0.0 <= cl[key]["gini"] <= 1.0 and 0.0 <= cl[key]["entropy"] <= 1.0
    smp = rep["samples"]
    assert smp["clusters"] and all(c["ids"] for c in smp["clusters"])
    assert smp["pairs"] and all(p["keeper"] != p["dropped"] for p in smp["pairs"])


def test_html_is_self_contained(report: tuple[Path, dict, str]) -> None:
    _, _, text = report
    for ref in ("http://", "https://", 'src="/', "file:"):
        assert ref not in text
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) == text.count("<img") > 0
    for src in srcs:
        m = re.match(r"data:image/(png|jpeg);base64,(.+)$", src)
        assert m, src[:40]
        with Image.open(io.BytesIO(base64.b64decode(m.group(2)))) as im:
            im.load()
            assert im.width > 0 and im.height > 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_html_renders_in_chromium(report: tuple[Path, dict, str], tmp_path: Path) -> None:
    html_path, _, _ = report
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           html_path.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    ok = re.search(r'data-images-ok="(\d+)"', body.group(1))
    total = re.search(r'data-images-total="(\d+)"', body.group(1))
    assert ok and total, body.group(0)
    assert int(ok.group(1)) == int(total.group(1)) > 0


def test_missing_stages_are_skipped(report: tuple[Path, dict, str], tmp_path: Path) -> None:
    html_path, _, _ = report
    work = html_path.parent.parent
    partial = tmp_path / "work"
    skip = shutil.ignore_patterns("embed", "dedup", "decontaminate", "cluster", "balance", "shards", "report")
    shutil.copytree(work, partial, ignore=skip)
    paths = write_report(partial, tmp_path / "out")
    rep = json.loads(Path(paths["json"]).read_text())
    assert [s["stage"] for s in rep["funnel"]["stages"]] == ["ingest", "hashdedup"]
    assert rep["funnel"]["reconcile"]["ok"] is True
    assert rep["clusters"] is None and rep["decontamination"] is None and "copy" not in rep["duplicates"]
    assert rep["samples"]["clusters"] == [] and rep["samples"]["pairs"]
    text = Path(paths["html"]).read_text()
    assert "Clusters" not in text and "Duplicate pairs" in text
