#!/usr/bin/env bash
# Every GPU-only measurement in one go; on a machine without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")"
timeout 600 python gpu_check.py "$@"
