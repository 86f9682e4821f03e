"""Tests for curate.verify: local-feature verification of copy candidates, and candidate generation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from curate.calibrate import EDITS, apply_edit
from curate.hashing import phash_u64
from curate.verify import (
    VerifySettings,
    candidate_pairs,
    embedding_candidates,
    phash_candidates,
    verify_pairs,
)
from pipelines.synth import make_image


def textured(seed: int, size: tuple[int, int] = (256, 192), shapes: int = 30) -> Image.Image:
    """A generated image with enough shapes for local features (the default 6 shapes are too flat)."""
    return make_image(seed, size, n_shapes=shapes)


def pasted(base: Image.Image, patch: Image.Image, at: tuple[int, int]) -> Image.Image:
    out = base.copy()
    out.paste(patch, at)
    return out


@pytest.fixture(scope="module")
def edited():
    """Five originals, each with one copy per edit (crop to 50-90% of the area, flip, pad, ...)."""
    originals = [textured(500 + s) for s in range(5)]
    rng = np.random.default_rng(1)
    copies = [(o, apply_edit(originals[o], e, rng), e) for o in range(5) for e in EDITS]
    return originals, copies


def test_every_planted_edit_found_and_no_distinct_pair(edited):
    originals, copies = edited
    images = originals + [img for _, img, _ in copies]
    n = len(originals)
    i = [x for t in range(len(copies)) for x in range(n)]
    j = [n + t for t in range(len(copies)) for _ in range(n)]
    res = verify_pairs(i, j, lambda r: images[r])
    truth = np.array([copies[t - n][0] == x for x, t in zip(i, j)])
    missed = [copies[t - n][2] for x, t, v, y in zip(i, j, res.verified, truth) if y and not v]
    assert missed == []
    assert not (res.verified & ~truth).any()
    assert res.stats["pairs"] == len(i) and res.stats["verified"] == len(copies)
    flips = np.array([copies[t - n][2] == "flip" for t in j]) & truth
    assert res.mirrored[flips].all() and not res.mirrored[truth & ~flips].any()
    # features once per image (plus the mirror of each copy that is tried against a mirror)
    assert res.stats["features_computed"] <= len(images) + len(copies)
    assert res.stats["ms_per_pair"] > 0 and res.stats["feature_seconds"] <= res.stats["seconds"]


def test_shared_logo_or_background_is_not_a_copy():
    logo = textured(999, (96, 72), 12)  # 14% of the image, same place on every image
    logos = [pasted(textured(100 + s), logo, (150, 110)) for s in range(5)]
    background = textured(777, (256, 192), 40)  # the same background, 52% covered by distinct content
    scenes = [pasted(background, textured(200 + s, (176, 144), 25), (40, 24)) for s in range(5)]
    for images in (logos, scenes):
        copy = apply_edit(images[0], "jpeg", np.random.default_rng(0))
        pool = images + [copy]
        i, j = np.triu_indices(len(pool), 1)
        res = verify_pairs(i, j, lambda r: pool[r])
        assert res.inliers.max() >= 10  # the shared part matches...
        verified = {(int(a), int(b)) for a, b in zip(res.i[res.verified], res.j[res.verified])}
        assert verified == {(0, len(images))}  # ...but only the real copy covers the image


def test_mirror_needed_for_flips_and_results_do_not_depend_on_order(edited):
    originals, _ = edited
    images = originals + [ImageOps.mirror(im) for im in originals]
    i, j = np.arange(5), np.arange(5, 10)
    assert verify_pairs(i, j, lambda r: images[r]).verified.all()
    assert not verify_pairs(i, j, lambda r: images[r], VerifySettings(mirror=False)).verified.any()
    a, b = np.triu_indices(10, 1)
    one = verify_pairs(a, b, lambda r: images[r])
    perm = np.random.default_rng(0).permutation(len(a))
    two = verify_pairs(b[perm], a[perm], lambda r: images[r])  # swapped ends, shuffled
    back = np.argsort(perm)
    assert (two.i[back] == one.i).all() and (two.j[back] == one.j).all()
    assert (two.verified[back] == one.verified).all() and (two.inliers[back] == one.inliers).all()
    assert np.allclose(two.share[back], one.share)
    ei, ej, _ = one.edges()
    assert list(zip(ei.tolist(), ej.tolist())) == [(r, r + 5) for r in range(5)]


def test_unreadable_image_is_a_reason_not_a_crash():
    good = textured(3)

    def load(row: int) -> Image.Image:
        if row == 2:
            raise OSError("truncated file")
        return good

    res = verify_pairs([0, 0], [1, 2], load)
    assert res.verified.tolist() == [True, False]
    assert res.reason[1] == "load_error: OSError: truncated file"
    assert res.stats["reasons"] == {"load_error: OSError: truncated file": 1}


def test_bounded_features_and_side():
    big = textured(4, (1024, 768), 120)
    small = big.resize((512, 384), Image.BICUBIC)
    s = VerifySettings(max_side=256, max_features=50)
    res = verify_pairs([0], [1], lambda r: (big, small)[r], s)
    assert res.verified.all() and res.inliers[0] <= 50


def test_candidate_cap_keeps_best_pairs_of_both_rows():
    # row 0 is close to 1, 2, 3 (costs 0.1, 0.2, 0.3); row 4 to 3 (0.05); cap 2 per row
    src = (np.array([0, 0, 0, 3]), np.array([1, 2, 3, 4]), np.array([0.1, 0.2, 0.3, 0.05]))
    again = (np.array([2]), np.array([0]), np.array([0.5]))  # same pair, higher cost: merged
    i, j, stats = candidate_pairs(5, src, again, max_pairs_per_image=2)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (3, 4)]
    assert stats == {"candidates": 4, "kept": 3, "dropped_by_cap": 1, "max_pairs_per_image": 2}
    i, j, _ = candidate_pairs(5, src, max_pairs_per_image=1)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (3, 4)]
    # a row's pairs are ranked together whichever end it is: row 2's best two are (2, 3) and (2, 4), so
    # (0, 2) goes although it is row 2's only pair with a smaller row (at most n * cap / 2 pairs in all)
    src = (np.array([0, 2, 2]), np.array([2, 3, 4]), np.array([0.2, 0.1, 0.15]))
    i, j, stats = candidate_pairs(5, src, max_pairs_per_image=2)
    assert list(zip(i.tolist(), j.tolist())) == [(2, 3), (2, 4)] and stats["dropped_by_cap"] == 1


def test_phash_candidates_find_mirrors_and_embedding_candidates(edited):
    originals, _ = edited
    images = originals + [ImageOps.mirror(originals[0]), originals[1].resize((200, 150))]
    ph = np.array([phash_u64(im) for im in images], dtype=np.uint64)
    mirror = np.array([phash_u64(ImageOps.mirror(im)) for im in images], dtype=np.uint64)
    i, j, cost = phash_candidates(ph, max_distance=8)
    assert (1, 6) in set(zip(i.tolist(), j.tolist())) and (0, 5) not in set(zip(i.tolist(), j.tolist()))
    i, j, cost = phash_candidates(ph, max_distance=8, mirror_phash=mirror)
    pairs = dict(zip(zip(i.tolist(), j.tolist()), cost.tolist()))
    assert pairs[(0, 5)] == 0.0 and (1, 6) in pairs
    assert all(a < b for a, b in pairs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8))
    x[7] = x[3] + 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, cost = embedding_candidates(x.astype(np.float32), k=3, threshold=0.99)
    assert list(zip(i.tolist(), j.tolist())) == [(3, 7)] and cost[0] < 0.01
