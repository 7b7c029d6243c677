"""Compile a CUDA source for the CPU with g++ and launch its kernels on real threads.

Why it exists: the sparse-KL kernel (kernels/sparse_kl.cu) has to run in CI, where there is
no GPU. This compiles the unchanged source against ``cuda_host.h`` (CUDA's execution model on
the host: one OS thread per CUDA thread, real barriers, warp shuffles, shared memory) into a
shared library, cached on disk by a hash of everything that goes into it, and launches its
``extern "C"`` kernels with raw argument bytes, as the CUDA driver does.
``cupy_host.py`` builds the CuPy stand-in on top of this. docs/kernels.md describes the model.

    from longkd.kernels.host.build import load_module
    module = load_module(Path("kernels/sparse_kl.cu").read_text())
    module.signature("sparse_kl_fwd_f32")   # [Param(code='p8', decl='const F32::S* logits'), ...]

The cache lives in $LONGKD_HOST_CACHE, else $XDG_CACHE_HOME/longkd/host-kernels, else
~/.cache/longkd/host-kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

HEADER_PATH = Path(__file__).with_name("cuda_host.h")
COMPILER = "g++"
COMPILE_FLAGS = (
    "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wall",
    "-Wno-unknown-pragmas", "-x", "c++", "-DLONGKD_HOST",
)  # fmt: skip
# CUDA's per-block shared memory limit without an opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize):
# static plus dynamic bytes must fit.
DEFAULT_SHARED_LIMIT = 48 * 1024
# What cuda_host.h's __global__ expands to; it marks the kernels in the preprocessed source.
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__attribute__\(\(visibility\("default"\), used\)\)\s+void\s+(\w+)\s*\(([^)]*)\)'
)
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")


class HostCompileError(RuntimeError):
    """g++ rejected the source (the message carries the compiler's log)."""


class HostKernelError(RuntimeError):
    """A launch was invalid or a kernel fault was detected (deadlock, misaligned access, ...)."""


class _LaunchConfig(ctypes.Structure):
    # Mirrors longkd_host::LaunchConfig in cuda_host.h.
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_ulonglong),
        ("schedule_seed", ctypes.c_ulonglong),
    ]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``code`` is p/i/u/f/b plus its size in bytes (from the compiled
    C++ type), ``decl`` its declaration as written in the source (for messages)."""

    code: str
    decl: str

    @property
    def size(self) -> int:
        return int(self.code[1:])

    @property
    def kind(self) -> str:
        return self.code[0]


@dataclass(frozen=True)
class StaticShared:
    """A static ``__shared__`` variable of the library: its mangled name, address and size."""

    name: str
    address: int
    size: int


def cache_dir() -> Path:
    """Where compiled libraries are kept (created on first use)."""
    if os.environ.get("LONGKD_HOST_CACHE"):
        return Path(os.environ["LONGKD_HOST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longkd" / "host-kernels"


@functools.cache
def compiler_version() -> str:
    """``g++ --version``'s first line; raises HostCompileError when g++ is missing."""
    if shutil.which(COMPILER) is None:
        raise HostCompileError(f"{COMPILER} not found on PATH; the host kernel build needs a C++20 compiler")
    out = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostCompileError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr}")
    return proc.stdout


