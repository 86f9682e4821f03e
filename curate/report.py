"""Curation report figures: the funnel, image statistics, duplicate groups, clusters and samples.

Every figure over records is computed with dask over the Parquet parts (one partition per part), so
only small aggregates reach pandas; the result is a plain JSON-serialisable dict.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from curate.parts import PART_RE, list_parts, read_aligned

FLOW = ["ingest", "hashdedup", "dedup", "decontaminate", "cluster", "balance", "shards"]
SHORT_SIDE_EDGES = [0, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192]
ASPECT_EDGES = [round(float(x), 4) for x in np.exp2(np.linspace(-2, 2, 17))]
LOC_COLUMNS = ["id", "raw_shard", "raw_offset", "nbytes"]


def read_stage(work: Path, stage: str, columns: list[str]) -> dd.DataFrame | None:
    """A lazy dask frame over one stage's parts (only `columns`), or None when the stage did not run."""
    files = list_parts(work / stage)
    if not files:
        return None
    return dd.read_parquet([str(f) for f in files], columns=columns, split_row_groups=False)


def _aligned_part(index: int, sources: tuple[tuple[str, tuple[str, ...]], ...]) -> pd.DataFrame:
    """Row-aligned columns of part `index` from several stage directories, side by side."""
    table = read_aligned([d for d, _ in sources], index, {d: list(c) for d, c in sources})
    wanted = [c for _, cols in sources for c in cols]
    return table.select(list(dict.fromkeys(wanted))).to_pandas()


def aligned_frame(work: Path, spec: dict[str, list[str]]) -> dd.DataFrame | None:
    """A lazy dask frame joining row-aligned parts of several stages ({stage: columns}), or None."""
    if any(not list_parts(work / s) for s in spec):
        return None
    indices = [int(PART_RE.match(p.name).group(1)) for p in list_parts(work / "ingest")]
    sources = tuple((str(work / s), tuple(c)) for s, c in spec.items())
    return dd.from_map(_aligned_part, indices, sources=sources)


def load_manifest(stage_dir: Path) -> dict | None:
    """The stage manifest, or None when absent."""
    path = stage_dir / "_MANIFEST.json"
    return json.loads(path.read_text()) if path.exists() else None


def funnel(work: Path) -> dict[str, Any]:
    """Per-stage in/out/dropped from the manifests, and whether the counts reconcile."""
    stages = []
    for name in FLOW:
        m = load_manifest(work / name)
        if m is None:
            continue
        c = m.get("counts", {})
        dropped = {str(k): int(v) for k, v in (c.get("dropped") or {}).items()}
        n_in, n_out = int(c.get("in", 0)), int(c.get("out", 0))
        stages.append({"stage": name, "in": n_in, "out": n_out, "dropped": dropped,
                       "dropped_total": sum(dropped.values()), "balanced": n_in == n_out + sum(dropped.values()),
                       "seconds": (m.get("timings") or {}).get("seconds")})
    if not stages:
        return {"stages": [], "reconcile": None}
    for prev, cur in zip(stages, stages[1:]):
        cur["in_matches_previous_out"] = cur["in"] == prev["out"]
    total_in, final_out = stages[0]["in"], stages[-1]["out"]
    drops = sum(s["dropped_total"] for s in stages)
    ok = total_in == final_out + drops and all(s["balanced"] for s in stages)
    return {"stages": stages, "reconcile": {"ok": bool(ok), "ingest_in": total_in, "final_stage": stages[-1]["stage"],
                                            "final_out": final_out, "dropped_total": drops}}


