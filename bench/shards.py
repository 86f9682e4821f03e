"""Curated shard writing MB/s vs copying the same bytes (same reads) into one file.

Both sides end with fsync: shards (and the plan and index) are made durable before they are renamed
into place, so the baseline copy is flushed to disk too. Each round times the copy and the shards
back to back, in alternating order, after one untimed round of each; reported: best/best and the
median of the per-round ratios.

    python bench/shards.py [--n 5000] [--size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, make_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from curate.ingest import IngestSettings, ingest
    from curate.parts import read_table
    from curate.shards import ShardSettings, write_shards
    from curate.tars import TarReader

    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    make_folder(tmp / "folder", args.n, size=(args.size, args.size))
    ingest([str(tmp / "folder")], tmp / "ingest", IngestSettings(part_size=1000))
    records = read_table(tmp / "ingest")
    total = int(sum(records.column("nbytes").to_pylist()))
    rows = records.select(["raw_shard", "raw_offset", "nbytes"]).to_pylist()
    results: dict[str, list[float]] = {"copy": [], "shards": []}

    def copy() -> None:
        with TarReader(tmp / "ingest") as reader, open(tmp / "copy.bin", "wb") as fh:
            for r in rows:
                fh.write(reader.read(r["raw_shard"], r["raw_offset"], r["nbytes"]))
            fh.flush()
            os.fsync(fh.fileno())

    def shards() -> None:
        write_shards(records, tmp / "ingest", tmp / "out", ShardSettings(max_size=64 * 2**20))

    sides = {"copy": copy, "shards": shards}
    for k in range(-1, args.rounds):  # round -1 warms both sides up (first calls, lazy imports) untimed
        shutil.rmtree(tmp / "out", ignore_errors=True)
        for side in (("copy", "shards") if k % 2 == 0 else ("shards", "copy")):
            t0 = time.perf_counter()
            sides[side]()
            if k >= 0:
                results[side].append(time.perf_counter() - t0)
    copy_mb_s = total / 2**20 / min(results["copy"])
    shard_mb_s = total / 2**20 / min(results["shards"])
    per_round = sorted(c / s for c, s in zip(results["copy"], results["shards"]))
    emit("shards", n=args.n, image_mb=round(total / 2**20, 1), shards_mb_per_s=round(shard_mb_s, 1),
         copy_mb_per_s=round(copy_mb_s, 1), ratio=round(shard_mb_s / copy_mb_s, 3), best_of=args.rounds,
         ratio_median=round(per_round[len(per_round) // 2], 3), ratios_per_round=[round(r, 3) for r in per_round])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
