"""The CUDA sparse-KL kernel (kernels/sparse_kl.cu) driven through CuPy, with autograd glue.

Why it exists: the student's logits [N, V] are the biggest tensor of a distillation step and
the loss is memory bound; the kernel reads them once for the forward and once more to write
the gradient, never building an fp32 copy. CuPy compiles the packaged .cu source with NVRTC
at first use (cached on disk by CuPy), so the package needs no build step.

Layers, Liger style: kernel -> launch functions (`launch_forward`, `launch_backward`) ->
``SparseKLCupyFunction`` (autograd) -> ``sparse_kl_cupy`` (the reference's signature, used
by ``longkd.kernels.sparse_kl.sparse_kl(impl="cupy")``). ``loss_and_grad_chunk`` is the
per-chunk loss of the fused-linear path.

Launches go on torch's current stream and work on torch tensors by ``data_ptr`` (no copies,
no host sync). The first use of each logits dtype on a device checks the kernel against the
torch reference on a small random problem (``self_check``); a kernel that fails is not used.
Nothing here has run on a GPU yet; in tests the same code runs the kernel on the CPU through
kernels/host/ (``use_host_execution``). See docs/kernels.md.

    python -c "from longkd.kernels import cupy_kl as k; print(k.is_available(), k.unavailable_reason())"
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longkd.errors import LongkdError
from longkd.kernels.loss_modes import MODES
from longkd.kernels.reference import sparse_kl_reference
from longkd.kernels.validation import validate_loss_args

SOURCE_PATH = Path(__file__).with_name("sparse_kl.cu")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# Dynamic shared memory holds K fp32 values per block. A block may use 48 KiB of shared memory
# without opting in, static and dynamic together, and the forward kernel's block reduction
# keeps 96 floats (`red` in sparse_kl.cu) in static shared memory.
FWD_STATIC_SHARED_BYTES = 96 * 4
MAX_K = (48 * 1024 - FWD_STATIC_SHARED_BYTES) // 4

_state: dict = {}
_self_checks: dict = {}  # (device, dtype) -> SelfCheck


class CudaRuntime:
    """What the launches take from CuPy and torch.cuda. ``set_runtime`` swaps it: in tests,
    kernels/host/cupy_host.py puts a CPU stand-in with the same surface in its place."""

    device_type = "cuda"
    device_name = "CUDA"

    def cupy(self):
        import cupy  # noqa: PLC0415 - optional dependency, imported only when used

        return cupy

    def check_device(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")

    def current_device(self):
        return torch.cuda.current_device()

    def stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream


_runtime = CudaRuntime()


def set_runtime(runtime) -> CudaRuntime:
    """Launch through ``runtime`` from now on; forgets compiled modules and checks.

    Returns:
        The runtime in use before.
    """
    global _runtime
    previous, _runtime = _runtime, runtime
    _module.cache_clear()
    _state.clear()
    _self_checks.clear()
    return previous


def _cupy():
    return _runtime.cupy()


@functools.cache
def _module(device_index: int):
    """The compiled RawModule for one device (NVRTC, arch picked by CuPy from the device)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=SOURCE_PATH.read_text(), options=("-std=c++17",))


def _function(device_index: int, kind: str, dtype: torch.dtype):
    return _module(device_index).get_function(f"sparse_kl_{kind}_{_SUFFIX[dtype]}")


def is_available() -> bool:
    """True when CuPy imports, a CUDA device is present and the kernel compiles (cached).

    Returns:
        Whether ``sparse_kl_cupy`` can run; ``unavailable_reason()`` says why not.
    """
    if "available" not in _state:
        try:
            _cupy()
            _runtime.check_device()
            _function(_runtime.current_device(), "fwd", torch.float32)
            _state["available"], _state["reason"] = True, ""
        except Exception as exc:  # any failure means "use the reference", with the reason kept
            _state["available"], _state["reason"] = False, f"{type(exc).__name__}: {exc}"
    return _state["available"]


