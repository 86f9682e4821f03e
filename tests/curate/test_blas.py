"""faiss's OpenBLAS kernels chosen from the CPU's flags, never over a user's OPENBLAS_CORETYPE."""

import subprocess
import sys

from curate.blas import cpu_flags, openblas_coretype


def test_kernel_family_follows_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                    "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n")
    assert openblas_coretype(cpu_flags(str(info))) == "SkylakeX"
    assert openblas_coretype({"avx", "avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 without bw/vl/dq/cd
    assert openblas_coretype({"sse2", "avx"}) is None
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_a_users_setting_is_kept_and_set_before_faiss_loads():
    code = "import os, curate, faiss; print(os.environ.get('OPENBLAS_CORETYPE'))"
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"OPENBLAS_CORETYPE": "Prescott", "PATH": ""}).stdout.strip()
    assert kept == "Prescott"
    auto = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PATH": ""}).stdout.strip()
    assert auto == str(openblas_coretype(cpu_flags()))  # "SkylakeX" on the development machine
