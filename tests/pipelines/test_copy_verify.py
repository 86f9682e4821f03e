"""Local verification by jobs over buckets (pipelines.copy_verify) against the same steps over the whole
pool in one process (pipelines.copy_verify.whole_pool: curate.verify.candidate_pairs,
pipelines.copy_images.verify_image_pairs)."""

import numpy as np
import pytest
from PIL import ImageOps

from pipelines.config import load_config
from pipelines.run import run_pipeline
from pipelines.synth import encode, make_image, reencode


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Ingest and embed of 42 images in 4 ingest parts: distinct images, mirrored and cropped copies, and
    pixel-identical PNGs (same pHash: the hash search links them as a star)."""
    root = tmp_path_factory.mktemp("verify")
    raw = root / "raw"
    raw.mkdir()
    for i in range(30):
        img = make_image(7000 + i, (160, 120), n_shapes=20)
        (raw / f"{i:03d}.png").write_bytes(encode(img, "PNG"))
        if i < 4:
            (raw / f"{i:03d}-flip.png").write_bytes(encode(ImageOps.mirror(img), "PNG"))
        elif i < 8:
            (raw / f"{i:03d}-crop.jpg").write_bytes(reencode(img.crop((12, 10, 150, 110)), 90))
        elif i < 10:  # the same pixels, other bytes: two more of each
            (raw / f"{i:03d}-same1.png").write_bytes(encode(img, "PNG", compress_level=1))
            (raw / f"{i:03d}-same9.png").write_bytes(encode(img, "PNG", compress_level=9, optimize=True))
    cfg = load_config(None, [f"workdir={root / 'w'}", "ingest.workers=1", "ingest.part_size=12",
                             "embed.num_workers=0", "embed.model=pixels:16", "hashdedup.phash_max_distance=-1",
                             "hashdedup.exact=false", "dedup.threshold=0.95", "dedup.max_pairs_per_image=3",
                             "dedup.candidate_k=6", "dedup.candidate_cosine=0.0", "dedup.candidate_phash=22"])
    cfg.ingest.sources = [str(raw)]
    run_pipeline(cfg, until="embed")
    return cfg, root


@pytest.mark.parametrize("bucket_records", [10**6, 12, 24])
def test_bucketed_verification_equals_the_whole_pool(pool, tmp_path, monkeypatch, bucket_records):
    from curate.copy_graph_parts import part_buckets, read_edges
    from curate.dedup import as_parts
    from pipelines.aligned import EmbeddingLayout, RowMap
    from pipelines.framework import stage_dir
    from pipelines.stages.dedup import _verified_edges, valid_files

    cfg, root = pool
    mapper = None
    if bucket_records == 10**6:  # one value partition, searched by jobs of 7 values
        monkeypatch.setattr("pipelines.copy_verify.SEARCH_VALUES", 7)
    if bucket_records == 12:  # cap jobs that rank a few messages at a time with their rows' best so far,
        monkeypatch.setattr("pipelines.copy_verify.MERGE_ROWS", 7)  # range searches of a few queries each
        monkeypatch.setattr("pipelines.copy_verify.SEARCH_RESULTS", 3)
    if bucket_records == 24:  # with a mapper (as Ray tasks are): verification jobs of 5 pairs
        from curate.parts import local_map

        mapper = local_map
        monkeypatch.setattr("pipelines.copy_verify.VERIFY_PAIRS_PER_JOB", 5)
    ingest, emb_dir = stage_dir(cfg, "ingest"), root / "w" / "embed" / "pixels-16"
    layout = EmbeddingLayout(ingest, emb_dir)
    assert len(layout.emb_parts) == 4 and layout.n == 42
    parts = as_parts(str(emb_dir))
    bounds = part_buckets(layout.offsets, bucket_records)
    work = tmp_path / "_graph"
    valid_at, n_valid = valid_files(parts.paths, work, None)
    files, info = _verified_edges(cfg, emb_dir, layout, parts, valid_at, 0.95, work, bounds, mapper)
    from curate.hashing import phash_pairs
    from pipelines.copy_verify import whole_pool

    ref = whole_pool(cfg, ingest, emb_dir, 0.95)
    (ri, rj, rs), stats, res, hashed = ref["edges"], ref["stats"], ref["result"], ref["hashed"]
    distinct_pairs = int((phash_pairs(ref["codes"], cfg.dedup.candidate_phash)[2] > 0).sum())  # distinct values
    order = np.lexsort((rj, ri))
    gi, gj, gs = read_edges(files)
    assert np.array_equal(gi, ri[order]) and np.array_equal(gj, rj[order]) and np.array_equal(gs, rs[order])
    got = info["candidates"]
    assert got["kept"] == stats["kept"] and stats["dropped_by_cap"] > 0  # the cap binds here
    # the search jobs drop pairs that cannot count (among no row's best found there)
    assert got["found_by_search"] == 2 * distinct_pairs  # each pair of distinct values, from both ends
    assert got["found_by_search"] > got["sent_by_search"] or bucket_records != 10**6
    assert got["messages"] >= 2 * stats["kept"]
    assert info["linked"]["verified"] == int(res.verified.sum()) >= 12  # 4 flips, 4 crops, 2 x 3 same pixels
    vs = info["verify_stats"]
    assert (vs["pairs"], vs["verified"], vs["abstained"], vs["reasons"]) == (
        len(res.i), int(res.verified.sum()), int(res.abstained.sum()), res.stats["reasons"])
    assert len(bounds) - 1 == {10**6: 1, 12: 4, 24: 2}[bucket_records]
    assert vs["pieces"] == len(files)  # a job per bucket with pairs, or per 5 of a bucket's pairs
    if mapper:
        assert -(-len(res.i) // 5) <= len(files) < len(res.i) // 5 + len(bounds)
    else:
        assert len(files) <= len(bounds) - 1
    # pixel-identical PNGs hash alike: linked as a star to the smallest row of the three
    uri = np.array([u.rsplit("/", 1)[1] for u in RowMap(ingest).column(ingest, "uri").to_pylist()])
    names = uri[RowMap(ingest, emb_dir).emb_rows]
    hashed = set(zip(*map(np.ndarray.tolist, hashed)))
    for i in (8, 9):
        rows = sorted(int(np.flatnonzero(names == f"{i:03d}{s}.png")[0]) for s in ("", "-same1", "-same9"))
        assert {(rows[0], rows[1]), (rows[0], rows[2])} <= hashed and (rows[1], rows[2]) not in hashed
