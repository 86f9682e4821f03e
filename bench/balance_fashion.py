"""Curate a labelled long-tailed Fashion-MNIST pool at the library level, against a random subset.

The pool (per seed): Fashion-MNIST train items with class sizes falling 100:1 (6000 * 100**(-i/9),
classes in a seeded order), plus exact copies (10% of the items, same PNG bytes), shifted copies
(5%, rolled by 1-2 pixels) and ~2% generated junk (blank, near-constant, noise; bench/lowinfo.py).
Curation: low-information filter (curate.lowinfo) -> exact + pHash dedup (curate.hashing.dedup on
PNG sha256 and pHash) -> raw-pixel embedding (16x16 pooled, centred, L2-normalised) ->
hierarchical k-means with resampling -> balanced_sample over `structured_levels` of the tree,
selecting half the kept pool (the images left after the filter and dedup; keys without a prefix) and
half the raw pool (copies and junk included; keys `pool_`). Reported for each: class entropy / ln 10
(absent classes count), max/min class ratio, junk and exact copies kept, and the top-1 of a weighted
raw-pixel k-NN (k 20, T 0.07) on the Fashion-MNIST test split trained on the curated subset, on a
random subset of the same size drawn from the raw pool (`random_`), and on the oracle (`oracle_`:
water-filling by true class over the kept pool, the most even selection any balancing can reach at
that size); mean and sd over seeds. Prints one JSON line.

Run: python bench/balance_fashion.py [--seeds 0,1,2] [--levels 100,10] [--sampling r]
     python bench/balance_fashion.py --embed bootstrap[:PRESET] [--boot-iters 600] [--boot-set key=value ...]
The bootstrap embedder (as `embed.model: bootstrap` in `curate run`): per seed, a DINOv2 ViT of the
trainer preset (default tiny) trained on the pool's kept images (after the filter and dedup), its
teacher's CLS token embeds the pool. The k-NN score stays on raw pixels whatever embeds the tree.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time

import numpy as np
from _common import emit
from balance import DATA, embed_pixels, mean_sd, read_idx
from PIL import Image

from curate.balance import balanced_sample, structured_levels
from curate.hashing import dedup, phash_u64
from curate.kmeans_tree import LevelSpec, hierarchical_kmeans
from curate.lowinfo import low_information

JUNK = 10  # label of junk items


def grey_junk(rng: np.random.Generator, kind: int) -> np.ndarray:
    """A 28x28 uint8 junk item: constant, near-constant, uniform noise, Gaussian noise or salt and pepper."""
    v = int(rng.integers(0, 256))
    if kind == 0:
        return np.full((28, 28), v, np.uint8)
    if kind == 1:
        return np.clip(v + rng.normal(0, 0.8, (28, 28)), 0, 255).astype(np.uint8)
    if kind == 2:
        return rng.integers(0, 256, (28, 28)).astype(np.uint8)
    if kind == 3:
        return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (28, 28)), 0, 255).astype(np.uint8)
    x = np.full((28, 28), v, np.uint8)
    x[rng.random((28, 28)) < 0.2] = 255 * int(rng.integers(0, 2))
    return x


def build_pool(seed: int, images: np.ndarray, labels: np.ndarray, largest: int = 6000) -> dict:
    """Images, labels (JUNK for junk) and kind (0 item, 1 exact copy, 2 shifted copy, 3 junk) of one pool."""
    rng = np.random.default_rng(seed)
    sizes = np.round(largest * 100.0 ** (-np.arange(10) / 9)).astype(int)
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), s, replace=False)
                           for c, s in zip(rng.permutation(10), sizes)])
    exact = rng.choice(rows, int(0.10 * len(rows)), replace=False)
    shifted = rng.choice(rows, int(0.05 * len(rows)), replace=False)
    shift_imgs = np.stack([np.roll(images[r], tuple(rng.integers(1, 3, 2) * rng.choice([-1, 1], 2)), axis=(0, 1))
                           for r in shifted])
    n_junk = int(0.02 * (len(rows) + len(exact) + len(shifted)) / 0.98)
    junk = np.stack([grey_junk(rng, i % 5) for i in range(n_junk)])
    x = np.concatenate([images[rows], images[exact], shift_imgs, junk])
    y = np.concatenate([labels[rows], labels[exact], labels[shifted], np.full(n_junk, JUNK)]).astype(np.int64)
    kind = np.repeat([0, 1, 2, 3], [len(rows), len(exact), len(shifted), n_junk])
    perm = rng.permutation(len(x))
    return {"x": x[perm], "y": y[perm], "kind": kind[perm], "source": np.concatenate(
        [rows, exact, shifted, -1 - np.arange(n_junk)])[perm]}


def png_hashes(images: np.ndarray) -> tuple[list[str], np.ndarray]:
    """sha256 of each item's PNG bytes and its pHash."""
    shas, codes = [], np.empty(len(images), np.uint64)
    for i, im in enumerate(images):
        img = Image.fromarray(im, "L")
        buf = io.BytesIO()
        img.save(buf, "PNG")
        shas.append(hashlib.sha256(buf.getvalue()).hexdigest())
        codes[i] = phash_u64(img.convert("RGB"))
    return shas, codes


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             k: int = 20, t: float = 0.07) -> float:
    """Top-1 of the DINO-style weighted k-NN vote (weights exp(cos / T)) in percent."""
    a, b = train_x.astype(np.float32), test_x.astype(np.float32)
    correct = 0
    for s in range(0, len(b), 2000):
        sim = b[s : s + 2000] @ a.T
        idx = np.argpartition(-sim, k, axis=1)[:, :k]
        w = np.exp(np.take_along_axis(sim, idx, axis=1) / t)
        votes = np.zeros((len(idx), JUNK + 1))
        np.add.at(votes, (np.repeat(np.arange(len(idx)), k), train_y[idx].ravel()), w.ravel())
        correct += int((votes[:, :JUNK].argmax(axis=1) == test_y[s : s + 2000]).sum())
    return 100.0 * correct / len(b)


