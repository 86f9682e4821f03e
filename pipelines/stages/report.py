"""report: write report.json (the figures) and one self-contained report.html for a workdir.

Plots (matplotlib, Agg) and image thumbnails (read from the raw shards) are inlined as base64 data
URIs, so the HTML references nothing outside itself. Sections of stages that did not run are skipped.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from curate.parts import write_bytes_atomic, write_json_atomic  # noqa: E402
from curate.report import compute_report  # noqa: E402
from curate.tars import TarReader  # noqa: E402
from pipelines.config import Config  # noqa: E402
from pipelines.manifest import StageResult  # noqa: E402

THUMB = 128
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:4px;text-align:center;font-size:11px}.pair{display:inline-flex;gap:4px;border:1px solid #ccc;padding:4px;
margin:4px}.bad{color:#b00}.good{color:#070}"""
CHECK_SCRIPT = """window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});"""


def _png(fig: plt.Figure) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str, width: int | None = None) -> str:
    """An <img> tag for a data URI."""
    w = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{w}>'


def _hist_plot(hist: dict[str, Any], title: str, log_x: bool) -> str:
    """A bar plot of fixed-edge histogram counts, as a data URI."""
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="k", linewidth=.5)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_ylabel("images")
    return _png(fig)


def _dist_plot(dist: dict[str, int], title: str) -> str:
    """A bar plot of a {group size: number of groups} distribution, as a data URI."""
    fig, ax = plt.subplots(figsize=(5, 3))
    sizes = [int(k) for k in dist]
    ax.bar(sizes, list(dist.values()), edgecolor="k", linewidth=.5)
    ax.set_xticks(sizes)
    ax.set_yscale("log")
    ax.set_xlabel("group size")
    ax.set_ylabel("groups")
    ax.set_title(title)
    return _png(fig)


