"""A CPU stand-in for the part of CuPy that kernels/cupy_kl.py uses, backed by the host build.

Why it exists: with it, ``launch_forward``, ``launch_backward``, ``SparseKLCupyFunction``,
``sparse_kl(impl="cupy")`` and the fused-linear path run the real kernels/sparse_kl.cu on CPU
tensors, through the launcher code that runs on a GPU. Arguments are packed as CuPy packs
them (``None`` and arrays as 8-byte pointers, numpy scalars by value at their own size, Python
int as int64 and float as float64) and then checked against the kernel's C signature, read
from the compiled library: a parameter gets exactly its own size and kind (pointer, integer,
floating point), or the launch fails naming it. On a GPU a mismatch would be read silently as
wrong bits.

    from longkd.kernels.host.cupy_host import use_host_execution
    with use_host_execution():
        loss = sparse_kl(logits_on_cpu, ids, tlp, impl="cupy")

Blocks run one at a time and each block's threads all at once (kernels/host/cuda_host.h);
every launch perturbs the thread interleaving differently (``schedule_seed``), so repeating a
computation shows a race as a result that changes.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import types
from collections.abc import Iterator

import numpy as np
import torch

from longkd.kernels.host.build import HostKernelError, Param, load_module

# Grid and block limits of current GPUs (compute capability 7.0 and later).
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
_KIND_NAMES = {
    "p": "pointer",
    "i": "signed integer",
    "u": "unsigned integer",
    "f": "floating point",
    "b": "data",
}


def _dims(value, limits, what: str) -> tuple[int, int, int]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, got {value!r}")
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    if any(d < 1 or d > lim for d, lim in zip(dims, limits)):
        raise HostKernelError(f"CUDA_ERROR_INVALID_VALUE: {what} {dims} outside 1..{limits}")
    return dims


def pack_argument(value) -> tuple[bytes, str]:
    """One launch argument as CuPy passes it: (bytes, numpy kind or "p" for a pointer).

    Raises:
        TypeError: for a type CuPy does not accept.
    """
    if value is None:
        return bytes(8), "p"
    if hasattr(value, "__cuda_array_interface__"):
        return int(value.__cuda_array_interface__["data"][0]).to_bytes(8, "little"), "p"
    if isinstance(value, bool):
        value = np.bool_(value)
    elif isinstance(value, int):
        value = np.int64(value)
    elif isinstance(value, float):
        value = np.float64(value)
    if not isinstance(value, np.generic):
        raise TypeError(f"Unsupported type {type(value)}")
    return value.tobytes(), value.dtype.kind


def check_argument(kernel: str, index: int, param: Param, packed: bytes, kind: str, value) -> None:
    """Raise TypeError unless ``value`` (packed as ``packed``/``kind``) fills ``param`` exactly."""
    ok_kinds = {"p": "piu", "i": "iu", "u": "iu", "f": "f", "b": "biuf"}[param.kind]
    if len(packed) != param.size or kind not in ok_kinds:
        got = "None" if value is None else f"{type(value).__module__}.{type(value).__name__}"
        raise TypeError(
            f"{kernel}: argument {index} ({param.decl}) takes {param.size} bytes of "
            f"{_KIND_NAMES[param.kind]}, got {got} ({len(packed)} bytes)"
        )


class Function:
    """``cupy.cuda.Function``: a RawModule's kernel, launched as ``fn(grid, block, args, shared_mem=)``."""

    def __init__(self, module, name: str, host: HostExecution):
        self._module = module
        self.name = name
        self._host = host
        self._params = module.signature(name)

    @property
    def shared_size_bytes(self) -> int | None:
        """Static shared memory of the kernel, measured by its launches so far (None before any)."""
        return self._module.static_shared_bytes(self.name)

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None):
        grid3 = _dims(grid, MAX_GRID, "grid")
        block3 = _dims(block, MAX_BLOCK, "block")
        if block3[0] * block3[1] * block3[2] > MAX_THREADS_PER_BLOCK:
            raise HostKernelError(f"CUDA_ERROR_INVALID_VALUE: block {block3} has more than 1024 threads")
        if not isinstance(args, tuple | list):
            raise TypeError(f"args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self._params):
            raise TypeError(f"{self.name} takes {len(self._params)} arguments, got {len(args)}")
        packed = []
        for i, (param, value) in enumerate(zip(self._params, args)):
            data, kind = pack_argument(value)
            check_argument(self.name, i, param, data, kind, value)
            packed.append(data)
        self._host.launches += 1
        self._module.launch(self.name, grid3, block3, packed, int(shared_mem), self._host.next_seed())


class RawModule:
    """``cupy.RawModule(code=..., options=...)``: the source compiled by g++ for the host.

    NVRTC's ``-std=`` options are ignored (the host build is C++20); ``-D``/``-U`` are passed on.
    """

    def __init__(self, code: str | None = None, *, options=(), host: HostExecution, **unused):
        if code is None or unused:
            raise TypeError(f"the host RawModule takes code= and options= only, got {sorted(unused)}")
        defines = []
        for opt in options:
            if opt.startswith(("-D", "-U")):
                defines.append(opt)
            elif not opt.startswith(("-std=", "--std=")):
                raise ValueError(f"the host RawModule does not support the option {opt!r}")
        self._module = load_module(code, tuple(defines))
        self._host = host

    def get_function(self, name: str) -> Function:
        return Function(self._module, name, self._host)


@contextlib.contextmanager
def _nothing(*_args, **_kwargs) -> Iterator[None]:
    yield


class HostExecution:
    """The runtime kernels/cupy_kl.py launches through (see ``CudaRuntime`` there), on the CPU.

    Args:
        schedule_seed: 0 runs threads as the OS schedules them; any other value also makes
            each thread yield a pseudo-random number of times after every barrier, with a
            different seed per launch, so repeated runs interleave differently.
    """

    device_type = "cpu"
    device_name = "CPU (host execution)"

    def __init__(self, schedule_seed: int = 1):
        self._seeds = itertools.count(schedule_seed) if schedule_seed else itertools.repeat(0)
        self.launches = 0
        self.namespace = types.SimpleNamespace(
            RawModule=lambda code=None, **kw: RawModule(code, host=self, **kw),
            cuda=types.SimpleNamespace(Device=_nothing, ExternalStream=_nothing),
        )

    def next_seed(self) -> int:
        return next(self._seeds)

    def cupy(self):
        return self.namespace

    def check_device(self) -> None:
        if shutil.which("g++") is None:
            raise RuntimeError("g++ not found on PATH; host execution compiles the kernel with it")

    def current_device(self):
        return None

    def stream(self, device: torch.device) -> int:
        return 0


@contextlib.contextmanager
def use_host_execution(schedule_seed: int = 1) -> Iterator[HostExecution]:
    """Run kernels/cupy_kl.py's launches on the CPU for the duration of the block.

    Args:
        schedule_seed: see ``HostExecution``.

    Yields:
        The installed ``HostExecution`` (``.launches`` counts kernel launches).
    """
    from longkd.kernels import cupy_kl

    host = HostExecution(schedule_seed)
    previous = cupy_kl.set_runtime(host)
    try:
        yield host
    finally:
        cupy_kl.set_runtime(previous)
