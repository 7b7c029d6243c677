"""The sparse-KL loss's argument contract, checked in one place.

Why it exists: the loss has four public entry points over one contract: ``sparse_kl``
(kernels/sparse_kl.py), ``sparse_kl_reference`` (kernels/reference.py), ``sparse_kl_cupy``
(kernels/cupy_kl.py) and ``fused_linear_sparse_kl`` (kernels/fused_linear.py). Each calls
``validate_loss_args`` once, before any work; what they dispatch to (``reference_on_validated``,
``cupy_on_validated``, the fused path's chunk losses) runs on validated arguments and checks
only what it alone needs. A bad argument fails with one line naming it and the fix.

    from longkd.kernels.validation import validate_loss_args
    validate_loss_args(logits, ids, tlp, mode="bucket", temperature=1.0, mask=None,
                       reduction="mean", chunk_size=2048, name="sparse_kl")
"""

from __future__ import annotations

import operator

import torch

from longkd.errors import LongkdError
from longkd.kernels.loss_modes import loss_mode

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def validate_loss_args(
    logits, ids, target_logprobs, *, mode, temperature, mask, reduction, chunk_size, name, head=None
) -> None:
    """Check the loss's arguments, raising LongkdError naming the offending one.

    Args:
        logits: [N, V] float tensor; None when ``head`` is given.
        ids: int64 [N, K].
        target_logprobs: float32 [N, K].
        mode: a name in kernels/loss_modes.py's table.
        temperature: T > 0.
        mask: bool [N] or None.
        reduction: "mean" | "sum" | "none".
        chunk_size: rows per chunk, >= 1, or None (automatic).
        name: the public function's name, prefixing each message.
        head: for the fused LM-head loss, (hidden [N, d], weight [V, d], bias [V] | None)
            in place of the logits they produce.

    Raises:
        LongkdError: on any mismatch of shape, dtype, device or option, or (for ids on the
            CPU, where the scan costs no host sync) an id >= V.
    """
    loss_mode(mode, name)
    if reduction not in REDUCTIONS:
        raise LongkdError(f"{name}: unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if not float(temperature) > 0:
        raise LongkdError(f"{name}: temperature must be > 0, got {temperature}")
    check_chunk_size(chunk_size, name)
    if head is None:
        rows, device, what = _check_logits(logits, name), logits.device, "logits"
        V = logits.shape[1]
    else:
        rows, device, what = _check_head(*head, name=name), head[0].device, "hidden states"
        V = head[1].shape[0]
    _check_targets(ids, target_logprobs, mask, N=rows, device=device, what=what, name=name)
    if ids.device.type == "cpu":  # a cheap scan here; on CUDA it would be a host sync per call
        check_id_range(ids, V, name)


def validate_head_args(hidden, weight, bias, *, chunk_size, name) -> None:
    """Check the fused LM-head loss's head and chunk size when it computes no KL (CE only).

    Raises:
        LongkdError: as :func:`validate_loss_args`.
    """
    check_chunk_size(chunk_size, name)
    _check_head(hidden, weight, bias, name=name)


def check_chunk_size(chunk_size, name) -> None:
    """``chunk_size`` is None (automatic) or an integer >= 1."""
    if chunk_size is None:
        return
    try:
        value = None if isinstance(chunk_size, bool) else operator.index(chunk_size)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise LongkdError(
            f"{name}: chunk_size must be >= 1 (an integer, or None for automatic), got {chunk_size!r}"
        )


def check_id_range(ids: torch.Tensor, V: int, name: str) -> None:
    """Refuse ids >= V (they would index past the logits' columns).

    Args:
        ids: int64 [N, K] (or [N]), < 0 = padding.
        V: the logits' width (the student's vocabulary).
        name: the public function's name, prefixing the message.

    Raises:
        LongkdError: naming the largest id and V.
    """
    if ids.numel() and int(ids.max()) >= V:
        raise LongkdError(
            f"{name}: ids reach {int(ids.max())} but the logits have V={V} columns; "
            "the cache's vocabulary does not match the student's"
        )


def _check_logits(logits, name) -> int:
    """Logits [N, V] in a supported dtype; returns N."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LongkdError(f"{name}: logits must be a [N, V] tensor, got {shape}; flatten batch and time")
    _check_width(logits.dtype, logits.shape[1], "logits", name)
    return logits.shape[0]


def _check_head(hidden, weight, bias, *, name) -> int:
    """Hidden [N, d], LM-head weight [V, d] and bias [V] | None that agree; returns N."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LongkdError(
            f"{name}: need hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise LongkdError(
            f"{name}: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
            f"{weight.device}) must share dtype and device; cast one of them"
        )
    V = weight.shape[0]
    if bias is not None and (bias.shape != (V,) or bias.dtype != weight.dtype):
        raise LongkdError(f"{name}: bias must be [{V}] in {weight.dtype}, got {tuple(bias.shape)}")
    _check_width(hidden.dtype, V, "hidden states", name)
    return hidden.shape[0]


def _check_width(dtype, V, what, name) -> None:
    if dtype not in LOGIT_DTYPES:
        raise LongkdError(f"{name}: {what} dtype {dtype} unsupported; use float32, bfloat16, float16")
    if V < 1:
        raise LongkdError(f"{name}: logits have an empty vocabulary dimension (V=0)")


def _check_targets(ids, target_logprobs, mask, *, N, device, what, name) -> None:
    """ids int64 [N, K], target_logprobs float32 [N, K], mask bool [N] | None, on ``device``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != N:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LongkdError(f"{name}: ids must be [N={N}, K], got {shape}")
    if ids.dtype != torch.int64:
        raise LongkdError(f"{name}: ids must be int64, got {ids.dtype}; convert with ids.long()")
    if not isinstance(target_logprobs, torch.Tensor) or target_logprobs.shape != ids.shape:
        shape = tuple(target_logprobs.shape) if isinstance(target_logprobs, torch.Tensor) else None
        raise LongkdError(f"{name}: target_logprobs must have the ids' shape {tuple(ids.shape)}, got {shape}")
    if target_logprobs.dtype != torch.float32:
        raise LongkdError(
            f"{name}: target_logprobs must be float32, got {target_logprobs.dtype}; convert with .float()"
        )
    bad_mask = not isinstance(mask, torch.Tensor) or mask.shape != (N,) or mask.dtype != torch.bool
    if mask is not None and bad_mask:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LongkdError(f"{name}: mask must be a bool [N={N}] tensor (True = row trained), got {got}")
    for arg, t in (("ids", ids), ("target_logprobs", target_logprobs), ("mask", mask)):
        if t is not None and t.device != device:
            raise LongkdError(f"{name}: {arg} is on {t.device} but {what} are on {device}; move it")
