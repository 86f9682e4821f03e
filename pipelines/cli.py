"""The `curate` command: one subcommand per stage, each ending with a one-screen summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.config import Config, load_config
from pipelines.ui import print_summary


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
    p.add_argument("--threshold", type=_threshold_arg,
                   help="cosine above which images are copies with --verify none; auto (default): 0.6 for a "
                        "declared copy descriptor, else calibrated on the pool")
    p.add_argument("--verify", choices=["local", "none"],
                   help="local (default unless --copy-descriptor): verify candidate pairs by local features; "
                        "none: the embedding's cosine decides")
    p.add_argument("--copy-descriptor", action="store_true", default=None,
                   help="the embedding is a trained copy descriptor (e.g. SSCD via torchscript:)")
    p.add_argument("--calibrate", action="store_true",
                   help="edit a pool sample, report precision/recall per edit for hash, embedding and "
                        "verified decisions, and recommend settings")
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

    p = sub.add_parser("plan", help="what a run of CONFIG costs at N records on a cluster: memory, disk, network "
                                    "and time per stage; refuses a config that cannot fit")
    p.add_argument("config_file", metavar="CONFIG", help="YAML config (e.g. configs/lvd142m.yaml)")
    p.add_argument("overrides_pos", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--records", type=int, required=True, help="input records (URLs, files) of the run")
    p.add_argument("--nodes", type=int, help="machines (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per machine (default 0)")
    p.add_argument("--cpus-per-node", type=int, help="cores per machine (default: this machine's)")
    p.add_argument("--mem-per-node", type=float, metavar="GB", help="memory per machine in GiB (default: this machine's)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=D",
                   help="dimension of an embedding the config does not describe, e.g. --dim copy=512 (repeatable)")
    p.add_argument("--eval-images", type=int, metavar="N",
                   help="images of all decontamination evaluation sets together (default: an assumed 100,000)")

    p = sub.add_parser("train", add_help=False,
                       help="train a DINOv2 ViT: curate train CONFIG [key.sub=value ...]; CONFIG is a trainer config "
                            "(tiny, vits14, ... or its YAML) or a pipeline config with a train section (curate, then train); "
                            "--nproc N for N local DDP/FSDP ranks")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("export", add_help=False,
                       help="write a teacher backbone for timm or the official DINOv2 hub: "
                            "curate export CHECKPOINT --format timm|dinov2 --out FILE")
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


def _threshold_arg(text: str) -> str:
    """--threshold: a cosine or auto (null in the config)."""
    if text == "auto":
        return "null"
    try:
        return str(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine or auto, got {text!r}") from None


def _config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    overrides = list(args.overrides)
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `curate` console script: a user's mistake is one line and exit code 2;
    `--debug` (anywhere on the line) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "curate"
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print(f"curate {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (every error ends as one line unless --debug)
        if debug:
            raise
        print(f"curate {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """A one-line message for any error; config key errors name the key and the closest valid one."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OmegaConfBaseException):
        msg = str(getattr(exc, "msg", "") or exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        hint = _did_you_mean(key) if key and "did you mean" not in msg.lower() else ""
        return f"config: {msg}" + (f" (key {key})" if key and key not in msg else "") + hint
    from curate.parts import OutputError

    if isinstance(exc, OutputError):  # already one line: the path, the reason, what to do
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, FileNotFoundError):
        import errno

        what = {errno.ENOSPC: "the disk is full: free space (or choose another --workdir) and rerun the same command",
                errno.EROFS: "the file system is read-only: choose a writable --workdir",
                errno.EACCES: "permission denied: choose a --workdir you can write to",
                errno.EDQUOT: "disk quota exceeded: free space and rerun the same command"}.get(exc.errno)
        if what:
            return f"{exc.filename or ''}: {what}".lstrip(": ")
    text = " ".join(str(exc).split()) or type(exc).__name__
    known = (ValueError, RuntimeError, OSError, KeyError)
    return text if isinstance(exc, known) else f"{type(exc).__name__}: {text} (run again with --debug for the traceback)"


