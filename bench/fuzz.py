"""Benchmark run of the parser fuzzing in tests/curate/test_fuzz.py: thousands of cases per parser.

Runs the suite's Hypothesis tests with FUZZ_EXAMPLES cases each (half that for the tar parser,
whose every case is a whole ingest), randomized from --seed, and prints one JSON line: cases per
parser, seconds, and the failing tests (none expected; a failure prints its reproducer).

    python bench/fuzz.py [--examples 3000] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from _common import ROOT, emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_RANDOM": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--hypothesis-seed={args.seed}", f"--junitxml={report}",
                               "tests/curate/test_fuzz.py", "-k", "not known_config_bugs"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.time() - start
        cases = list(ET.parse(report).getroot().iter("testcase"))
        tests = {c.get("name"): {"seconds": round(float(c.get("time", 0)), 1),
                                 "failed": c.find("failure") is not None or c.find("error") is not None}
                 for c in cases}
        for c in cases:  # each failure with its falsifying example, for an @example regression
            bad = c.find("failure") if c.find("failure") is not None else c.find("error")
            if bad is not None:
                print(f"==== {c.get('name')}\n{(bad.text or '')[-6000:]}", file=sys.stderr)
    failed = [name for name, t in tests.items() if t["failed"]]
    if proc.returncode not in (0, 1):
        print(proc.stdout[-4000:], file=sys.stderr)
    emit("fuzz", examples_per_parser=args.examples, tar_examples=max(1, args.examples // 2), seed=args.seed,
         seconds=round(seconds, 1), tests={k: v["seconds"] for k, v in tests.items()}, failed=failed)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
