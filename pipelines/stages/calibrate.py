"""dedup --calibrate: edited copies of a pool sample -> precision/recall per threshold of the copy
embedding, and the threshold recommended for a target precision (`dedup_calibration/<embedding>.*`)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from curate.parts import read_table, write_json_atomic, write_table_atomic
from pipelines.aligned import RowMap
from pipelines.config import Config
from pipelines.embedding import load_embedder, resolve_embedding
from pipelines.framework import stage_dir
from pipelines.manifest import read_manifest


def run(cfg: Config) -> dict:
    """Edited copies of a pool sample -> precision/recall per threshold and a recommended threshold."""
    import torch
    from PIL import Image, ImageOps

    from curate.calibrate import evaluate_embedder, make_calibration_set
    from curate.dedup import as_parts, valid_rows
    from curate.embed import autocast, resolve_device
    from curate.images import to_rgb
    from curate.tars import TarReader

    dc = cfg.dedup
    emb_dir = resolve_embedding(cfg, dc.embedding)
    model = read_manifest(emb_dir)["config"]["model"]
    rows = RowMap(stage_dir(cfg, "ingest"), emb_dir)
    ok = rows.emb_rows[np.flatnonzero(valid_rows(as_parts(str(emb_dir))))]
    rng = np.random.default_rng(0)
    chosen = np.sort(ok[rng.choice(len(ok), min(dc.calibrate_sample, len(ok)), replace=False)])
    table = read_table(stage_dir(cfg, "ingest"), ["raw_shard", "raw_offset", "nbytes"]).take(pa.array(chosen))
    with TarReader(stage_dir(cfg, "ingest")) as reader:
        originals = []
        for r in table.to_pylist():
            with Image.open(io.BytesIO(reader.read(r["raw_shard"], r["raw_offset"], r["nbytes"]))) as img:
                originals.append(to_rgb(ImageOps.exif_transpose(img)).copy())
    copies = make_calibration_set(originals, seed=0)
    device = resolve_device(cfg.embed.device)
    emb = load_embedder(model, device)

    def embed(images: list) -> np.ndarray:
        out = []
        with torch.inference_mode(), autocast(device, cfg.embed.precision):
            for s in range(0, len(images), cfg.embed.batch_size):
                x = torch.stack([emb.transform(im) for im in images[s:s + cfg.embed.batch_size]]).to(device)
                out.append(torch.nn.functional.normalize(emb.model(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    report = evaluate_embedder(embed, originals, copies, target_precision=dc.target_precision)
    summary = report.summary()
    out = stage_dir(cfg, "dedup_calibration")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{emb_dir.name}.json", summary)
    write_table_atomic(report.table.to_arrow(), out / f"{emb_dir.name}.parquet")
    return {"model": model, "path": str(out / f"{emb_dir.name}.json"), **summary}
