"""Benchmark copy-detection quality: embedding dedup (calibrated thresholds) next to pHash dedup.

Generated originals get edited copies (curate.calibrate edits: crop, resize, JPEG, colour jitter,
flip, overlay, padding, blur). Each embedder's threshold is recommended on one calibration set
(hard + random negatives, target precision), then every method is scored on a disjoint
evaluation set over all (copy, original) pairs: precision, recall, recall per edit. pHash uses
curate.hashing.phash_u64 with Hamming <= DEFAULT_MAX_DISTANCE. Prints a markdown table and JSON.

Run: python bench/copy_quality.py [--originals 300] [--copies 2] [--target 0.95] [--vit-side 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import emit


def pixels_embedder():
    """The pixels:16 baseline (curate.embedders) as images -> unit vectors."""
    from curate.embedders import load_embedder

    emb = load_embedder("pixels:16")
    return lambda images: _run(emb.model, emb.transform, images)


def vit_embedder(side: int, seed: int):
    """A randomly initialised timm test_vit with its own (resolved) preprocessing."""
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=side).eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, side, side)}, model=model))
    return lambda images: _run(model, transform, images)


def _run(model, transform, images, batch: int = 128) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.stack([transform(im.convert("RGB")) for im in images[s : s + batch]])
            out.append(torch.nn.functional.normalize(model(x).float(), dim=-1).numpy())
    return np.concatenate(out)


def originals(count: int, first_seed: int, rng: np.random.Generator) -> list:
    """Generated originals of varied sizes."""
    from pipelines.synth import make_image

    return [make_image(first_seed + s, (int(rng.integers(96, 192)), int(rng.integers(72, 160))))
            for s in range(count)]


def score(predicted: np.ndarray, copy_of: np.ndarray, edits: list[str]) -> dict:
    """Precision/recall over all (copy, original) pairs of a boolean [copies, originals] matrix."""
    rows = np.arange(len(copy_of))
    tp = int(predicted[rows, copy_of].sum())
    fp = int(predicted.sum()) - tp
    names = np.array(edits)
    hit = predicted[rows, copy_of]
    return {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / len(copy_of), 4), "tp": tp, "fp": fp,
            "recall_by_edit": {e: round(float(hit[names == e].mean()), 3) for e in sorted(set(edits))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--originals", type=int, default=300, help="originals per set (calibration and evaluation)")
    ap.add_argument("--copies", type=int, default=2, help="edited copies per original")
    ap.add_argument("--target", type=float, default=0.95, help="target precision of the recommended threshold")
    ap.add_argument("--vit-side", type=int, default=64, help="input side of the random-init ViT")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from curate.calibrate import evaluate_embedder, make_calibration_set
    from curate.dedup import DEFAULT_THRESHOLD
    from curate.hashing import DEFAULT_MAX_DISTANCE, hamming_u64, phash_u64

    t_start = time.perf_counter()
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    cal_orig = originals(args.originals, 10_000, rng)
    cal_copies = make_calibration_set(cal_orig, seed=args.seed, copies_per_image=args.copies)
    ev_orig = originals(args.originals, 20_000, rng)
    ev_copies = make_calibration_set(ev_orig, seed=args.seed + 1, copies_per_image=args.copies)
    copy_of = np.array([i for i, _, _ in ev_copies])
    edits = [e for _, _, e in ev_copies]
    copy_images = [img for _, img, _ in ev_copies]

    results = {}
    embedders = (("pixels:16", pixels_embedder()), ("random-init test_vit", vit_embedder(args.vit_side, args.seed)))
    for name, embed in embedders:
        report = evaluate_embedder(embed, cal_orig, cal_copies, target_precision=args.target)
        sims = embed(copy_images) @ embed(ev_orig).T
        for label, threshold in (("recommended", report.recommended), ("dinov2 default", DEFAULT_THRESHOLD)):
            if threshold is None:
                continue
            results[f"{name} @ {label}"] = {"threshold": threshold, **score(sims > threshold, copy_of, edits)}
        results[f"{name} @ recommended"]["calibration"] = report.summary()
    hashes_o = np.array([phash_u64(im) for im in ev_orig], dtype=np.uint64)
    hashes_c = np.array([phash_u64(im) for im in copy_images], dtype=np.uint64)
    distance = hamming_u64(hashes_c[:, None], hashes_o[None, :])
    results["pHash"] = {"threshold": f"hamming <= {DEFAULT_MAX_DISTANCE}",
                        **score(distance <= DEFAULT_MAX_DISTANCE, copy_of, edits)}

    edit_names = sorted(set(edits))
    print(f"\nEvaluation set: {len(ev_orig)} originals, {len(ev_copies)} edited copies, all "
          f"{len(ev_orig) * len(ev_copies):,} (copy, original) pairs; thresholds recommended on a disjoint "
          f"calibration set at target precision {args.target}.\n")
    print("| method | threshold | precision | recall | fp | " + " | ".join(edit_names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(edit_names))
    for name, r in results.items():
        thr = r["threshold"] if isinstance(r["threshold"], str) else f"{r['threshold']:.4f}"
        per_edit = " | ".join(f"{r['recall_by_edit'][e]:.2f}" for e in edit_names)
        print(f"| {name} | {thr} | {r['precision']:.4f} | {r['recall']:.4f} | {r['fp']} | {per_edit} |")
    print()
    emit("copy_quality", originals=args.originals, copies=len(ev_copies), target_precision=args.target,
         vit_side=args.vit_side, seconds=round(time.perf_counter() - t_start, 1), results=results)


if __name__ == "__main__":
    main()