def build(code: str, defines: tuple[str, ...] = ()) -> Path:
    """Compile ``code`` (CUDA source) into a shared library, reusing a cached build.

    Args:
        code: the .cu source text.
        defines: extra ``-D``/``-U`` options.

    Returns:
        Path of the library.

    Raises:
        HostCompileError: when g++ is missing or rejects the source.
    """
    # Everything that shapes the library, this file's own code included.
    parts = (code, HEADER_PATH.read_text(), Path(__file__).read_text(), *defines, compiler_version())
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    out_dir = cache_dir() / key
    lib = out_dir / "kernels.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    source = tmp / "kernel.cu"
    source.write_text(code)
    base = [COMPILER, *COMPILE_FLAGS, *defines, f"-I{HEADER_PATH.parent}", "-include", HEADER_PATH.name]
    expanded = _run([*base[:1], "-E", "-P", *base[1:], str(source)], "preprocessing")
    kernels = _KERNEL_RE.findall(expanded)
    if not kernels:
        raise HostCompileError('no __global__ kernels found in the source (extern "C" __global__ void ...)')
    wrapper = tmp / "module.cc"
    lines = [f'#include "{source}"'] + [f"LONGKD_HOST_EXPORT({name})" for name, _ in kernels]
    wrapper.write_text("\n".join(lines) + "\n")
    params = (f"{name}({' '.join(decls.split())})" for name, decls in kernels)  # one line each
    (tmp / "params.txt").write_text("\n".join(params) + "\n")
    _run([*base, str(wrapper), "-o", str(tmp / "kernels.so")], "g++")
    for name in ("kernel.cu", "params.txt"):
        os.replace(tmp / name, out_dir / name)
    os.replace(tmp / "kernels.so", lib)  # last: its presence means the build is complete
    shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _elf_symbols(path: Path, table: int) -> list[tuple[str, int, int, int, int]]:
    """Defined symbols of an ELF64 little-endian file's symbol table ``table`` (2 = .symtab,
    11 = .dynsym): (name, type (1 object, 2 function), writable (in a writable section), value, size)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise HostKernelError(f"{path} is not a 64-bit little-endian ELF library")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != table:
            continue
        str_off = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info, _other, st_shndx, value, sym_size = struct.unpack_from("<IBBHQQ", data, pos)
            if st_shndx == 0 or st_shndx >= shnum:  # undefined, absolute or common
                continue
            name = data[str_off + st_name : data.index(b"\0", str_off + st_name)].decode()
            writable = bool(sections[st_shndx][2] & 1)  # SHF_WRITE
            found.append((name, st_info & 0xF, writable, value, sym_size))
    return found


def _static_locals(path: Path) -> list[tuple[str, int, int]]:
    """Writable function-local static objects (mangled ``_ZZ``) of the source: (name, value, size).

    In a kernel source these are its ``__shared__`` variables. The standard library's
    (``_ZZNSt``, ``_ZZSt``) and the header's own (namespace longkd_host, longkd_host_* entry
    points) are left out.
    """
    ours = re.compile(r"_ZZ(?!N?St)(?!.*longkd_host)")
    return [
        (name, value, size)
        for name, kind, writable, value, size in _elf_symbols(path, 2)
        if kind == 1 and writable and size > 0 and ours.match(name)
    ]


class HostModule:
    """A compiled library: kernel signatures, launches, static shared memory bookkeeping."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.longkd_host_last_error.restype = ctypes.c_char_p
        decls = {}
        for line in (path.parent / "params.txt").read_text().splitlines():
            name, params = line.split("(", 1)
            decls[name] = [p.strip() for p in params.rstrip(")").split(",") if p.strip()]
        self._decls = decls
        self.static_shared = self._register_static_shared()
        self._static_bytes: dict[str, int] = {}

    @property
    def kernels(self) -> list[str]:
        """Names of the source's kernels."""
        return list(self._decls)

    def _register_static_shared(self) -> list[StaticShared]:
        # Load address = a known symbol's address minus its value in the file.
        anchor = ctypes.cast(self._lib.longkd_host_last_error, ctypes.c_void_p).value
        symbols = _elf_symbols(self.path, 11)
        base = anchor - next(value for name, _, _, value, _ in symbols if name == "longkd_host_last_error")
        shared = [StaticShared(n, base + v, s) for n, v, s in _static_locals(self.path)]
        addrs = (ctypes.c_void_p * max(len(shared), 1))(*[s.address for s in shared])
        sizes = (ctypes.c_ulonglong * max(len(shared), 1))(*[s.size for s in shared])
        self._lib.longkd_host_set_static_shared(addrs, sizes, len(shared))
        return shared

    def signature(self, name: str) -> list[Param]:
        """The kernel's parameters, from the compiled C++ types.

        Raises:
            HostKernelError: unknown kernel name (CUDA_ERROR_NOT_FOUND on a GPU).
        """
        if name not in self._decls:
            raise HostKernelError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name!r}")
        fn = getattr(self._lib, f"longkd_host_signature__{name}")
        fn.restype = ctypes.c_char_p
        codes = [c for c in fn().decode().split(",") if c]
        return [Param(c, d) for c, d in zip(codes, self._decls[name], strict=True)]

    def static_shared_bytes(self, name: str) -> int | None:
        """Static shared memory the kernel used in its launches so far (None before the first)."""
        return self._static_bytes.get(name)

    def launch(self, name: str, grid, block, arg_bytes: list[bytes], shared_mem: int, seed: int) -> None:
        """Run the kernel over the grid; every block's threads run concurrently.

        Args:
            name: kernel name.
            grid, block: 3-tuples of positive ints.
            arg_bytes: each parameter's bytes, in order (as many bytes as the parameter has).
            shared_mem: dynamic shared memory bytes per block.
            seed: 0, or a seed for extra thread-interleaving perturbation.

        Raises:
            HostKernelError: shared memory over the limit, or a fault in the kernel.
        """
        static = self._static_bytes.get(name, 0)
        self._check_shared(name, static, shared_mem)
        cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, seed)
        buffers = [ctypes.create_string_buffer(b, max(len(b), 1)) for b in arg_bytes]
        ptrs = (ctypes.c_void_p * max(len(buffers), 1))(*[ctypes.addressof(b) for b in buffers])
        rc = getattr(self._lib, f"longkd_host_launch__{name}")(ctypes.byref(cfg), ptrs)
        touched = (ctypes.c_ubyte * max(len(self.static_shared), 1))()
        self._lib.longkd_host_static_shared_touched(touched, len(self.static_shared))
        used = sum(s.size for s, t in zip(self.static_shared, touched) if t)
        self._static_bytes[name] = max(static, used)
        if rc != 0:
            raise HostKernelError(f"{name}: {self._lib.longkd_host_last_error().decode()}")
        self._check_shared(name, self._static_bytes[name], shared_mem)

    @staticmethod
    def _check_shared(name: str, static: int, dynamic: int) -> None:
        if static + dynamic > DEFAULT_SHARED_LIMIT:
            raise HostKernelError(
                f"CUDA_ERROR_INVALID_VALUE: {name} asks for {dynamic} bytes of dynamic shared memory on top "
                f"of {static} static bytes; a block may use {DEFAULT_SHARED_LIMIT} in all without opting in"
            )


_loaded: dict[Path, HostModule] = {}


def load_module(code: str, defines: tuple[str, ...] = ()) -> HostModule:
    """Build (or reuse) and load the library for ``code``; one HostModule per library per process."""
    path = build(code, defines)
    if path not in _loaded:
        _loaded[path] = HostModule(path)
    return _loaded[path]
