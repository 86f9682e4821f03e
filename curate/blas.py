"""faiss-cpu's bundled OpenBLAS (0.3.15) picks its kernels by the CPU model. On virtual machines whose
CPU it does not recognise (e.g. a model name "Intel(R) Xeon(R) Processor") it falls back to a generic
kernel: faiss's GEMM-based search and k-means ran at 12 GFLOP/s per core on the development machine,
45 with the AVX-512 kernel (RESULTS "Label rounds that jump ..."). OpenBLAS reads OPENBLAS_CORETYPE
when it loads, so this is set, where the user has not set it, from the CPU's own flags before any
faiss import (curate/__init__.py calls it). numpy's newer OpenBLAS detects the CPU itself either way."""

from __future__ import annotations

import os
import platform


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family these flags support: SkylakeX (AVX-512), Haswell (AVX2 + FMA), or None
    (leave OpenBLAS to detect)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def prefer_fast_blas() -> str | None:
    """Set OPENBLAS_CORETYPE from the CPU's flags unless it is set already (x86-64 Linux only); returns
    the value in force."""
    if "OPENBLAS_CORETYPE" not in os.environ and platform.system() == "Linux" and \
            platform.machine() in ("x86_64", "AMD64"):
        kind = openblas_coretype(cpu_flags())
        if kind:
            os.environ["OPENBLAS_CORETYPE"] = kind
    return os.environ.get("OPENBLAS_CORETYPE")
