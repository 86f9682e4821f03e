"""Command-line entry points: `main` (train) and `eval_main` (k-NN / linear probe)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"


def resolve_config_path(name: str) -> str:
    """A YAML path as given, or a bundled config name ('tiny', 'vits14', ...) from configs/train/."""
    if os.path.isfile(name):
        return name
    candidate = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(f"config {name!r} not found (looked in {CONFIG_DIR})")


def main(argv: list[str] | None = None) -> int:
    """Train: `python -m train CONFIG [key.sub=value ...] [--nproc N]`; 0 on success, 2 bad config, 3 diverged.

    `python -m train export ...` exports a checkpoint (see `export_main`). Under torchrun every rank
    runs this; `--nproc N` spawns N local ranks itself (127.0.0.1, a free port).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a DINOv2 ViT.")
    parser.add_argument("config", help="YAML config path or bundled name (tiny, vits14, vitb14, vitl14, vitg14)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (DDP/FSDP ranks; CPU: gloo)")
    args = parser.parse_args(argv)
    from train.config import load_config
    from train.loop import TrainingDiverged, train

    try:
        cfg = load_config(resolve_config_path(args.config), args.overrides)
    except Exception as e:  # noqa: BLE001 - report any config error as a usage error
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from train.dist import launch

        return launch("train.cli:main", args.nproc, [args.config, *args.overrides])
    from train import dist

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = train(cfg)
    except TrainingDiverged as e:
        print(f"training stopped: {e}. The last good checkpoint in {cfg.output_dir} was left in place.",
              file=sys.stderr)
        return 3
    finally:
        dist.cleanup()
    last = summary["history"][-1] if summary["history"] else {}
    if is_main:
        print(json.dumps({"output_dir": cfg.output_dir, "iterations": summary["iterations"],
                          "world_size": summary["world_size"], "global_batch_size": summary["global_batch_size"],
                          "final_loss": last.get("loss"), "decode_errors": summary["decode_errors"]}))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """`python -m train export CKPT --format timm|dinov2 --out FILE`: write the teacher backbone."""
    parser = argparse.ArgumentParser(prog="python -m train export",
                                     description="Export a teacher backbone for timm or the official DINOv2 hub.")
    parser.add_argument("checkpoint", help="last.pt, teacher_backbone.pt, an output dir, or a timm/dinov2 file")
    parser.add_argument("--format", choices=("timm", "dinov2"), default="timm")
    parser.add_argument("--out", required=True, help="file to write (a plain torch state dict)")
    args = parser.parse_args(argv)
    from train.export import export

    src = args.checkpoint
    if os.path.isdir(src):
        from train.checkpoint import find_checkpoint

        src = find_checkpoint(src) or os.path.join(src, "teacher_backbone.pt")
    try:
        info = export(src, args.format, args.out)
    except (OSError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Evaluate: k-NN (k in --ks) and a linear probe of a checkpoint on labelled train/test folders."""
    parser = argparse.ArgumentParser(prog="python -m train.eval", description="k-NN / linear-probe evaluation.")
    parser.add_argument("checkpoint", help="teacher_backbone.pt, a training checkpoint, or an output dir")
    parser.add_argument("train", help="labelled folder root/<class>/<img> used as the k-NN bank / probe train set")
    parser.add_argument("test", help="labelled folder with the same classes")
    parser.add_argument("--ks", default="10,20,100,200", help="comma-separated k values")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-steps", type=int, default=1000, help="SGD iterations of the linear classifiers")
    parser.add_argument("--probe-aug", type=int, default=4, help="augmented views per training image for the probe")
    parser.add_argument("--image-size", type=int, default=0, help="evaluation resolution (0 = checkpoint's eval size)")
    parser.add_argument("--output", default="", help="also write the JSON result here")
    args = parser.parse_args(argv)
    from train.eval import evaluate

    result = evaluate(args.checkpoint, args.train, args.test, [int(k) for k in args.ks.split(",")],
                      args.temperature, args.batch_size, args.device, args.probe_steps, args.image_size or None,
                      args.probe_aug)
    text = json.dumps(result)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
