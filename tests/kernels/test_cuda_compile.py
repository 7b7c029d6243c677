"""The CUDA source compiles offline with nvcc (no GPU needed): errors, warnings, spills, entries.

The nvcc tests run wherever nvcc is on PATH and skip elsewhere; the NVRTC test (the compiler
CuPy uses at run time) runs wherever libnvrtc can be found. It checks what can be checked without a
device: the source is valid CUDA C++ for Hopper (sm_90) and Ampere (sm_80, the oldest arch
with the bf16 conversion it uses), warnings are errors, no kernel spills registers or uses a
stack frame, every kernel that kernels/cupy_kl.py looks up is exported under its C name, and
the row loops compile to 16-byte vector loads and stores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longkd.kernels.cupy_kl import _SUFFIX, SOURCE_PATH

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")

KERNELS = [f"sparse_kl_{kind}_{suffix}" for kind in ("fwd", "bwd") for suffix in _SUFFIX.values()]


def _nvcc(tmp_path, arch, *extra):
    out = tmp_path / f"sparse_kl_{arch}.{'ptx' if '-ptx' in extra else 'cubin'}"
    cmd = [
        "nvcc",
        f"-arch={arch}",
        "-std=c++17",
        "-Werror",
        "all-warnings",
        *extra,
        "-o",
        str(out),
        str(SOURCE_PATH),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr}"
    return out, proc.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_compiles_without_spills(tmp_path, arch):
    _, log = _nvcc(tmp_path, arch, "-cubin", "--resource-usage", "-Xptxas", "-warn-spills,-warn-lmem-usage")
    entries = re.findall(
        r"Function properties for (\w+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
        r"(\d+) bytes spill loads",
        log,
    )
    assert sorted(e[0] for e in entries) == sorted(KERNELS), log
    for name, stack, spill_st, spill_ld in entries:
        assert (stack, spill_st, spill_ld) == ("0", "0", "0"), f"{name} uses local memory:\n{log}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    # 512-thread blocks with two blocks per SM need <= 64 registers per thread.
    assert regs and max(regs) <= 64, log


@needs_nvcc
def test_ptx_exports_c_names_and_vectorises(tmp_path):
    ptx_path, _ = _nvcc(tmp_path, "sm_90", "-ptx")
    ptx = ptx_path.read_text()
    for name in KERNELS:
        assert re.search(rf"\.entry {name}\(", ptx), f'{name} missing from the PTX (not extern "C"?)'
    # The row loops read and write whole 16-byte vectors (8 bf16/fp16 or 4 fp32 elements).
    assert re.search(r"ld\.global(\.nc)?\.v4\.u32", ptx) and re.search(r"st\.global\.v4\.u32", ptx)
    assert re.search(r"ld\.global(\.nc)?\.v4\.f32", ptx) and re.search(r"st\.global\.v4\.f32", ptx)
    # Row offsets are 64-bit: N * V passes 2^31 at N = 16384, V = 152064.
    assert "mul.wide" in ptx or "mul.lo.s64" in ptx


def _find_nvrtc() -> str | None:
    """libnvrtc: $LONGKD_NVRTC_LIB, the system's, or the nvidia-cuda-nvrtc wheel's."""
    if os.environ.get("LONGKD_NVRTC_LIB"):
        return os.environ["LONGKD_NVRTC_LIB"]
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    for root in map(Path, sys.path):
        hits = sorted(root.glob("nvidia/*/lib/libnvrtc.so*"))
        if hits:
            return str(hits[0])
    return None


def test_nvrtc_compiles_as_cupy_does():
    """CuPy compiles with NVRTC (no host compiler, no include path): the source must suit it."""
    lib_path = _find_nvrtc()
    if lib_path is None:
        pytest.skip("libnvrtc not found (set LONGKD_NVRTC_LIB or install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    src = SOURCE_PATH.read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"sparse_kl.cu", 0, None, None) == 0
    opts = [b"-std=c++17", b"--gpu-architecture=compute_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, f"NVRTC failed:\n{log.value.decode()}"
    assert "warning" not in log.value.decode().lower(), log.value.decode()
