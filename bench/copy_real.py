"""Copy detection on real photographs: pHash, embedding (pool-calibrated) and local verification.

Data (Debian packages, `apt-get install mate-backgrounds lomiri-wallpapers-20.04 sway-backgrounds
plasma-workspace-wallpapers ukui-wallpapers gnome-backgrounds`; never used by tests): files under
/usr/share/backgrounds and /usr/share/wallpapers. Distinct images are disjoint
3x3 tiles of the single-size wallpapers (near-flat tiles dropped), each with one planted edit
(curate.calibrate edits, cycled); natural re-scales are the shipped resolutions of one wallpaper (sway,
Elephants, each plasma wallpaper). Pairwise precision/recall over all pairs of the pool, per seed.

Run: cd bench && python copy_real.py [--seeds 0 1 2] [--sources photos|all] [--grid 4] [--tile-side 640]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from _common import emit

COLOUR_VARIANTS = re.compile(r"Ubuntu-Mate-|MATE-Stripes-|/gnome/")  # recoloured designs: ambiguous truth


def _open(path: str, side: int) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (side, side))
        out = im.convert("RGB")
    out.thumbnail((side, side), Image.LANCZOS)
    return out


def tile_sources(which: str = "all") -> list[str]:
    """Single-size wallpapers whose tiles are the distinct originals: "photos" (mate-backgrounds'
    nature photographs and Kleiber, a bird photograph) or "all" (also the illustrations)."""
    files = sorted(f for f in glob.glob("/usr/share/backgrounds/**/*", recursive=True)
                   if f.lower().endswith((".jpg", ".jpeg", ".png")) and not COLOUR_VARIANTS.search(f)
                   and "/sway/" not in f and "Elephants" not in f)
    if which == "photos":
        files = [f for f in files if "/mate/nature/" in f or "Kleiber" in f]
    return files


def version_groups() -> dict[str, list[str]]:
    """Wallpapers shipped at several resolutions: name -> up to 4 files spread over the sizes."""
    groups: dict[str, list[str]] = {"sway": sorted(glob.glob("/usr/share/backgrounds/sway/*.png")),
                                    "elephants": sorted(glob.glob("/usr/share/backgrounds/mate/abstract/Elephants*.jpg"))}
    for d in sorted(glob.glob("/usr/share/wallpapers/*/contents/images")):
        groups[d.split("/")[4]] = sorted(glob.glob(d + "/*.jpg") + glob.glob(d + "/*.png"))
    out = {}
    for name, files in groups.items():
        files = sorted(files, key=lambda f: os.path.getsize(f))
        pick = sorted(set(np.linspace(0, len(files) - 1, min(4, len(files))).round().astype(int).tolist()))
        out[name] = [files[p] for p in pick]
    return out


def tiles(files: list[str], side: int, grid: int = 3, min_std: float = 20.0) -> list[Image.Image]:
    """Disjoint grid x grid tiles (each at most `side` on its longer side) of each file, near-flat ones dropped."""
    out = []
    for f in files:
        im = _open(f, side * grid)
        w, h = im.size
        for r in range(grid):
            for c in range(grid):
                t = im.crop((c * w // grid, r * h // grid, (c + 1) * w // grid, (r + 1) * h // grid))
                if np.asarray(t.convert("L"), dtype=np.float32).std() >= min_std:
                    out.append(t)
    return out


def pixels_embed():
    """pixels:16 as images -> unit vectors."""
    import torch

    from curate.embedders import load_embedder

    emb = load_embedder("pixels:16")

    def embed(images):
        with torch.inference_mode():
            y = emb.model(torch.stack([emb.transform(im.convert("RGB")) for im in images]))
        return torch.nn.functional.normalize(y.float(), dim=-1).numpy()

    return embed


def pair_scores(pred: set, truth: set, kinds: dict) -> dict:
    """Pairwise precision/recall/F1 and recall per kind of true pair."""
    tp = len(pred & truth)
    p = tp / max(len(pred), 1)
    r = tp / max(len(truth), 1)
    by = defaultdict(list)
    for pair in truth:
        by[kinds[pair]].append(pair in pred)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4),
            "tp": tp, "fp": len(pred) - tp, "recall_by_kind": {k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())}}


def run_seed(seed: int, originals: list[Image.Image], versions: dict[str, list[str]], side: int) -> dict:
    from curate.calibrate import EDITS, evaluate_embedder, make_calibration_set
    from curate.hashing import hamming_u64, phash_u64
    from curate.verify import (VerifySettings, candidate_pairs, embedding_candidates, phash_candidates,
                               trim_borders, verify_pairs)

    rng = np.random.default_rng(seed)
    edits = list(rng.permutation(EDITS))
    copies = make_calibration_set(originals, seed=seed, edits=edits)
    images: list = list(originals) + [c for _, c, _ in copies]
    group = list(range(len(originals))) + [o for o, _, _ in copies]
    kind = ["original"] * len(originals) + [e for _, _, e in copies]
    for g, (name, files) in enumerate(versions.items()):
        for f in files:
            images.append(f)
            group.append(len(originals) + g)
            kind.append("rescaled")
    n = len(images)
    load = lambda r: _open(images[r], 2048) if isinstance(images[r], str) else images[r]  # noqa: E731
    group = np.array(group)
    truth, kinds = set(), {}
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        for a in rows:
            for b in rows[rows > a]:
                truth.add((int(a), int(b)))
                kinds[(int(a), int(b))] = kind[b] if kind[b] != "original" else kind[a]
    t0 = time.perf_counter()
    pil = [load(r) for r in range(n)]
    ph = np.array([phash_u64(im) for im in pil], dtype=np.uint64)
    content = [trim_borders(im) for im in pil]  # candidates hash the content: padded copies come close
    ph_c = np.array([phash_u64(im) for im in content], dtype=np.uint64)
    ph_m = np.array([phash_u64(im.transpose(Image.FLIP_LEFT_RIGHT)) for im in content], dtype=np.uint64)
    embed = pixels_embed()
    vec = embed(pil)
    del pil
    t_global = time.perf_counter() - t0
    out = {}
    d = hamming_u64(ph[:, None], ph[None, :])
    iu = np.triu_indices(n, 1)
    out["pHash <= 4"] = pair_scores({(int(a), int(b)) for a, b in zip(*iu) if d[a, b] <= 4}, truth, kinds)
    # the product's pool calibration: edited copies of a sample of the pool, threshold at precision 0.95
    sample = rng.choice(len(originals), min(100, len(originals)), replace=False)
    cal_imgs = [originals[s] for s in sample]
    report = evaluate_embedder(embed, cal_imgs, make_calibration_set(cal_imgs, seed=seed + 100), target_precision=0.95)
    thr = report.recommended
    sims = vec @ vec.T
    out["pixels:16, pool-calibrated cosine"] = pair_scores(
        {(int(a), int(b)) for a, b in zip(*iu) if sims[a, b] > thr}, truth, kinds)
    out["pixels:16, pool-calibrated cosine"]["threshold"] = thr
    out["pixels:16 cosine > 0.6 (DINOv2 default)"] = pair_scores(
        {(int(a), int(b)) for a, b in zip(*iu) if sims[a, b] > 0.6}, truth, kinds)
    t1 = time.perf_counter()
    ci, cj, cstats = candidate_pairs(n, phash_candidates(ph_c, mirror_phash=ph_m), embedding_candidates(vec))
    cand = {(int(a), int(b)) for a, b in zip(ci, cj)}
    out["candidates (content pHash <= 16 incl. mirror, pixels k=10 cos > 0.5)"] = pair_scores(cand, truth, kinds)
    res = verify_pairs(ci, cj, load, VerifySettings())
    t_verify = time.perf_counter() - t1
    out["verified (local features)"] = pair_scores({(int(a), int(b)) for a, b in zip(*res.edges()[:2])}, truth, kinds)
    out["verified (local features)"]["stats"] = res.stats
    hashed = {(int(a), int(b)) for a, b in zip(*iu) if d[a, b] <= 4}
    out["pHash <= 4 or verified"] = pair_scores(hashed | {(int(a), int(b)) for a, b in zip(*res.edges()[:2])},
                                                truth, kinds)
    return {"n": n, "true_pairs": len(truth), "candidates": cstats, "seconds_global": round(t_global, 1),
            "seconds_candidates_and_verify": round(t_verify, 1), "results": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tile-side", type=int, default=640)
    ap.add_argument("--sources", choices=["photos", "all"], default="photos")
    ap.add_argument("--grid", type=int, default=4, help="tiles per side of each source image")
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    originals = tiles(tile_sources(args.sources), args.tile_side, args.grid)
    versions = version_groups()
    runs = [run_seed(s, originals, versions, args.tile_side) for s in args.seeds]
    names = list(runs[0]["results"])
    print(f"\n{runs[0]['n']} images: {len(originals)} tiles ({args.sources}, {args.grid}x{args.grid}) + one edited copy each, {sum(map(len, versions.values()))} "
          f"shipped resolutions of {len(versions)} wallpapers; {runs[0]['true_pairs']} true pairs; seeds {args.seeds}\n")
    kinds = sorted(runs[0]["results"][names[0]]["recall_by_kind"])
    print("| method | precision | recall | F1 | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for name in names:
        col = lambda k: np.array([r["results"][name][k] for r in runs])  # noqa: E731
        cell = lambda v: f"{v.mean():.3f} ± {v.std():.3f}"  # noqa: E731
        per = [cell(np.array([r["results"][name]["recall_by_kind"][k] for r in runs])) for k in kinds]
        print(f"| {name} | {cell(col('precision'))} | {cell(col('recall'))} | {cell(col('f1'))} | " + " | ".join(per) + " |")
    emit("copy_real", seeds=args.seeds, sources=args.sources, grid=args.grid, seconds=round(time.perf_counter() - t0, 1), runs=runs)


if __name__ == "__main__":
    main()