def class_stats(y: np.ndarray) -> tuple[float, float]:
    """Entropy of the 10-class histogram / ln 10 (junk left out, absent classes count) and max/min count."""
    counts = np.bincount(y[y < JUNK], minlength=10)
    p = counts / counts.sum()
    h = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(10))
    return h, float(counts.max() / counts.min()) if counts.min() else float("inf")


def oracle_pick(y: np.ndarray, keep: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The most even selection of `size` kept rows that true labels allow (junk never taken): the same
    water-filling over the classes as balanced_sample over clusters, random rows within a class. Its class
    entropy is the ceiling of any balancing of this pool at this size."""
    ky = y[keep]
    sizes = np.bincount(ky[ky < JUNK], minlength=JUNK)
    quota = np.zeros(JUNK, dtype=np.int64)
    left = min(size, int(sizes.sum()))
    while left > 0:  # water-filling: an equal share to every class with rows left
        open_ = np.flatnonzero(quota < sizes)
        each = left // len(open_)
        if not each:  # fewer rows left than open classes: one more to the first of them
            quota[open_[:left]] += 1
            break
        add = np.minimum(sizes[open_] - quota[open_], each)
        quota[open_] += add
        left -= int(add.sum())
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(keep[ky == c], quota[c], replace=False) for c in range(JUNK)])


def bootstrap_embed(x: np.ndarray, keep: np.ndarray, seed: int, spec: str, iters: int, overrides: list[str],
                    work: str) -> tuple[np.ndarray, dict]:
    """Train the preset on the kept pool images (PNG shards), embed every pool image with its teacher's
    CLS token (L2-normalised); and the run's summary (seconds, DINO term against ln K)."""
    import os
    import shutil

    import ssl_fashion
    import torch

    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import train

    preset = spec.split(":", 1)[1] if ":" in spec else "tiny"
    key = hashlib.sha256(json.dumps([preset, iters, overrides, seed, len(x), len(keep)]).encode()).hexdigest()[:12]
    cached = os.path.join(work, f"boot-{seed}-{key}")
    if os.path.exists(cached + ".json"):  # this seed's run with these settings: its features were kept
        return np.load(cached + ".npy"), json.loads(open(cached + ".json").read())
    root = os.path.join(work, f"boot-{seed}")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "shards"))
    ssl_fashion.write_shards(x[keep], os.path.join(root, "shards"))
    cfg = load_config(resolve_config_path(preset), [
        f"data.path={root}/shards", "data.num_workers=0", "progress=false", f"seed={seed}",
        f"optim.iterations={iters}", f"checkpoint_every={iters}", f"output_dir={root}/train", "resume=false",
        *overrides])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    feats = ssl_fashion.embed(summary["model"].teacher["backbone"], x, cfg.eval_size or cfg.crops.global_size)
    feats = torch.nn.functional.normalize(feats, dim=1).numpy()
    hist = summary["history"]
    last = hist[-max(1, min(20, len(hist) // 10)):]
    dino = float(np.mean([h["dino_loss"] for h in last]))
    info = {"train_s": round(seconds, 1), "dino_below_lnK": round(float(np.log(cfg.head.prototypes)) - dino, 3)}
    np.save(cached + ".npy", feats)
    with open(cached + ".json", "w") as f:
        json.dump(info, f)
    return feats, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--levels", default="100,10")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4, help="resampling steps per level, the first fit included")
    ap.add_argument("--sampling", default="r", choices=["r", "c"])
    ap.add_argument("--min-explained", type=float, default=0.7)
    ap.add_argument("--embed", default="pixels", help="pixels | bootstrap[:PRESET]: what embeds the tree")
    ap.add_argument("--boot-iters", type=int, default=600)
    ap.add_argument("--boot-set", action="append", default=[], help="trainer key=value override (repeatable)")
    ap.add_argument("--work", default="/tmp/balance_fashion")
    args = ap.parse_args()
    images, labels = read_idx(DATA / "train-images-idx3-ubyte.gz"), read_idx(DATA / "train-labels-idx1-ubyte.gz")
    test_x = embed_pixels(read_idx(DATA / "t10k-images-idx3-ubyte.gz"))
    test_y = read_idx(DATA / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    ks = [int(k) for k in args.levels.split(",")]
    rows: dict[str, list] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        pool = build_pool(seed, images, labels)
        x, y, kind, n = pool["x"], pool["y"], pool["kind"], len(pool["x"])
        ok = np.array([low_information(im) is None for im in x])
        shas, codes = png_hashes(x)
        ids = [f"{i:08d}" for i in range(n)]
        res = dedup([ids[i] for i in np.flatnonzero(ok)], [shas[i] for i in np.flatnonzero(ok)],
                    codes[ok], np.full(int(ok.sum()), 784))
        keep = np.flatnonzero(ok)[res.keep]
        pix = embed_pixels(x)  # the k-NN score's features
        emb = pix
        if args.embed.startswith("bootstrap"):
            emb, boot = bootstrap_embed(x, keep, seed, args.embed, args.boot_iters, args.boot_set, args.work)
            for key, v in boot.items():
                rows.setdefault(key, []).append(v)
        sizes = [len(keep), *ks[:-1]]
        levels = [LevelSpec(k, args.iters, args.steps, max(1, m // k // 2), args.sampling) for k, m in zip(ks, sizes)]
        tree = hierarchical_kmeans(emb[keep], levels, seed=seed)
        depth = structured_levels(tree.centroids, tree.assignments, args.min_explained)
        for mode, target in (("", len(keep) // 2), ("pool_", n // 2)):
            sel = keep[balanced_sample(tree.paths()[:, :depth], target, strategy="r", seed=seed).counts > 0]
            rand = np.random.default_rng(seed).choice(n, len(sel), replace=False)
            for prefix, pick in (("", sel), ("random_", rand), ("oracle_", oracle_pick(y, keep, len(sel), seed))):
                h, ratio = class_stats(y[pick])
                sha_sel = [shas[i] for i in pick]
                put = lambda key, v: rows.setdefault(mode + prefix + key, []).append(v)  # noqa: E731
                put("entropy", h)
                put("ratio", ratio)
                put("junk" if prefix else "junk_kept", float((kind[pick] == 3).mean()))
                put("exact" if prefix else "exact_kept", len(sha_sel) - len(set(sha_sel)))
                put("knn", knn_top1(pix[pick], y[pick], test_x, test_y))
            rows.setdefault(mode + "selected", []).append(len(sel))
        for key, v in (("depth", depth), ("lowinfo_dropped", int((~ok).sum())),
                       ("dedup_dropped", int((~res.keep).sum())), ("seconds", time.perf_counter() - t0)):
            rows.setdefault(key, []).append(v)
        for mode, what in (("", "half the kept pool"), ("pool_", "half the raw pool")):
            r = {k[len(mode):]: v[-1] for k, v in rows.items() if k.startswith(mode)} if mode else \
                {k: v[-1] for k, v in rows.items()}
            print(f"seed {seed}, {what}: pool {n} kept {len(keep)} selected {r['selected']} entropy {r['entropy']:.4f} "
                  f"vs random {r['random_entropy']:.4f} (oracle {r['oracle_entropy']:.4f}), knn {r['knn']:.2f} vs "
                  f"{r['random_knn']:.2f} (oracle {r['oracle_knn']:.2f}), junk {r['junk_kept']:.4f}, exact copies "
                  f"kept {r['exact_kept']}, depth {depth} ({rows['seconds'][-1]:.0f} s)", flush=True)
    emit("balance_fashion", pool=n, embed=args.embed, boot_iters=args.boot_iters if args.embed != "pixels" else None,
         boot_set=args.boot_set, levels=ks, iters=args.iters, steps=args.steps, sampling=args.sampling,
         min_explained=args.min_explained, **{k: mean_sd([float(v) for v in vals]) for k, vals in rows.items()})


if __name__ == "__main__":
    main()
