"""The `curate` command: one subcommand per stage, each ending with a one-screen summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.config import Config, load_config
from pipelines.manifest import StageConflict, StageResult


def _common(p: argparse.ArgumentParser, workdir_required: bool = True) -> None:
    p.add_argument("--workdir", required=workdir_required, help="work directory (one per run)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set ingest.part_size=500 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it is done or was made with other settings")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `curate`."""
    parser = argparse.ArgumentParser(prog="curate", description=(
        "Curate raw web images into a DINOv2-style training set: "
        "ingest -> hashdedup -> embed -> dedup -> decontaminate -> cluster -> balance -> shards -> report; "
        "then train, eval."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="check raw images from folders, URL lists and tars; write records and raw shards")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder (recursive), a URL list (.txt, .csv/.tsv/.parquet with a url column) or a tar")
    _common(p)
    p.add_argument("--part-size", type=int, help="inputs per part (records part + raw shard)")
    p.add_argument("--workers", type=int, help="processes over parts (0 = one per core)")
    p.add_argument("--min-side", type=int, help="drop images whose shorter side is smaller")
    p.add_argument("--concurrency", type=int, help="download threads per worker")
    p.add_argument("--timeout", type=float, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, help="retries on timeouts, connection errors and 5xx")
    p.add_argument("--max-bytes", type=int, help="largest download body accepted")
    p.add_argument("--ignore-noai", action="store_true", help="download images even when X-Robots-Tag says noai")

    p = sub.add_parser("hashdedup", help="mark exact (sha256) and perceptual (pHash) duplicates")
    _common(p)
    p.add_argument("--max-distance", type=int, help="pHash Hamming threshold (negative disables)")

    p = sub.add_parser("embed", help="embed every kept record with a vision model (float16, L2-normalised parts)")
    _common(p)
    p.add_argument("--model", help="pixels[:side] | timm:<name>[:weights] | open_clip:<arch>[:tag|weights] | "
                                   "torchscript:<file>[:side] | checkpoint:<teacher_backbone.pt>")
    p.add_argument("--name", help="embedding name (default: from the model spec); several can coexist")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int, help="DataLoader decode processes")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--executor", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--ray-actors", type=int, help="actors (default: one per GPU, else one per CPU)")

    p = sub.add_parser("dedup", help="embedding copy detection: k-NN graph, cosine threshold, components")
    _common(p)
    p.add_argument("--embedding", help="embedding name under <workdir>/embed/")
    p.add_argument("--k", type=int, help="neighbours per image (default 64)")
    p.add_argument("--threshold", type=float, help="cosine above which images are copies (default 0.6)")
    p.add_argument("--calibrate", action="store_true",
                   help="edit a pool sample, report precision/recall per threshold and recommend one")
    p.add_argument("--executor", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")

    p = sub.add_parser("decontaminate", help="drop pool images that copy an evaluation image (and their component)")
    _common(p)
    p.add_argument("--eval-set", dest="eval_sets", nargs="+", metavar="NAME=SOURCE", help="evaluation sets")
    p.add_argument("--threshold", type=float, help="cosine above which a pool image copies an eval image (0.45)")

    p = sub.add_parser("cluster", help="hierarchical k-means over an embedding (cluster_l1..lN per record)")
    _common(p)
    p.add_argument("--embedding", help="embedding name under <workdir>/embed/ (default: the embed stage's)")
    p.add_argument("--levels", help="clusters per level, finest first, e.g. 20000,2000,200")
    p.add_argument("--iters", type=int, help="Lloyd iterations per level")
    p.add_argument("--resampling-steps", type=int, help="resampling steps per level")
    p.add_argument("--sample-size", type=int, help="points drawn per cluster at each resampling step")
    p.add_argument("--sampling", choices=["c", "r"], help="resampling: closest (c) or random (r)")
    p.add_argument("--executor", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")

    p = sub.add_parser("balance", help="balanced sampling over the cluster tree, and retrieval for seed sets")
    _common(p)
    p.add_argument("--target", type=int, help="number of images to select")
    p.add_argument("--strategy", choices=["r", "c"], help="inside a leaf: random (r) or closest first (c)")
    p.add_argument("--multiplier", type=int, help="> 1 allows repeats")
    p.add_argument("--seeds", nargs="+", metavar="NAME=SOURCE", help="seed sets to retrieve nearest pool images for")
    p.add_argument("--n-per-seed", type=int, help="nearest pool images per seed image (sample mode)")

    p = sub.add_parser("shards", help="write surviving records as webdataset shards, or --verify shards")
    _common(p, workdir_required=False)
    p.add_argument("--out", help="output directory (default <workdir>/shards)")
    p.add_argument("--max-size", type=int, help="bytes per shard")
    p.add_argument("--max-count", type=int, help="samples per shard")
    p.add_argument("--shuffle-seed", help="seed of the sample order, or 'none' for id order")
    p.add_argument("--select", help="also require this boolean column ('column' or 'stage:column')")
    p.add_argument("--verify", metavar="DIR", help="read every shard in DIR back and check it against its index")

    p = sub.add_parser("report", help="stats report of a workdir: one self-contained HTML page and a JSON")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", help="output directory (default <workdir>/report)")

    p = sub.add_parser("run", help="run the whole pipeline from a config (stages skip when done)")
    p.add_argument("config_file", metavar="CONFIG", help="YAML config (e.g. configs/demo.yaml)")
    p.add_argument("overrides_pos", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. workdir=/data/w")
    p.add_argument("--workdir", help="work directory (overrides the config's)")
    p.add_argument("--from", dest="start", help="first stage to run")
    p.add_argument("--until", help="last stage to run")
    p.add_argument("--force", action="store_true", help="redo stages made with other settings")
    p.add_argument("--executor", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")

    p = sub.add_parser("train", add_help=False,
                       help="train a DINOv2 ViT: curate train CONFIG [key.sub=value ...]; CONFIG is a trainer config "
                            "(tiny, vits14, ... or its YAML) or a pipeline config with a train section (curate, then train)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("eval", add_help=False,
                       help="k-NN and linear-probe evaluation: curate eval CHECKPOINT TRAIN_DIR TEST_DIR [--ks 10,20]")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="generate a raw pool and run the pipeline on it, offline")
    p.add_argument("--workdir", help="where to work (default: a new folder under the current directory)")
    p.add_argument("--pool-size", type=int, default=2000, help="number of distinct generated pool images")
    p.add_argument("--train-iters", type=int, default=300, help="tiny-ViT training iterations (0 = curate only)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    overrides = list(args.overrides)
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    return load_config(args.config, overrides)


def print_summary(results: list[StageResult], started: float, out=None) -> None:
    """One screen: per stage, in -> out, drops by reason, time, where the outputs are."""
    out = out or sys.stdout
    for r in results:
        c = r.counts
        head = f"[{r.stage}] " + ("already done, nothing to do" if r.skipped else f"done in {r.seconds:.1f}s")
        print(head, file=out)
        if "in" in c:
            print(f"  in {c['in']:,}  ->  out {c.get('out', 0):,}", file=out)
        for reason, n in sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1]):
            print(f"    dropped {n:>8,}  {reason}", file=out)
        extras = {k: v for k, v in c.items() if k not in ("in", "out", "dropped")}
        if extras:
            print("  " + "  ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in extras.items()), file=out)
        for name, path in r.outputs.items():
            print(f"  {name}: {path}", file=out)
    print(f"total {time.time() - started:.1f}s", file=out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `curate` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "eval"):
        from pipelines.train_stage import is_pipeline_config
        from train import cli as train_cli

        if argv[0] == "train" and len(argv) > 1 and is_pipeline_config(argv[1]):
            return _curate_then_train(argv[1], argv[2:])
        return (train_cli.main if argv[0] == "train" else train_cli.eval_main)(argv[1:])
    args = build_parser().parse_args(argv)
    started = time.time()
    from pipelines import stages

    try:
        if args.command == "ingest":
            cfg = _config(args, {"part_size": "ingest.part_size", "workers": "ingest.workers",
                                 "min_side": "ingest.min_side", "concurrency": "download.concurrency",
                                 "timeout": "download.timeout", "retries": "download.retries",
                                 "max_bytes": "download.max_bytes"})
            cfg.ingest.sources = [str(Path(s).resolve()) for s in args.sources]
            if args.ignore_noai:
                cfg.download.respect_noai = False
            results = [stages.run_ingest(cfg, force=args.force)]
        elif args.command == "hashdedup":
            cfg = _config(args, {"max_distance": "hashdedup.phash_max_distance"})
            results = [stages.run_hashdedup(cfg, force=args.force)]
        elif args.command == "embed":
            from pipelines.embed_stage import run_embed

            cfg = _config(args, {"model": "embed.model", "name": "embed.name", "batch_size": "embed.batch_size",
                                 "num_workers": "embed.num_workers", "device": "embed.device",
                                 "executor": "executor", "ray_address": "ray_address",
                                 "ray_actors": "embed.ray_actors"})
            results = [run_embed(cfg, force=args.force)]
        elif args.command == "dedup":
            from pipelines.copy_stage import run_calibration, run_dedup

            cfg = _config(args, {"embedding": "dedup.embedding", "k": "dedup.k", "threshold": "dedup.threshold",
                                 "executor": "executor", "ray_address": "ray_address"})
            if args.calibrate:
                return _print_calibration(run_calibration(cfg))
            results = [run_dedup(cfg, force=args.force)]
        elif args.command == "decontaminate":
            from pipelines.config import EvalSetConfig
            from pipelines.copy_stage import run_decontaminate

            cfg = _config(args, {"threshold": "decontaminate.threshold"})
            for name, source in _named_sources(args.eval_sets or [], "--eval-set"):
                cfg.decontaminate.eval_sets.append(EvalSetConfig(name=name, source=source))
            results = [run_decontaminate(cfg, force=args.force)]
        elif args.command == "cluster":
            from pipelines.cluster_stage import run_cluster
            from pipelines.config import LevelConfig

            cfg = _config(args, {"embedding": "cluster.embedding", "executor": "executor", "ray_address": "ray_address"})
            if args.levels:
                cfg.cluster.levels = [LevelConfig(int(k)) for k in args.levels.split(",")]
            for lv in cfg.cluster.levels:
                for attr, flag in (("n_iters", "iters"), ("resampling_steps", "resampling_steps"),
                                   ("sample_size", "sample_size"), ("sampling", "sampling")):
                    if getattr(args, flag) is not None:
                        setattr(lv, attr, getattr(args, flag))
            results = [run_cluster(cfg, force=args.force)]
        elif args.command == "balance":
            from pipelines.cluster_stage import run_balance
            from pipelines.config import SeedSetConfig

            cfg = _config(args, {"target": "balance.target", "strategy": "balance.strategy",
                                 "multiplier": "balance.multiplier"})
            for name, source in _named_sources(args.seeds or [], "--seeds"):
                cfg.balance.seeds.append(SeedSetConfig(name=name, source=source))
            if args.n_per_seed:
                for s in cfg.balance.seeds:
                    s.n_per_seed = args.n_per_seed
            results = [run_balance(cfg, force=args.force)]
        elif args.command == "shards":
            if args.verify:
                return _verify(args.verify)
            if not args.workdir:
                print("curate shards: --workdir is required (or --verify DIR)", file=sys.stderr)
                return 2
            seed = args.shuffle_seed
            if seed is not None:
                args.shuffle_seed = "null" if seed.lower() == "none" else seed
            cfg = _config(args, {"out": "shards.out", "max_size": "shards.max_size", "max_count": "shards.max_count",
                                 "shuffle_seed": "shards.shuffle_seed", "select": "shards.select"})
            results = [stages.run_shards(cfg, force=args.force)]
        elif args.command == "report":
            from pipelines.report_stage import write_report

            paths = write_report(args.workdir, args.out)
            print(f"[report] {paths['html']}\n  figures: {paths['json']}")
            return 0
        elif args.command == "run":
            from pipelines.run import run_pipeline

            args.config, args.overrides = args.config_file, list(args.overrides_pos)
            cfg = _config(args, {"executor": "executor", "ray_address": "ray_address"})
            results = run_pipeline(cfg, args.start, args.until, force=args.force)
        elif args.command == "demo":
            from pipelines.demo import run_demo

            return run_demo(args.workdir, args.pool_size, args.seed, args.train_iters)
        else:
            raise AssertionError(args.command)
    except (StageConflict, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"curate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print_summary(results, started)
    return 0


def _curate_then_train(config: str, overrides: list[str]) -> int:
    """`curate train PIPELINE_CONFIG`: curate (stages already done are skipped), then train and evaluate."""
    from pipelines.run import run_pipeline

    started = time.time()
    cfg = load_config(config, overrides)
    if not cfg.train.config:
        print("curate train: the pipeline config has no train.config (e.g. train: {config: tiny})", file=sys.stderr)
        return 2
    try:
        results = run_pipeline(cfg)
    except (StageConflict, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"curate train: error: {exc}", file=sys.stderr)
        return 2
    print_summary(results, started)
    return 0


def _named_sources(specs: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"{flag} takes NAME=SOURCE, got {spec!r}")
        out.append((name, str(Path(source).resolve())))
    return out


def _print_calibration(summary: dict) -> int:
    print(f"[dedup --calibrate] model {summary['model']}: {summary['positives']} edited copies, "
          f"{summary['negatives']} negative pairs")
    if summary.get("recommended") is None:
        print(f"  no threshold reaches precision {summary['target_precision']}")
    else:
        print(f"  recommended threshold {summary['recommended']:.3f}: precision {summary['precision']:.3f}, "
              f"recall {summary['recall']:.3f} (target precision {summary['target_precision']})")
        for edit, r in summary.get("recall_by_edit", {}).items():
            print(f"    recall {r:.2f}  {edit}")
    print(f"  table and summary: {summary['path']}")
    return 0


def _verify(directory: str) -> int:
    from curate.shards import verify_shards

    report = verify_shards(directory)
    status = "OK" if report.ok else f"FAILED ({len(report.errors)} problems)"
    print(f"[verify] {directory}: {report.shards} shards, {report.samples:,} samples: {status}")
    for e in report.errors:
        print(f"  {e}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
