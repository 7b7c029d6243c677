"""The distillation losses the trainer calls: sparse KL (dispatching to an implementation),
a chunked cross-entropy, and the conversion of cached rows into loss targets.

Why it exists: the trainer should not care which implementation runs. ``sparse_kl`` checks
the arguments once (kernels/validation.py), then runs the CuPy CUDA kernel (kernels/cupy_kl.py)
for CUDA logits when it is available and the chunked torch reference (kernels/reference.py)
otherwise. The CE term and the target conversion live here because they share the same memory
rule: never build an fp32 [N, V] tensor whole. The math is in docs/loss.md.

    from longkd.kernels.sparse_kl import sparse_kl, targets_from_cache
    ids, tlp = targets_from_cache(window.ids, window.logprobs)
    loss = sparse_kl(logits.view(-1, V), ids.view(-1, K), tlp.view(-1, K), mask=m.view(-1))
"""

from __future__ import annotations

import numpy as np
import torch

from longkd.errors import LongkdError
from longkd.kernels.reference import chunk_rows, has_duplicate_ids, reference_on_validated
from longkd.kernels.validation import check_chunk_size, check_id_range, validate_loss_args

IMPLS = ("auto", "reference", "cupy")
CUPY_MISSING = "--loss-impl cupy needs a CUDA device and the `cupy` package (pip install longkd[gpu])"


def _cupy_module():
    """kernels/cupy_kl.py, or None when it cannot be imported (imported lazily: CuPy is optional)."""
    try:
        from longkd.kernels import cupy_kl
    except ImportError:
        return None
    return cupy_kl


def _cupy_ready(logits: torch.Tensor, k: int | None = None):
    """The cupy_kl module if it can run on these logits (and K entries per row), else None.
    Its first use for a device and dtype runs the kernel's self-check (a failure warns once
    and leaves the reference in use)."""
    mod = _cupy_module()
    if mod is None or (k is not None and k > mod.MAX_K):
        return None  # the kernel keeps K values in shared memory; larger K runs the reference
    return mod if mod.ready_for(logits) else None


def resolve_impl(impl: str, logits: torch.Tensor, k: int | None = None) -> str:
    """The implementation ``sparse_kl`` would run for ``impl`` on these logits.

    Args:
        impl: "auto" | "reference" | "cupy".
        logits: the [N, V] logits (only their device and dtype matter).
        k: entries per row, when known ("auto" uses the reference above the kernel's limit).

    Returns:
        "reference" or "cupy".

    Raises:
        LongkdError: unknown ``impl``, or "cupy" where the kernel cannot run.
    """
    if impl not in IMPLS:
        raise LongkdError(f"sparse_kl: unknown impl {impl!r}; use one of {', '.join(IMPLS)}")
    if impl == "reference":
        return "reference"
    ready = _cupy_ready(logits, None if impl == "cupy" else k) is not None
    if impl == "cupy" and not ready:
        mod = _cupy_module()
        on_device = mod is not None and mod.runs_on(logits)
        why = mod.unavailable_reason(logits) if on_device else ""
        where = "" if on_device else f" (logits are on {logits.device})"
        raise LongkdError(CUPY_MISSING + where + (f" ({why})" if why else ""))
    return "cupy" if ready else "reference"