def _hist_part(df: pd.DataFrame, column: str, edges: list[float]) -> pd.DataFrame:
    """Counts of one partition's column over fixed edges (values clipped into the outer bins)."""
    x = np.clip(df[column].to_numpy(dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(x, bins=np.asarray(edges, dtype=np.float64))
    return pd.DataFrame([counts.astype(np.int64)], columns=[f"b{i}" for i in range(len(edges) - 1)])


def histogram(ddf: dd.DataFrame, column: str, edges: list[float]) -> dict[str, Any]:
    """Histogram of `column` over fixed edges: per-partition numpy counts summed by dask."""
    meta = pd.DataFrame({f"b{i}": pd.Series(dtype=np.int64) for i in range(len(edges) - 1)})
    counts = ddf.map_partitions(_hist_part, column, edges, meta=meta).sum().compute()
    return {"edges": [float(e) for e in edges], "counts": [int(v) for v in counts.to_numpy()]}


def images(work: Path) -> dict[str, Any] | None:
    """Short-side and aspect-ratio (width/height) histograms of the ok ingested images."""
    ddf = read_stage(work, "ingest", ["status", "width", "height"])
    if ddf is None:
        return None
    ok = ddf[ddf["status"] == "ok"]
    ok = ok.assign(short_side=ok["width"].where(ok["width"] < ok["height"], ok["height"]),
                   aspect=ok["width"] / ok["height"])
    return {"ok": int(ok.shape[0].compute()), "short_side": histogram(ok, "short_side", SHORT_SIDE_EDGES),
            "aspect_ratio": histogram(ok, "aspect", ASPECT_EDGES)}


def size_distribution(sizes: pd.Series) -> dict[str, int]:
    """{group size: number of groups} for a Series of group sizes."""
    vc = sizes.value_counts().sort_index()
    return {str(int(k)): int(v) for k, v in vc.items()}


def duplicates(work: Path) -> dict[str, Any]:
    """Group-size distributions of hash duplicates (exact/near) and of embedding copies."""
    out: dict[str, Any] = {}
    h = read_stage(work, "hashdedup", ["dup_group", "dup_reason"])
    if h is not None:
        sizes = h[h["dup_group"] >= 0].groupby("dup_group").size().compute()
        reasons = h["dup_reason"].dropna().value_counts().compute()
        out["hash"] = {"groups": int(len(sizes)), "records_in_groups": int(sizes.sum()),
                       "dropped": int((sizes - 1).sum()), "by_reason": {str(k): int(v) for k, v in reasons.items()},
                       "size_distribution": size_distribution(sizes)}
    c = read_stage(work, "dedup", ["copy_group", "copy_of"])
    if c is not None:
        sizes = c[c["copy_group"] >= 0].groupby("copy_group").size().compute()
        out["copy"] = {"groups": int(len(sizes)), "records_in_groups": int(sizes.sum()),
                       "dropped": int(c["copy_of"].notnull().sum().compute()),
                       "size_distribution": size_distribution(sizes)}
    return out


def decontamination(work: Path) -> dict[str, Any] | None:
    """Per evaluation set: matches (pairs, pool and eval images matched) and contaminated records."""
    d = work / "decontaminate"
    if load_manifest(d) is None:
        return None
    sets: dict[str, Any] = {}
    for f in sorted(d.glob("matches-*.parquet")):
        m = dd.read_parquet(str(f), columns=["pool_id", "eval_id"])
        sets[f.stem[len("matches-"):]] = {"pairs": int(m.shape[0].compute()),
                                          "pool_images": int(m["pool_id"].nunique().compute()),
                                          "eval_images": int(m["eval_id"].nunique().compute())}
    r = read_stage(work, "decontaminate", ["contaminated", "contam_set"])
    if r is not None:
        hit = r[r["contaminated"] == True]  # noqa: E712  (nullable column)
        for name, n in hit["contam_set"].fillna("?").value_counts().compute().items():
            sets.setdefault(str(name), {})["contaminated"] = int(n)
    return {"sets": sets}


def balance_stats(sizes: np.ndarray) -> dict[str, float]:
    """Normalised entropy (1 = uniform) and Gini (0 = uniform) of cluster sizes (zeros included)."""
    s = np.asarray(sizes, dtype=np.float64)
    k, total = len(s), float(s.sum())
    if k < 2 or total <= 0:
        return {"entropy": 1.0, "gini": 0.0}
    p = s[s > 0] / total
    entropy = float(-(p * np.log(p)).sum() / math.log(k))
    x = np.sort(s)
    gini = float((2 * np.arange(1, k + 1) - k - 1).dot(x) / (k * total))
    return {"entropy": round(entropy, 6), "gini": round(gini, 6)}


def clusters(work: Path) -> dict[str, Any] | None:
    """Level-1 cluster sizes before balancing and of the selected records after, with their balance."""
    c = read_stage(work, "cluster", ["cluster_l1"])
    if c is None:
        return None
    before = c["cluster_l1"].dropna().astype("int64").value_counts().compute().sort_index()
    out: dict[str, Any] = {"clustered": int(before.sum()), "n_clusters": int(len(before)),
                           "before": {"sizes": {str(k): int(v) for k, v in before.items()},
                                      **balance_stats(before.to_numpy())}}
    j = aligned_frame(work, {"cluster": ["cluster_l1"], "balance": ["selected", "seed_set"]})
    if j is not None:
        sel = j[(j["selected"] == True) & j["cluster_l1"].notnull()]  # noqa: E712  (nullable column)
        after = sel["cluster_l1"].astype("int64").value_counts().compute()
        after = after.reindex(before.index, fill_value=0).sort_index()
        seeds = j["seed_set"].dropna().value_counts().compute()
        out["after"] = {"selected": int(after.sum()), "sizes": {str(k): int(v) for k, v in after.items()},
                        **balance_stats(after.to_numpy())}
        out["seeds"] = {str(k): int(v) for k, v in seeds.items()}
    return out


def _head_per_cluster(df: pd.DataFrame, chosen: list[int], k: int) -> pd.DataFrame:
    """The first `k` rows of each chosen cluster in one partition."""
    df = df[df["cluster_l1"].isin(chosen)]
    return df.groupby("cluster_l1", sort=False).head(k)


def locations(work: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """{id: {raw_shard, raw_offset, nbytes}} for a small set of ids (raw shard locations)."""
    ddf = read_stage(work, "ingest", LOC_COLUMNS)
    if ddf is None or not ids:
        return {}
    rows = ddf[ddf["id"].isin(list(ids))].compute()
    return {str(r.id): {"raw_shard": str(r.raw_shard), "raw_offset": int(r.raw_offset), "nbytes": int(r.nbytes)}
            for r in rows.itertuples() if isinstance(r.raw_shard, str)}


def samples(work: Path, report_clusters: dict | None, n_clusters: int = 2, per_cluster: int = 6,
            n_pairs: int = 6) -> dict[str, Any]:
    """Ids for sample grids: the largest and smallest level-1 clusters, and duplicate pairs."""
    out: dict[str, Any] = {"clusters": [], "pairs": []}
    if report_clusters and report_clusters["before"]["sizes"]:
        sizes = sorted(report_clusters["before"]["sizes"].items(), key=lambda kv: (kv[1], int(kv[0])))
        picks = [("largest", kv) for kv in sizes[::-1][:n_clusters]] + [("smallest", kv) for kv in sizes[:n_clusters]]
        chosen = sorted({int(k) for _, (k, _) in picks})
        j = aligned_frame(work, {"ingest": LOC_COLUMNS, "cluster": ["cluster_l1"]})
        meta = pd.DataFrame({"id": pd.Series(dtype=object), "cluster_l1": pd.Series(dtype=np.float64)})
        rows = j[["id", "cluster_l1"]].map_partitions(_head_per_cluster, chosen, per_cluster, meta=meta).compute()
        for kind, (k, size) in picks:
            ids = rows.loc[rows["cluster_l1"] == int(k), "id"].head(per_cluster).astype(str).tolist()
            out["clusters"].append({"kind": kind, "cluster": int(k), "size": int(size), "ids": ids})
    for stage, of, reason in (("hashdedup", "dup_of", "dup_reason"), ("dedup", "copy_of", None)):
        ddf = read_stage(work, stage, ["id", of] + ([reason] if reason else []))
        if ddf is None:
            continue
        dups = ddf[ddf[of].notnull()].head(n_pairs, npartitions=-1)
        for r in dups.itertuples():
            kind = f"{stage}:{getattr(r, reason)}" if reason else "copy"
            out["pairs"].append({"kind": kind, "keeper": str(getattr(r, of)), "dropped": str(r.id)})
    ids = {i for c in out["clusters"] for i in c["ids"]} | {p[k] for p in out["pairs"] for k in ("keeper", "dropped")}
    out["locations"] = locations(work, sorted(ids))
    return out


def compute_report(workdir: str | os.PathLike) -> dict[str, Any]:
    """All report figures for a workdir (stages that did not run give None or are left out)."""
    work = Path(workdir)
    cl = clusters(work)
    return {"workdir": str(work.resolve()), "funnel": funnel(work), "images": images(work),
            "duplicates": duplicates(work), "decontamination": decontamination(work), "clusters": cl,
            "samples": samples(work, cl)}