def unavailable_reason(logits: torch.Tensor | None = None) -> str:
    """Why ``is_available()`` is False, or why the kernel is not used for ``logits`` ("" if it is)."""
    if not is_available() or logits is None:
        return _state["reason"]
    check = _self_checks.get((str(logits.device), logits.dtype))
    return "" if check is None or check.passed else f"self-check failed: {check.describe()}"


def runs_on(logits: torch.Tensor) -> bool:
    """Whether ``logits`` are on the kind of device the kernel launches on (CUDA, or the CPU
    under host execution)."""
    return logits.device.type == _runtime.device_type


def ready_for(logits: torch.Tensor) -> bool:
    """Whether the kernel will be used for these logits: available, on its kind of device, a
    supported dtype, and its self-check for this device and dtype passed (run on first use;
    a failure warns once and the callers fall back to the torch reference)."""
    if not runs_on(logits) or logits.dtype not in _SUFFIX or not is_available():
        return False
    return _checked(logits.device, logits.dtype)


def _checked(device: torch.device, dtype: torch.dtype) -> bool:
    """The self-check's verdict for (device, dtype), running it the first time."""
    key = (str(device), dtype)
    if key not in _self_checks:
        _self_checks[key] = check = self_check(dtype, device)
        if not check.passed:
            warnings.warn(
                f"sparse_kl: the CUDA kernel failed its self-check ({check.describe()}); "
                "using the torch reference for these logits",
                RuntimeWarning,
                stacklevel=4,
            )
    return _self_checks[key].passed


def warmup(dtypes=(torch.float32, torch.bfloat16, torch.float16), device=None) -> None:
    """Compile and load the kernels and run their self-checks ahead of time, keeping first-call
    cost out of training (a failed self-check warns, and the reference is used for that dtype).

    Args:
        dtypes: logits dtypes to prepare.
        device: CUDA device (default: the current one).

    Raises:
        LongkdError: if the kernel cannot run here.
    """
    if not is_available():
        raise LongkdError(f"CuPy sparse-KL kernel unavailable ({unavailable_reason()}); use impl='reference'")
    device = torch.device(device) if device is not None else _default_device()
    for dtype in dtypes:
        if dtype not in _SUFFIX:
            raise LongkdError(f"warmup: unsupported dtype {dtype}; use float32, bfloat16 or float16")
        for kind in ("fwd", "bwd"):
            _function(device.index, kind, dtype)
        _checked(device, dtype)


def _default_device() -> torch.device:
    index = _runtime.current_device()
    return (
        torch.device(_runtime.device_type, index) if index is not None else torch.device(_runtime.device_type)
    )


# Self-check bounds per logits dtype, (loss, gradient), on errors relative to the reference's
# largest |value|. Both sides see the same fp32 values, so the loss differs by summation order
# and fast exp only; the kernel's gradient is rounded once to the logits' dtype (2^-24, 2^-8,
# 2^-11 relative). A shifted index gives errors hundreds of times larger.
SELF_CHECK_TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 2e-3),
}


@dataclass(frozen=True)
class SelfCheck:
    """Outcome of ``self_check``: errors relative to the reference's largest |value|, or the
    exception the kernel raised (``failure``)."""

    dtype: torch.dtype
    device: str
    loss_error: float
    grad_error: float
    seconds: float
    failure: str = ""

    @property
    def passed(self) -> bool:
        loss_tol, grad_tol = SELF_CHECK_TOLERANCES[self.dtype]
        return not self.failure and self.loss_error <= loss_tol and self.grad_error <= grad_tol

    def describe(self) -> str:
        what = f"{self.dtype} on {self.device}"
        if self.failure:
            return f"{what}: {self.failure}"
        loss_tol, grad_tol = SELF_CHECK_TOLERANCES[self.dtype]
        return (
            f"{what}: largest loss error {self.loss_error:.2e} (bound {loss_tol:.0e}), largest gradient "
            f"error {self.grad_error:.2e} (bound {grad_tol:.0e}), relative to the reference"
        )


