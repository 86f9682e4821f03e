"""dedup --calibrate: edited copies of a pool sample -> precision/recall per threshold of the copy
embedding, the threshold recommended for a target precision, and precision/recall per edit of the
hash, embedding and verified decisions side by side with the recommended settings
(`dedup_calibration/<embedding>.*`)."""

from __future__ import annotations

from curate.calibrate import COPY_DESCRIPTOR_THRESHOLD
from curate.parts import write_json_atomic, write_table_atomic
from pipelines.config import Config
from pipelines.embedding import resolve_embedding
from pipelines.framework import stage_dir
from pipelines.manifest import read_manifest

FALLBACK_THRESHOLD = COPY_DESCRIPTOR_THRESHOLD  # compared when no cosine reaches the target precision (DINOv2's)


def run(cfg: Config) -> dict:
    """Calibration of the dedup embedding on the pool: summary, PR table and method comparison."""
    from curate.calibrate import compare_methods, comparison_markdown, evaluate_embedder
    from curate.dedup import as_parts, valid_rows
    from pipelines.copy_images import calibration_sample, embedder_fn, verify_settings

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    model = read_manifest(emb_dir)["config"]["model"]
    originals, copies = calibration_sample(cfg, emb_dir, valid_rows(as_parts(str(emb_dir))))
    embed = embedder_fn(cfg, model)
    report = evaluate_embedder(embed, originals, copies, target_precision=dc.target_precision)
    summary = report.summary()
    threshold = report.recommended if report.recommended is not None else FALLBACK_THRESHOLD
    comparison = compare_methods(embed, originals, copies, threshold, cfg.hashdedup.phash_max_distance,
                                 verify_settings(cfg))
    summary["methods"] = comparison
    summary["methods_table"] = comparison_markdown(comparison)
    out = stage_dir(cfg, "dedup_calibration")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{emb_dir.name}.json", summary)
    write_table_atomic(report.table.to_arrow(), out / f"{emb_dir.name}.parquet")
    return {"model": model, "path": str(out / f"{emb_dir.name}.json"), **summary}


def comparison_rows(summary: dict) -> list[str]:
    """Printable lines: the per-edit table and the recommended settings."""
    rec = summary["methods"]["recommended"]
    return [*summary["methods_table"].splitlines(),
            f"recommended: --verify {rec['verify']}" + (f" (or --verify none --threshold {rec['threshold']:.3f})"
                                                         if rec["verify"] == "local" else f" --threshold {rec['threshold']:.3f}"),
            f"local verification: {summary['methods']['verify_stats']['ms_per_pair']} ms per candidate pair"]