def _did_you_mean(full_key: str) -> str:
    """"; did you mean 'ingest.part_size'?" for a misspelt config key."""
    import dataclasses
    import difflib

    from pipelines.config import Config

    node, parts = Config, full_key.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields or not isinstance(fields[part].type, type):
            node = None
            break
        node = fields[part].type
    if node is None or not dataclasses.is_dataclass(node):
        return ""
    close = difflib.get_close_matches(parts[-1], [f.name for f in dataclasses.fields(node)], n=1)
    return f"; did you mean '{'.'.join([*parts[:-1], close[0]])}'?" if close else ""


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("train", "eval", "export"):
        from pipelines.config import is_pipeline_config
        from train import cli as train_cli

        if argv[0] == "train" and len(argv) > 1 and is_pipeline_config(argv[1]):
            return _curate_then_train(argv[1], argv[2:])
        entry = {"train": train_cli.main, "eval": train_cli.eval_main, "export": train_cli.export_main}[argv[0]]
        return entry(argv[1:])
    args = build_parser().parse_args(argv)
    started = time.time()
    from pipelines.run import run_stage

    if args.command == "ingest":
        cfg = _config(args, {"part_size": "ingest.part_size", "workers": "ingest.workers",
                             "min_side": "ingest.min_side", "concurrency": "download.concurrency",
                             "timeout": "download.timeout", "retries": "download.retries",
                             "max_bytes": "download.max_bytes"})
        cfg.ingest.sources = [str(Path(s).resolve()) for s in args.sources]
        if args.ignore_noai:
            cfg.download.respect_noai = False
        results = run_stage("ingest", cfg, args.force)
    elif args.command == "hashdedup":
        cfg = _config(args, {"max_distance": "hashdedup.phash_max_distance"})
        results = run_stage("hashdedup", cfg, args.force)
    elif args.command == "embed":
        from pipelines.framework import stage_lock
        from pipelines.stages import embed

        cfg = _config(args, {"model": "embed.model", "name": "embed.name", "batch_size": "embed.batch_size",
                             "num_workers": "embed.num_workers", "device": "embed.device",
                             "executor": "executor", "ray_address": "ray_address",
                             "ray_actors": "embed.ray_actors"})
        with stage_lock(cfg.workdir, "embed"):
            results = [embed.run_one(cfg, force=args.force)]
    elif args.command == "dedup":
        cfg = _config(args, {"embedding": "dedup.embedding", "k": "dedup.k", "threshold": "dedup.threshold",
                             "verify": "dedup.verify", "copy_descriptor": "dedup.copy_descriptor",
                             "executor": "executor", "ray_address": "ray_address"})
        if args.calibrate:
            from pipelines.stages import calibrate

            return _print_calibration(calibrate.run(cfg))
        results = run_stage("dedup", cfg, args.force)
    elif args.command == "decontaminate":
        from pipelines.config import EvalSetConfig

        cfg = _config(args, {"threshold": "decontaminate.threshold"})
        for name, source in _named_sources(args.eval_sets or [], "--eval-set"):
            cfg.decontaminate.eval_sets.append(EvalSetConfig(name=name, source=source))
        results = run_stage("decontaminate", cfg, args.force)
    elif args.command == "cluster":
        from pipelines.config import LevelConfig

        cfg = _config(args, {"embedding": "cluster.embedding", "executor": "executor", "ray_address": "ray_address"})
        if args.levels:
            cfg.cluster.levels = [LevelConfig(int(k)) for k in args.levels.split(",")]
        for lv in cfg.cluster.levels:
            for attr, flag in (("n_iters", "iters"), ("resampling_steps", "resampling_steps"),
                               ("sample_size", "sample_size"), ("sampling", "sampling")):
                if getattr(args, flag) is not None:
                    setattr(lv, attr, getattr(args, flag))
        results = run_stage("cluster", cfg, args.force)
    elif args.command == "balance":
        from pipelines.config import SeedSetConfig

        cfg = _config(args, {"target": "balance.target", "strategy": "balance.strategy",
                             "multiplier": "balance.multiplier"})
        for name, source in _named_sources(args.seeds or [], "--seeds"):
            cfg.balance.seeds.append(SeedSetConfig(name=name, source=source))
        if args.n_per_seed:
            for s in cfg.balance.seeds:
                s.n_per_seed = args.n_per_seed
        results = run_stage("balance", cfg, args.force)
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
        results = run_stage("shards", cfg, args.force)
    elif args.command == "report":
        from pipelines.stages.report import write_report

        paths = write_report(args.workdir, args.out)
        print(f"[report] {paths['html']}\n  figures: {paths['json']}")
        return 0
    elif args.command == "run":
        from pipelines.run import run_pipeline, stopped_early

        args.config, args.overrides = args.config_file, list(args.overrides_pos)
        cfg = _config(args, {"executor": "executor", "ray_address": "ray_address"})
        results = run_pipeline(cfg, args.start, args.until, force=args.force)
        if stopped_early(results):
            print_summary(results, started)
            print(f"curate run: error: nothing left to curate after {results[-1].stage} (see the note above)",
                  file=sys.stderr)
            return 2
    elif args.command == "plan":
        from pipelines.plan import plan_command

        print(plan_command(load_config(args.config_file, list(args.overrides_pos)), args))
        return 0
    elif args.command == "demo":
        from pipelines.demo import run_demo

        return run_demo(args.workdir, args.pool_size, args.seed, args.train_iters)
    else:
        raise AssertionError(args.command)
    print_summary(results, started)
    return 0


def _curate_then_train(config: str, overrides: list[str]) -> int:
    """`curate train PIPELINE_CONFIG`: curate (stages already done are skipped), then train and evaluate."""
    from pipelines.run import run_pipeline

    started = time.time()
    flags = argparse.ArgumentParser(prog="curate train", add_help=False)
    flags.add_argument("--nproc", type=int, help="training processes (as for a trainer config)")
    known, overrides = flags.parse_known_args(overrides)
    if known.nproc is not None:
        overrides.append(f"train.nproc={known.nproc}")
    cfg = load_config(config, overrides)
    if not cfg.train.config:
        print("curate train: the pipeline config has no train.config (e.g. train: {config: tiny})", file=sys.stderr)
        return 2
    from pipelines.run import stopped_early

    results = run_pipeline(cfg)
    print_summary(results, started)
    if stopped_early(results):
        print(f"curate train: error: nothing left to curate after {results[-1].stage}; nothing to train on",
              file=sys.stderr)
        return 2
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
    if "methods" in summary:
        from pipelines.stages.calibrate import comparison_rows

        print(f"  per edit, on {summary['methods']['pairs']} labelled pairs (recall per edit):")
        for line in comparison_rows(summary):
            print(f"    {line}")
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