def sparse_kl(
    logits: torch.Tensor,
    ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    mode: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    check_ids: bool = False,
) -> torch.Tensor:
    """Sparse KL(teacher || student) between cached teacher entries and the student's logits.

    Args:
        logits: [N, V] student logits (before 1/T), float32, bfloat16 or float16.
        ids: int64 [N, K] teacher ids; < 0 = padding; distinct within a row.
        target_logprobs: float32 [N, K] teacher log-probs over the full vocabulary (-inf at
            padding); for sampled caches log(counts / draws) (see ``targets_from_cache``).
        mode: "bucket" | "renorm" | "sampled" (docs/loss.md says which to use when).
        temperature: T > 0; the student is softmax(logits / T).
        mask: bool [N] or None; True = row trained.
        reduction: "mean" (over rows with mask True, 0 when none) | "sum" | "none" ([N]).
        impl: "auto" (CuPy kernel for CUDA logits when available, else the reference),
            "reference", or "cupy" (error when the kernel cannot run).
        chunk_size: rows per chunk for the reference (None: automatic, ``chunk_rows(V)``;
            the kernel needs none).
        check_ids: also check that no row repeats an id and, for CUDA ids, that none is
            >= V (costs a sort of ids and a host sync; meant for debugging a new cache or
            data path). CPU ids are always range-checked (no sync there).

    Returns:
        float32 scalar, or float32 [N] for reduction "none".

    Raises:
        LongkdError: on bad shapes, dtypes, devices, options, duplicate ids (with
            ``check_ids``), or ``impl="cupy"`` where the kernel cannot run.
    """
    validate_loss_args(
        logits,
        ids,
        target_logprobs,
        mode=mode,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
        name="sparse_kl",
    )
    if check_ids:
        check_id_range(ids, logits.shape[1], "sparse_kl")
        if has_duplicate_ids(ids):
            raise LongkdError(
                "sparse_kl: some row of ids repeats a token id; each row's ids must be distinct"
            )
    kwargs = dict(mode=mode, temperature=float(temperature), mask=mask, reduction=reduction)
    if resolve_impl(impl, logits, ids.shape[1]) == "cupy":
        from longkd.kernels.cupy_kl import cupy_on_validated

        return cupy_on_validated(
            logits.contiguous(),
            ids.contiguous(),
            target_logprobs.contiguous(),
            mode=mode,
            temperature=float(temperature),
            mask=None if mask is None else mask.contiguous(),
            reduction=reduction,
        )
    return reference_on_validated(logits, ids, target_logprobs, chunk_size=chunk_size, **kwargs)


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy over token chunks: forward keeps per-row lse, backward recomputes softmax."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, chunk_size):
        N, _ = logits.shape
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        keep = targets != ignore_index
        idx = torch.where(keep, targets, 0)[:, None]
        rows = torch.zeros(N, dtype=cdt, device=logits.device)
        lse = torch.empty(N, dtype=cdt, device=logits.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = logits[s:e].to(cdt)  # [n, V]; fp32 per chunk, the logsumexp never in bf16
            lse[s:e] = torch.logsumexp(z, dim=1)
            rows[s:e] = lse[s:e] - z.gather(1, idx[s:e])[:, 0]
            del z
        rows = torch.where(keep, rows, 0)
        count = keep.sum().to(cdt)
        ctx.save_for_backward(logits, idx, keep, lse, count)
        ctx.reduction, ctx.chunk_size = reduction, chunk_size
        rows = rows.to(torch.float32) if cdt == torch.float32 else rows
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / count.clamp_min(1).to(total.dtype) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        logits, idx, keep, lse, count = ctx.saved_tensors
        N = logits.shape[0]
        cdt = lse.dtype
        scale = grad_output.detach().to(cdt).reshape(-1).expand(N)
        if ctx.reduction == "mean":
            scale = scale / count.clamp_min(1)
        scale = torch.where(keep, scale, 0)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            g = logits[s:e].to(cdt, copy=True).sub_(lse[s:e, None]).exp_()  # softmax, in place
            g.scatter_add_(1, idx[s:e], torch.full_like(idx[s:e], -1, dtype=cdt))  # - onehot
            grad[s:e].copy_(g.mul_(scale[s:e, None]))
            del g
        return grad, None, None, None, None


def cross_entropy_chunked(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy without an fp32 [N, V] tensor (the optional CE term).

    Args:
        logits: [N, V] float32, bfloat16 or float16.
        targets: int64 [N] token ids; ``ignore_index`` (-100) rows are skipped.
        reduction: "mean" (over kept rows; 0 with zero gradient when all are ignored, where
            ``F.cross_entropy`` gives NaN) | "sum" | "none" ([N], 0 at ignored rows).
        chunk_size: rows per chunk (None: automatic, ``chunk_rows(V)``).
        ignore_index: target value meaning "no label".

    Returns:
        float32 scalar, or [N] for reduction "none". The gradient has the logits' dtype.

    Raises:
        LongkdError: on bad shapes, dtypes, options, or targets outside [0, V).
    """
    name = "cross_entropy_chunked"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise LongkdError(f"{name}: logits must be a [N, V] tensor; flatten batch and time first")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise LongkdError(f"{name}: logits dtype {logits.dtype} unsupported; use float32, bfloat16, float16")
    N, V = logits.shape
    if not isinstance(targets, torch.Tensor) or targets.shape != (N,) or targets.dtype != torch.int64:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else targets
        raise LongkdError(f"{name}: targets must be int64 [N={N}], got {got}")
    if targets.device != logits.device:
        raise LongkdError(f"{name}: targets are on {targets.device} but logits on {logits.device}; move them")
    if reduction not in ("mean", "sum", "none"):
        raise LongkdError(f"{name}: unknown reduction {reduction!r}; use mean, sum or none")
    check_chunk_size(chunk_size, name)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise LongkdError(
            f"{name}: target {int(targets[bad][0])} is outside the vocabulary [0, {V}); "
            f"use {ignore_index} for positions without a label"
        )
    rows = chunk_rows(V, chunk_size)
    return ChunkedCrossEntropyFunction.apply(logits, targets, int(ignore_index), reduction, rows)


def _as_numpy(x, what):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise LongkdError(f"targets_from_cache: {what} must be an array, got {type(x).__name__}") from exc


def targets_from_cache(ids, logprobs=None, counts=None, draws=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn cached rows into the loss's targets: (ids int64, target_logprobs float32).

    Top-k caches give ``logprobs`` directly; sampled caches give ``counts`` and the manifest's
    ``draws`` (then ``logprobs`` is ignored and recomputed as log(counts / draws) in float64,
    one rounding instead of two). Padding (id < 0, or count 0) gets id -1 and log-prob -inf.

    Args:
        ids: int32/int64 [..., K] numpy array or tensor (``CachedWindow.ids``).
        logprobs: float16/float32 [..., K] (``CachedWindow.logprobs``), needed for top-k.
        counts: uint16 [..., K] sampled counts, or None for top-k.
        draws: the sampled cache's draws per row (``manifest["selection"]["draws"]``).

    Returns:
        (ids int64 [..., K], target_logprobs float32 [..., K]) as CPU tensors.

    Raises:
        LongkdError: on mismatched shapes, a missing ``logprobs``/``draws``, or bad values.
    """
    ids_np = _as_numpy(ids, "ids")
    if ids_np is None or not np.issubdtype(ids_np.dtype, np.integer):
        raise LongkdError("targets_from_cache: ids must be an integer array [..., K]")
    ids64 = ids_np.astype(np.int64)
    if counts is not None:
        c = _as_numpy(counts, "counts")
        if c.shape != ids64.shape:
            raise LongkdError(f"targets_from_cache: counts shape {c.shape} != ids shape {ids64.shape}")
        if draws is None or int(draws) < 1:
            raise LongkdError("targets_from_cache: sampled rows need draws >= 1 (manifest selection.draws)")
        c = c.astype(np.float64)
        pad = (ids64 < 0) | (c <= 0)
        with np.errstate(divide="ignore"):
            lp = np.log(np.where(pad, 1.0, c) / float(draws))
    else:
        lp_in = _as_numpy(logprobs, "logprobs")
        if lp_in is None:
            raise LongkdError("targets_from_cache: pass logprobs (top-k) or counts and draws (sampled)")
        if lp_in.shape != ids64.shape:
            raise LongkdError(f"targets_from_cache: logprobs shape {lp_in.shape} != ids shape {ids64.shape}")
        lp = lp_in.astype(np.float64)
        pad = ids64 < 0
    lp = np.where(pad, -np.inf, lp).astype(np.float32)
    ids64 = np.where(pad, -1, ids64)
    return torch.from_numpy(np.ascontiguousarray(ids64)), torch.from_numpy(np.ascontiguousarray(lp))
