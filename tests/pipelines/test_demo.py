"""`curate demo` end to end on a small pool: curation, decontamination of the leaked evaluation
images, training, k-NN evaluation and the summary."""

import json
import math

import pytest

from pipelines.cli import main

pytestmark = pytest.mark.slow


def test_demo_curates_trains_and_evaluates(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "d"), "--pool-size", "150", "--train-iters", "4"]) == 0
    out = capsys.readouterr().out
    assert "[verify]" in out and ": OK" in out
    assert "[eval] k-NN accuracy on the labelled evaluation set: k=10:" in out
    assert "classes (labels never shown to the pipeline; entropy / ln" in out and "curated" in out
    decontam = json.loads((tmp_path / "d" / "work" / "decontaminate" / "_MANIFEST.json").read_text())
    assert decontam["counts"]["dropped"]["contaminated_direct"] >= 10  # one leaked copy per class
    report = json.loads((tmp_path / "d" / "work" / "report" / "report.json").read_text())
    assert report["funnel"]["reconcile"]["ok"]


def test_class_balance_counts_absent_classes():
    from pipelines.demo import class_balance

    assert class_balance([0, 0, 1, 1], 4) == {"images": 4, "entropy": 0.5, "max_min": 1.0, "absent": 2}
    assert class_balance([0, 1, 2, 2], 3)["entropy"] == round(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(3), 3)
