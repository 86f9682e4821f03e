"""What a person sees at the end of a command: the one-screen summary of stage results."""

from __future__ import annotations

import sys
import time

from pipelines.manifest import StageResult


def print_summary(results: list[StageResult], started: float, out=None) -> None:
    """One screen: per stage, in -> out, drops by reason, notes, time, where the outputs are."""
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
        for note in r.notes:
            print(f"  note: {note}", file=out)
        for name, path in r.outputs.items():
            print(f"  {name}: {path}", file=out)
    print(f"total {time.time() - started:.1f}s", file=out)
