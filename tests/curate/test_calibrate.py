"""Tests for curate.calibrate: edited copies, precision/recall tables, threshold recommendation."""

from __future__ import annotations

import numpy as np
import pytest

from curate.calibrate import (
    COPY_DESCRIPTOR_THRESHOLD,
    EDITS,
    ThresholdChoice,
    apply_edit,
    calibration_pairs,
    choose_threshold,
    comparison_markdown,
    compare_methods,
    evaluate_embedder,
    make_calibration_set,
    precision_recall,
    recommend_threshold,
)
from pipelines.synth import make_image
from tests.curate.test_dedup import pixels_embed, vit_embed

POS = [0.9, 0.8, 0.7, 0.4]
NEG = [0.75, 0.5, 0.3, 0.1]
GRID = [0.0, 0.35, 0.5, 0.7, 0.75, 0.85, 0.95]


def test_precision_recall_exact_values():
    t = precision_recall(POS, NEG, GRID)
    assert t.threshold.tolist() == GRID
    assert t.tp.tolist() == [4, 4, 3, 2, 2, 1, 0]
    assert t.fp.tolist() == [4, 2, 1, 1, 0, 0, 0]  # strict: the negative at 0.5 is not above 0.5
    assert t.fn.tolist() == [0, 0, 1, 2, 2, 3, 4]
    assert t.recall.tolist() == [1.0, 1.0, 0.75, 0.5, 0.5, 0.25, 0.0]
    assert np.allclose(t.precision[:-1], [0.5, 4 / 6, 0.75, 2 / 3, 1.0, 1.0])  # not monotonic
    assert np.isnan(t.precision[-1])  # nothing predicted
    assert recommend_threshold(t, 0.95) == 0.75
    assert recommend_threshold(t, 0.7) == 0.5
    assert recommend_threshold(t, 0.5) == 0.0
    assert recommend_threshold(t, 1.01) is None
    assert t.to_arrow().num_rows == len(GRID) and t.at(0.74)["threshold"] == 0.75
    assert "| 0.7500 | 1.0000 | 0.5000 | 2 | 0 | 2 |" in t.markdown([0.75])


def test_precision_recall_monotonic_on_random_scores():
    rng = np.random.default_rng(0)
    pos, neg = np.clip(rng.normal(0.8, 0.1, 500), -1, 1), np.clip(rng.normal(0.3, 0.2, 5000), -1, 1)
    t = precision_recall(pos, neg)
    assert np.all(np.diff(t.threshold) > 0)
    for col in (t.tp, t.fp, t.recall):
        assert np.all(np.diff(col) <= 0)
    assert np.all(t.tp + t.fn == len(pos))
    assert t.recall[0] == 1.0 and t.recall[-1] == 0.0
    best = recommend_threshold(t, 0.95)
    row = t.at(best)
    assert row["precision"] >= 0.95
    below = t.threshold < best
    assert not np.any((t.precision[below] >= 0.95) & (t.tp[below] > 0))  # the best recall at 0.95