def _cluster_plot(cl: dict[str, Any]) -> str:
    """Log-log rank/size plot of level-1 cluster sizes before and after balancing, as a data URI."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("before", "before balancing"), ("after", "selected (after)")):
        if key in cl:
            sizes = np.sort(np.asarray(list(cl[key]["sizes"].values()), dtype=float))[::-1]
            sizes = sizes[sizes > 0]
            ax.loglog(np.arange(1, len(sizes) + 1), sizes, marker=".", label=label)
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("records")
    ax.set_title("level-1 cluster sizes")
    ax.legend()
    return _png(fig)


def _thumb(reader: TarReader, loc: dict[str, Any] | None) -> str | None:
    """A JPEG thumbnail data URI of one raw image, or None when it cannot be read."""
    if loc is None:
        return None
    try:
        with Image.open(io.BytesIO(reader.read(loc["raw_shard"], loc["raw_offset"], loc["nbytes"]))) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(reader: TarReader, locs: dict[str, Any], image_id: str, caption: str) -> str:
    """One thumbnail with a caption (or a note when the image cannot be read)."""
    uri = _thumb(reader, locs.get(image_id))
    body = _img(uri, image_id) if uri else '<span class="bad">unreadable</span>'
    return f"<figure>{body}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A simple HTML table."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _funnel_html(f: dict[str, Any]) -> str:
    """The funnel table and the reconciliation line."""
    rows = [[s["stage"], f"{s['in']:,}", f"{s['out']:,}",
             ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()) or "-", "yes" if s["balanced"] else "NO"]
            for s in f["stages"]]
    r = f["reconcile"]
    cls, word = ("good", "reconciles") if r["ok"] else ("bad", "does NOT reconcile")
    line = (f'<p class="{cls}">ingest in {r["ingest_in"]:,} = final out ({r["final_stage"]}) {r["final_out"]:,} '
            f'+ dropped {r["dropped_total"]:,}: {word}</p>')
    return "<h2>Funnel</h2>" + _table(["stage", "in", "out", "dropped", "in = out + dropped"], rows) + line


def render_html(rep: dict[str, Any], workdir: Path) -> str:
    """The self-contained HTML page for a computed report."""
    parts = [f"<h1>Curation report</h1><p>{html.escape(rep['workdir'])}</p>"]
    if rep["funnel"]["stages"]:
        parts.append(_funnel_html(rep["funnel"]))
    if rep["images"]:
        im = rep["images"]
        parts.append(f"<h2>Images</h2><p>{im['ok']:,} ok images</p>"
                     + _img(_hist_plot(im["short_side"], "shorter side (px)", True), "short side histogram")
                     + _img(_hist_plot(im["aspect_ratio"], "aspect ratio (w/h)", True), "aspect ratio histogram"))
    for key, title in (("hash", "Hash duplicates (exact + near)"), ("copy", "Copy duplicates (embeddings)")):
        d = rep["duplicates"].get(key)
        if d:
            plot = _img(_dist_plot(d["size_distribution"], title), title) if d["size_distribution"] else ""
            parts.append(f"<h2>{title}</h2><p>{d['groups']:,} groups, {d['records_in_groups']:,} records, "
                         f"{d['dropped']:,} dropped</p>{plot}")
    if rep["decontamination"]:
        sets = rep["decontamination"]["sets"]
        rows = [[k, v.get("pairs", 0), v.get("pool_images", 0), v.get("eval_images", 0), v.get("contaminated", 0)]
                for k, v in sets.items()]
        parts.append("<h2>Decontamination</h2>" + _table(["set", "pairs", "pool images", "eval images",
                                                          "contaminated"], rows))
    cl = rep["clusters"]
    if cl:
        cap = f"before: entropy {cl['before']['entropy']:.3f}, Gini {cl['before']['gini']:.3f}"
        if "after" in cl:
            cap += f"; after: entropy {cl['after']['entropy']:.3f}, Gini {cl['after']['gini']:.3f}"
        parts.append(f"<h2>Clusters</h2><p>{cl['clustered']:,} records in {cl['n_clusters']} level-1 clusters</p>"
                     f"<figure>{_img(_cluster_plot(cl), 'cluster sizes')}<figcaption>{cap} "
                     "(normalised entropy: 1 = uniform; Gini: 0 = uniform)</figcaption></figure>")
        if cl.get("seeds"):
            parts.append("<h3>Seed retrieval</h3>" + _table(["seed set", "records"], list(cl["seeds"].items())))
    smp = rep["samples"]
    with TarReader(workdir / "ingest") as reader:
        for c in smp["clusters"]:
            figs = "".join(_figure(reader, smp["locations"], i, i) for i in c["ids"])
            parts.append(f"<h3>{c['kind']} cluster {c['cluster']} ({c['size']:,} records)</h3>"
                         f'<div class="grid">{figs}</div>')
        if smp["pairs"]:
            pairs = "".join(f'<div class="pair">{_figure(reader, smp["locations"], p["keeper"], "kept " + p["keeper"])}'
                            f'{_figure(reader, smp["locations"], p["dropped"], p["kind"] + " dropped")}</div>'
                            for p in smp["pairs"])
            parts.append(f"<h2>Duplicate pairs (kept | dropped)</h2>{pairs}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Curation report</title>'
            f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>{''.join(parts)}</body></html>")


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Compute the report and write report.json and report.html (default: `workdir/report/`)."""
    work = Path(workdir)
    out = Path(out_dir) if out_dir is not None else work / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = compute_report(work)
    write_json_atomic(out / "report.json", rep)
    write_bytes_atomic(out / "report.html", render_html(rep, work).encode())
    return {"json": str(out / "report.json"), "html": str(out / "report.html")}


def run(cfg: Config, force: bool = False) -> StageResult:
    """The stats report is cheap and always reflects the workdir as it is now, so it is rewritten.
    With `executor: ray` its dask graphs (one partition per part) run as Ray tasks (Dask on Ray)."""
    t0 = time.time()
    if cfg.executor == "ray":
        import dask
        from ray.util.dask import ray_dask_get

        from pipelines.executors import init_ray

        init_ray(cfg.ray_address)
        with dask.config.set(scheduler=ray_dask_get):
            paths = write_report(cfg.workdir)
    else:
        paths = write_report(cfg.workdir)
    return StageResult("report", str(Path(paths["html"]).parent), "", seconds=time.time() - t0, outputs=paths)