def _self_check_problem(dtype, device):
    """6 rows over V = 517 (odd: rows start off 16-byte boundaries, ragged tails), K = 9 with
    padding and one row without targets, one masked row; a private generator, so the check
    leaves torch's global random state alone."""
    gen = torch.Generator().manual_seed(1729)
    N, V, K = 6, 517, 9
    logits = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    tlp, ids = torch.log_softmax(torch.randn(N, V, generator=gen) * 2, dim=-1).topk(K, dim=-1)
    pad = torch.zeros(N, K, dtype=torch.bool)
    pad[1, -3:] = True
    pad[4] = True
    ids = ids.masked_fill(pad, -1)
    tlp = tlp.masked_fill(pad, float("-inf"))
    mask = torch.ones(N, dtype=torch.bool)
    mask[2] = False
    row_scale = torch.rand(N, generator=gen) + 0.5
    return [t.to(device) for t in (logits, ids, tlp, mask, row_scale)]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.float() - want).abs().nan_to_num(nan=float("inf")).max()
    return float(diff / want.abs().max().clamp_min(1e-6))


def self_check(dtype: torch.dtype, device=None) -> SelfCheck:
    """Run the kernel on a small random problem and compare it with the torch reference.

    Two launches patterns are checked: the two-pass bucket loss (forward, then backward from
    its stats with a scalar grad_scale) and the same-pass renorm loss (the forward writing the
    gradient, per-row grad_scale), at T = 1.25. Milliseconds on a GPU.

    Args:
        dtype: logits dtype (float32, bfloat16, float16).
        device: where to run (default: the runtime's current device).

    Returns:
        A ``SelfCheck``; ``.passed`` says whether the kernel is within ``SELF_CHECK_TOLERANCES``.
    """
    device = torch.device(device) if device is not None else _default_device()
    start = time.perf_counter()
    T = 1.25
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            logits, ids, tlp, mask, row_scale = _self_check_problem(dtype, device)
            scale = torch.full((1,), 0.5, device=device)
            loss_b, stats = launch_forward(logits, ids, tlp, mask, mode="bucket", temperature=T)
            grad_b = torch.empty_like(logits)
            launch_backward(logits, ids, tlp, mask, stats, grad_b, scale, temperature=T)
            grad_r = torch.empty_like(logits)
            loss_r, _ = launch_forward(
                logits, ids, tlp, mask, mode="renorm", temperature=T, grad=grad_r, grad_scale=row_scale
            )
            loss_error = grad_error = 0.0
            runs = (("bucket", loss_b, grad_b, scale), ("renorm", loss_r, grad_r, row_scale))
            for mode, loss, grad, s in runs:
                leaf = logits.detach().float().requires_grad_(True)
                rows = sparse_kl_reference(
                    leaf, ids, tlp, mode=mode, temperature=T, mask=mask, reduction="none"
                )
                rows.backward(s.expand_as(rows))
                loss_error = max(loss_error, _relative_error(loss, rows.detach()))
                grad_error = max(grad_error, _relative_error(grad, leaf.grad))
    except Exception as exc:  # a kernel that cannot run at all fails its check, with the reason
        return SelfCheck(dtype, str(device), float("inf"), float("inf"), time.perf_counter() - start,
                         f"{type(exc).__name__}: {exc}")  # fmt: skip
    return SelfCheck(dtype, str(device), loss_error, grad_error, time.perf_counter() - start)


def _threads(V: int) -> int:
    # One block per row. Wide rows get more threads so each still has ~16-40 16-byte loads;
    # narrow rows fewer so blocks do not idle. Must be a multiple of 32 and <= 1024.
    if V < 8192:
        return 128
    if V < 65536:
        return 256
    return 512


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def check_inputs(logits, ids, target_logprobs, mask, mode, temperature, reduction="mean"):
    """Validate the kernel's whole contract; raise LongkdError naming the offending argument.

    The loss's shared contract (shapes, dtypes, options, devices) is ``validate_loss_args``
    (kernels/validation.py); ``check_kernel_inputs`` adds what only the kernel needs.
    """
    validate_loss_args(
        logits, ids, target_logprobs, mode=mode, temperature=temperature, mask=mask,
        reduction=reduction, chunk_size=1, name="sparse_kl",
    )  # fmt: skip
    check_kernel_inputs(logits, ids, target_logprobs, mask)