def test_calibration_set_is_deterministic_and_covers_every_edit():
    images = [make_image(s, (96 + 8 * s, 80)) for s in range(8)]
    a = make_calibration_set(images, seed=3, copies_per_image=2)
    b = make_calibration_set(images, seed=3, copies_per_image=2)
    assert [(i, e) for i, _, e in a] == [(i, e) for i, _, e in b]
    assert all(x.tobytes() == y.tobytes() for (_, x, _), (_, y, _) in zip(a, b))
    assert [i for i, _, _ in a] == [i // 2 for i in range(16)]
    assert sorted({e for _, _, e in a}) == sorted(EDITS)
    for idx, img, edit in a:
        src = images[idx]
        assert img.mode == "RGB" and img.tobytes() != src.tobytes()
        if edit == "crop":
            assert 0.45 <= img.width * img.height / (src.width * src.height) <= 0.92
        if edit == "pad":
            assert img.width > src.width and img.height > src.height
        if edit in ("jpeg", "jitter", "flip", "overlay", "blur"):
            assert img.size == src.size
    with pytest.raises(ValueError, match="unknown edit"):
        apply_edit(images[0], "rotate", np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_calibration_set(images, copies_per_image=len(EDITS) + 1)


def test_calibration_pairs_hard_and_random_negatives():
    rng = np.random.default_rng(1)
    orig = rng.standard_normal((30, 8))
    orig /= np.linalg.norm(orig, axis=1, keepdims=True)
    copy_of = np.array([0, 5, 5, 29])
    copies = orig[copy_of] + 0.05 * rng.standard_normal((4, 8))
    pos, hard, rand = calibration_pairs(orig, copies, copy_of, k_hard=3, n_random=4, seed=0)
    sims = copies @ orig.T
    assert np.allclose(pos, sims[np.arange(4), copy_of])
    assert hard.shape == (12,) and rand.shape == (16,)
    for r in range(4):
        others = np.delete(sims[r], copy_of[r])
        assert np.allclose(hard[3 * r : 3 * r + 3], np.sort(others)[::-1][:3])
        assert np.all(rand[4 * r : 4 * r + 4] <= hard[3 * r + 2] + 1e-12)


@pytest.mark.parametrize("which", ["pixels", "vit"])
def test_recommended_threshold_reaches_target(which):
    originals = [make_image(300 + s, (128, 96)) for s in range(40)]
    copies = make_calibration_set(originals, seed=2, copies_per_image=2)
    embed = pixels_embed() if which == "pixels" else vit_embed()
    report = evaluate_embedder(embed, originals, copies, target_precision=0.95)
    assert report.recommended is not None
    row = report.table.at(report.recommended)
    assert row["precision"] >= 0.95 and row["recall"] > 0.3
    summary = report.summary()
    assert summary["positives"] == 80 and summary["negatives"] == 80 * 10
    assert summary["recall_by_edit"]["jpeg"] == 1.0 and summary["recall_by_edit"]["resize"] == 1.0
    strict = evaluate_embedder(embed, originals, copies, target_precision=1.0)
    assert strict.recommended is None or strict.recommended >= report.recommended


def test_choose_threshold_sources():
    assert choose_threshold("pixels:16", 0.9) == ThresholdChoice(0.9, "given", {"spec": "pixels:16"})
    sscd = choose_threshold("torchscript:/m/sscd.pt", copy_descriptor=True)
    assert (sscd.threshold, sscd.how) == (COPY_DESCRIPTOR_THRESHOLD, "copy descriptor") and sscd.threshold == 0.6
    known = {"timm:foo": 0.7}
    for spec in ("timm:foo", "timm:foo:/w/foo.safetensors"):
        assert choose_threshold(spec, known=known).manifest() == {
            "threshold": 0.7, "threshold_how": "known", "spec": spec, "known_as": "timm:foo"}
    with pytest.raises(ValueError, match="no known copy threshold for 'timm:foobar'"):
        choose_threshold("timm:foobar", known=known)
    with pytest.raises(ValueError, match="no known copy threshold for 'pixels:16'"):
        choose_threshold("pixels:16")  # weights-free embedders are calibrated on the pool


def test_choose_threshold_calibrates_on_the_pool():
    originals = [make_image(300 + s, (128, 96)) for s in range(30)]
    copies = make_calibration_set(originals, seed=2)
    embed = pixels_embed()
    calls = []

    def calibrate(target: float = 0.95):
        calls.append(target)
        return evaluate_embedder(embed, originals, copies, target_precision=target)

    choice = choose_threshold("pixels:16", calibrate=calibrate)
    report = calibrate()
    assert choice.how == "calibrated on pool" and choice.threshold == report.recommended
    m = choice.manifest()
    assert m["threshold_how"] == "calibrated on pool" and m["calibration_precision"] >= 0.95
    assert m["calibration_positives"] == 30 and m["calibration_negatives"] == 300
    with pytest.raises(ValueError, match="found no cosine of 'pixels:16' with precision >= 1.01"):
        choose_threshold("pixels:16", calibrate=lambda: calibrate(1.01))


def test_compare_methods_per_edit():
    originals = [make_image(700 + s, (256, 192), n_shapes=30) for s in range(8)]
    copies = make_calibration_set(originals, seed=4, copies_per_image=2)
    cmp = compare_methods(pixels_embed(), originals, copies, threshold=0.9, k_hard=3, n_random=2)
    assert cmp["pairs"] == 16 * 6 and cmp["positives"] == 16
    by = cmp["by_method"]
    assert set(by) == {"hash", "embedding", "verified", "hash or verified", "hash or embedding"}
    assert set(by["hash"]) == {"all", *EDITS}
    assert by["verified"]["all"]["recall"] == 1.0 and by["verified"]["all"]["fp"] == 0
    for edit in ("crop", "flip", "pad"):  # what a global hash misses and verification finds
        assert by["hash"][edit]["recall"] < 1.0 == by["verified"][edit]["recall"]
    a = by["hash or verified"]["all"]
    assert a["tp"] == 16 and a["f1"] > by["hash"]["all"]["f1"]
    assert cmp["recommended"]["verify"] == "local" and cmp["verify_stats"]["pairs"] == 96
    table = comparison_markdown(cmp)
    assert table.count("\n") == 6 and "| verified | 1.000 | 1.000 | 1.000 |" in table