def check_kernel_inputs(logits, ids, target_logprobs, mask):
    """Check what only the kernel needs, on validated arguments: K <= MAX_K, CUDA, contiguity."""
    if ids.shape[1] > MAX_K:
        raise LongkdError(
            f"sparse_kl: K={ids.shape[1]} exceeds the kernel's limit {MAX_K}; use impl='reference'"
        )
    if logits.dtype not in _SUFFIX:
        raise LongkdError(
            f"sparse_kl: the kernel takes float32, bfloat16 or float16 logits, not {logits.dtype}; "
            "use impl='reference'"
        )
    tensors = {"logits": logits, "ids": ids, "target_logprobs": target_logprobs, "mask": mask}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != logits.device or t.device.type != _runtime.device_type:
            raise LongkdError(
                f"sparse_kl: {name} must be on the logits' {_runtime.device_name} device, found {t.device}"
            )
        if not t.is_contiguous():
            raise LongkdError(f"sparse_kl: {name} must be contiguous; call .contiguous() first")


def launch_forward(
    logits,
    ids,
    target_logprobs,
    mask,
    *,
    mode,
    temperature,
    grad=None,
    grad_scale=None,
    loss_rows=None,
    stats=None,
):
    """Run the forward kernel on torch's current stream.

    Args:
        logits: [N, V] fp32/bf16/fp16, contiguous, CUDA.
        ids: int64 [N, K], < 0 = padding.
        target_logprobs: float32 [N, K].
        mask: bool [N] or None.
        mode: "bucket" | "renorm" | "sampled".
        temperature: T > 0.
        grad: optional [N, V] buffer in the logits' dtype (may be ``logits`` itself): receives
            (q - p~) / T * grad_scale in the same pass.
        grad_scale: float32 on device, 1 element (scalar) or [N]; required with ``grad``.
        loss_rows, stats: optional output buffers (float32 [N] and [N, 3]); allocated if None.

    Returns:
        (loss_rows float32 [N], stats float32 [N, 3]: lse, dense multiplier, target scale).
    """
    N, V = logits.shape
    K = ids.shape[1]
    if loss_rows is None:
        loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    if stats is None:
        stats = torch.empty(N, 3, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss_rows, stats
    scale_stride = 0
    if grad is not None:
        scale_stride = _scale_stride(grad_scale, N)
    fn = _function(logits.device.index, "fwd", logits.dtype)
    args = _row_args(logits, ids, target_logprobs, mask, temperature) + (
        np.int32(MODES[mode].code),
        _ptr(loss_rows),
        _ptr(stats),
        _ptr(grad),
        _ptr(grad_scale),
        np.int64(scale_stride),
    )
    _launch(fn, logits, N, V, K, args)
    return loss_rows, stats


def launch_backward(logits, ids, target_logprobs, mask, stats, grad, grad_scale, *, temperature):
    """Write the gradient from the forward's ``stats`` into ``grad`` (may alias ``logits``).

    Args:
        logits, ids, target_logprobs, mask: as for ``launch_forward``.
        stats: float32 [N, 3] from ``launch_forward``.
        grad: [N, V] buffer in the logits' dtype.
        grad_scale: float32 on device, 1 element or [N] (grad_output, times 1/count for a mean).
        temperature: T used in the forward.
    """
    N, V = logits.shape
    if N == 0:
        return
    K = ids.shape[1]
    fn = _function(logits.device.index, "bwd", logits.dtype)
    args = _row_args(logits, ids, target_logprobs, mask, temperature) + (
        _ptr(stats),
        _ptr(grad),
        _ptr(grad_scale),
        np.int64(_scale_stride(grad_scale, N)),
    )
    _launch(fn, logits, N, V, K, args)


def _row_args(logits, ids, target_logprobs, mask, temperature) -> tuple:
    """The arguments both kernels take first, in sparse_kl.cu's order:
    ``logits, ids, tlp, mask, V, K, inv_T``."""
    return (
        _ptr(logits),
        _ptr(ids),
        _ptr(target_logprobs),
        _ptr(_as_u8(mask)),
        np.int32(logits.shape[1]),
        np.int32(ids.shape[1]),
        np.float32(1.0 / temperature),
    )


def _as_u8(mask):
    # torch bool is one byte of 0/1: reinterpret, no copy.
    return None if mask is None else mask.view(torch.uint8)


def _scale_stride(grad_scale, N: int) -> int:
    if grad_scale is None or grad_scale.dtype != torch.float32 or not grad_scale.is_contiguous():
        raise LongkdError("sparse_kl: grad_scale must be a contiguous float32 tensor on the device")
    if grad_scale.numel() == 1:
        return 0
    if grad_scale.numel() == N:
        return 1
    raise LongkdError(f"sparse_kl: grad_scale must have 1 or N={N} elements, got {grad_scale.numel()}")


def _launch(fn, logits, N, V, K, args):
    if V >= 2**31:
        raise LongkdError(f"sparse_kl: V={V} does not fit the kernel's 32-bit column index")
    cupy = _cupy()
    stream = _runtime.stream(logits.device)
    with cupy.cuda.Device(logits.device.index), cupy.cuda.ExternalStream(stream):
        fn((N,), (_threads(V),), args, shared_mem=4 * K)


def _reduce(loss_rows, count, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / count.clamp_min(1.0) if reduction == "mean" else total


def _row_count(mask, N, device):
    # Kept on device: no .item(), no host sync.
    if mask is None:
        return torch.full((), float(N), dtype=torch.float32, device=device)
    return mask.sum(dtype=torch.float32)


def grad_scale_for(grad_output, count, reduction) -> torch.Tensor:
    """Device-side gradient scale: grad_output (scalar or [N]) times 1/count for a mean."""
    g = grad_output.detach().to(torch.float32)
    if reduction == "mean":
        g = g / count.clamp_min(1.0)
    return g.reshape(-1).contiguous()


class SparseKLCupyFunction(torch.autograd.Function):
    """Two-pass autograd: forward reads logits once (loss + per-row stats), backward reads
    them again and writes the gradient scaled by grad_output from device memory."""

    @staticmethod
    def forward(ctx, logits, ids, target_logprobs, mask, mode, temperature, reduction, inplace_grad):
        loss_rows, stats = launch_forward(
            logits, ids, target_logprobs, mask, mode=mode, temperature=temperature
        )
        count = _row_count(mask, logits.shape[0], logits.device)
        ctx.save_for_backward(logits, ids, target_logprobs, mask, stats, count)
        ctx.mode, ctx.temperature, ctx.reduction, ctx.inplace_grad = (
            mode,
            temperature,
            reduction,
            inplace_grad,
        )
        return _reduce(loss_rows, count, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        logits, ids, target_logprobs, mask, stats, count = ctx.saved_tensors
        scale = grad_scale_for(grad_output, count, ctx.reduction)
        grad = logits if ctx.inplace_grad else torch.empty_like(logits)
        launch_backward(logits, ids, target_logprobs, mask, stats, grad, scale, temperature=ctx.temperature)
        return grad, None, None, None, None, None, None, None


def sparse_kl_cupy(
    logits: torch.Tensor,
    ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    mode: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 2048,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Sparse KL between cached teacher entries and the student's logits, on the CUDA kernel.

    Args:
        logits: [N, V] fp32/bf16/fp16 on CUDA, contiguous (the student's logits, before 1/T).
        ids: int64 [N, K] teacher token ids; < 0 = padding; distinct within a row.
        target_logprobs: float32 [N, K] teacher log-probs over the full vocabulary (-inf pad);
            for sampled caches log(counts / draws).
        mode: "bucket" | "renorm" | "sampled" (math in docs/loss.md).
        temperature: T > 0; the student is softmax(z / T).
        mask: bool [N] or None; False rows give zero loss and zero gradient.
        reduction: "mean" (over unmasked rows, 0 when none) | "sum" | "none" ([N]).
        chunk_size: accepted for signature parity with the reference; unused (the kernel
            never builds [N, V] temporaries).
        inplace_grad: write the gradient over ``logits`` in backward, saving an [N, V]
            buffer. Only safe when nothing else needs these logits for its backward.

    Returns:
        float32 scalar, or [N] for reduction="none".

    Raises:
        LongkdError: on bad shapes, dtypes, devices, non-contiguous inputs, K > MAX_K, or a
            kernel that is unavailable or failed its self-check for these logits.
    """
    validate_loss_args(
        logits, ids, target_logprobs, mode=mode, temperature=temperature, mask=mask,
        reduction=reduction, chunk_size=1, name="sparse_kl",
    )  # fmt: skip
    del chunk_size
    return cupy_on_validated(
        logits, ids, target_logprobs, mode=mode, temperature=temperature, mask=mask,
        reduction=reduction, inplace_grad=inplace_grad,
    )  # fmt: skip


def cupy_on_validated(
    logits, ids, target_logprobs, *, mode, temperature, mask, reduction, inplace_grad=False
):
    """``sparse_kl_cupy`` after ``validate_loss_args`` has passed (each public path validates once).

    Raises:
        LongkdError: what only the kernel needs is missing (``check_kernel_inputs``), or the
            kernel cannot run here.
    """
    check_kernel_inputs(logits, ids, target_logprobs, mask)
    if not ready_for(logits):
        why = unavailable_reason(logits)
        raise LongkdError(f"CuPy sparse-KL kernel unavailable ({why}); use impl='reference'")
    return SparseKLCupyFunction.apply(
        logits, ids, target_logprobs, mask, mode, float(temperature), reduction, inplace_grad
    )


def loss_and_grad_chunk(z, ids, target_logprobs, mask, *, mode, temperature, grad_scale=None):
    """Per-chunk loss for the fused-linear path: loss rows and, if asked, the gradient in place.

    Args:
        z: [n, V] logits chunk (owned by the caller; overwritten by the gradient).
        ids, target_logprobs, mask: the chunk's rows, as for ``sparse_kl_cupy``.
        mode, temperature: as for ``sparse_kl_cupy``.
        grad_scale: float32 device tensor, 1 element or [n]; None = loss only.

    Returns:
        (loss_rows float32 [n], dz [n, V] aliasing ``z``, or None without ``grad_scale``);
        computed by the torch reference when the kernel failed its self-check for ``z``.
    """
    check_kernel_inputs(z, ids, target_logprobs, mask)  # the fused path validated the rest
    if not is_available():
        raise LongkdError(f"CuPy sparse-KL kernel unavailable ({unavailable_reason()}); use impl='reference'")
    if not ready_for(z):  # failed its self-check (warned once): the reference, as "auto" would
        return _reference_chunk(z, ids, target_logprobs, mask, mode, temperature, grad_scale)
    grad = z if grad_scale is not None else None
    loss_rows, _ = launch_forward(
        z,
        ids,
        target_logprobs,
        mask,
        mode=mode,
        temperature=float(temperature),
        grad=grad,
        grad_scale=grad_scale,
    )
    return loss_rows, grad


def _reference_chunk(z, ids, target_logprobs, mask, mode, temperature, grad_scale):
    """``loss_and_grad_chunk``'s contract through the torch reference and autograd (the
    fallback for a kernel that failed its self-check): (loss_rows float32 [n], dz [n, V] or None)."""
    kwargs = dict(mode=mode, temperature=temperature, mask=mask, reduction="none")
    if grad_scale is None:
        with torch.no_grad():
            return sparse_kl_reference(z, ids, target_logprobs, **kwargs).float(), None
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        rows = sparse_kl_reference(leaf, ids, target_logprobs, **kwargs)
        weights = grad_scale.to(rows.dtype).reshape(-1).expand(rows.shape[0])
        (dz,) = torch.autograd.grad(rows, leaf, grad_outputs=weights)
    return rows.detach().float(), dz
