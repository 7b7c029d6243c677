"""LM head + sparse KL (+ next-token CE) in token chunks, never materialising the [N, V] logits.

Why it exists: at long context the student's logits dwarf everything else (N = 32768 tokens,
V = 152064: 10 GB in bf16, 20 GB more for an fp32 softmax). Like Liger's fused linear
cross-entropy, this computes, per chunk of tokens, logits = hidden @ W^T, the losses and their
gradient dZ in the same buffer, then immediately dX = dZ @ W and dW += dZ^T @ X (fp32
accumulation), keeping only O(chunk * V) alive. One matmul per chunk feeds both the KL and
the CE; a term whose weight is 0 is computed for the log only (no gradient work). Forward
stores dX, dW, db; backward scales them by grad_output. For reduction="none" the gradient
needs a per-row weight, so backward re-runs the chunks.

The per-chunk loss is the torch one (kernels/reference.py ``head_chunk``), or a pluggable KL
(``loss_impl``): the CuPy kernel on CUDA (gradient written in place over the chunk's logits),
or any function with the ``ChunkLoss`` signature, which is how the chunking is tested against
an independent oracle.

    from longkd.kernels.fused_linear import fused_linear_losses
    out = fused_linear_losses(h.view(-1, d), model.lm_head.weight, ids=ids, target_logprobs=lp,
                              targets=next_ids, mask=m, kd_weight=1.0, ce_weight=0.1)
    out.loss.backward()    # out.kl and out.ce are detached means, for the log
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from longkd.errors import LongkdError
from longkd.kernels.loss_modes import MODES
from longkd.kernels.reference import (
    IGNORE_INDEX,
    RowTargets,
    chunk_rows,
    head_chunk,
    warn_unnormalised,
)
from longkd.kernels.sparse_kl import resolve_impl
from longkd.kernels.validation import validate_head_args, validate_loss_args

# loss_impl(z [n, V], ids [n, K], target_logprobs [n, K], mask [n] | None, *, mode, temperature,
#           grad_scale float32 (1 element or [n]) | None) -> (loss_rows float32 [n], dz [n, V] | None)
# dz = grad_scale * d(loss_rows)/dz, in z's dtype; it may alias z (z belongs to the caller).
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
F64 = torch.float64


class HeadLosses(NamedTuple):
    """What :func:`fused_linear_losses` returns.

    Attributes:
        loss: kd_weight * kl + ce_weight * ce, a scalar with a graph.
        kl: the KL's mean over trained rows (detached), or None without teacher entries.
        ce: the CE's mean over labelled rows (detached), or None without targets.
    """

    loss: torch.Tensor
    kl: torch.Tensor | None
    ce: torch.Tensor | None


def resolve_chunk_loss(loss_impl, chunk: torch.Tensor, k: int | None) -> ChunkLoss | None:
    """The per-chunk KL to run: a given ``ChunkLoss``, or by name as ``sparse_kl``'s ``impl``.

    Args:
        loss_impl: a ``ChunkLoss``, or "auto" (the CuPy kernel for CUDA chunks when it is
            available), "reference" (the torch loss) or "cupy".
        chunk: a tensor with the chunk logits' device and dtype.
        k: entries per row (above the kernel's limit "auto" runs the torch loss).

    Returns:
        The ``ChunkLoss``, or None for the torch ``head_chunk`` (which also does the CE).

    Raises:
        LongkdError: an unknown name, or "cupy" where the kernel cannot run.
    """
    if callable(loss_impl):
        return loss_impl
    if resolve_impl(loss_impl, chunk, k) == "cupy":
        from longkd.kernels import cupy_kl

        return cupy_kl.loss_and_grad_chunk
    return None


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """acc (fp32 or fp64) += a @ b (``first``: acc = a @ b, so acc needs no zero fill) without
    rounding the product to a's (bf16/fp16) dtype."""
    if a.dtype != acc.dtype and a.is_cuda:
        try:  # cuBLAS writes fp32 straight from its fp32 accumulators
            prod = torch.mm(a, b, out_dtype=acc.dtype)
            acc.copy_(prod) if first else acc.add_(prod)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    a, b = a.to(acc.dtype), b.to(acc.dtype)
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


@dataclass
class _Terms:
    """The loss terms of one call, everything but the head's tensors (validated)."""

    kd: RowTargets | None  # teacher rows over all N (None: no KL)
    ids: torch.Tensor | None
    tlp: torch.Tensor | None
    mask: torch.Tensor | None
    targets: torch.Tensor | None  # next-token ids [N], IGNORE_INDEX = none (None: no CE)
    mode: str
    temperature: float
    kd_weight: float
    ce_weight: float
    reduction: str
    chunk: int
    loss_impl: ChunkLoss | str
    post: Callable[[torch.Tensor], torch.Tensor] | None

    def counts(self, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows the KL and the CE average over, as float64 device tensors (no host sync)."""
        kd = (
            torch.full((), float(N), dtype=F64, device=device)
            if self.mask is None
            else self.mask.sum().to(F64)
        )
        ce = (
            (self.targets != IGNORE_INDEX).sum().to(F64)
            if self.targets is not None
            else torch.zeros((), dtype=F64, device=device)
        )
        return kd, ce

    def row_scales(self, N: int, device, grad_rows: torch.Tensor | None):
        """d(loss)/d(KL row) and d(loss)/d(CE row) as [N] float64 tensors (None: that term
        trains nothing). ``grad_rows``: the per-row grad_output of reduction "none"."""
        kd_n, ce_n = self.counts(N, device)
        one = torch.ones((), dtype=F64, device=device)
        if self.reduction == "mean":
            kd_base, ce_base = 1 / kd_n.clamp_min(1), 1 / ce_n.clamp_min(1)
        else:
            kd_base = ce_base = one
        if grad_rows is not None:
            kd_base = ce_base = grad_rows.to(F64)
        kd = None if (self.kd is None or self.kd_weight == 0) else (self.kd_weight * kd_base).expand(N)
        ce = None if (self.targets is None or self.ce_weight == 0) else (self.ce_weight * ce_base).expand(N)
        return kd, ce


def _run_chunks(hidden, weight, bias, t: _Terms, kd_scale, ce_scale, need):
    """Loop over token chunks: loss rows and (with scales) dX, dW, db.

    Args:
        kd_scale, ce_scale: float64 [N] d(loss)/d(row) of each term, or None (no gradient).
        need: (dX, dW, db) flags.

    Returns:
        (kl_rows float64 [N] | None, ce_rows float64 [N] | None, dX [N, d] | None,
        dW [V, d] | None, db [V] | None), dW and db in fp32 (fp64 for fp64 inputs).
    """
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cdt = F64 if hidden.dtype == F64 else torch.float32  # the loss's compute dtype
    grads = kd_scale is not None or ce_scale is not None
    kl_rows = None if t.kd is None else torch.zeros(N, dtype=F64, device=dev)
    ce_rows = None if t.targets is None else torch.zeros(N, dtype=F64, device=dev)
    dx = torch.empty_like(hidden) if grads and need[0] else None
    dw = torch.empty(V, d, dtype=cdt, device=dev) if grads and need[1] else None
    dw_first = True
    db = torch.zeros(V, dtype=cdt, device=dev) if grads and need[2] else None
    rows = min(t.chunk, N)
    zbuf = torch.empty(rows, V, dtype=weight.dtype, device=dev)  # reused: fresh pages cost
    work = None
    impl = resolve_chunk_loss(t.loss_impl, zbuf, None if t.ids is None else t.ids.shape[1])

    def own_buffer(n):  # a compute-dtype chunk buffer, allocated once
        nonlocal work
        if work is None:
            work = torch.empty(rows, V, dtype=cdt, device=dev)
        return work[:n]

    def logits_of(x):
        z = F.linear(x, weight, bias)
        return z if t.post is None else t.post(z)

    for s in range(0, N, rows):
        e = min(s + rows, N)
        n, x = e - s, hidden[s:e]
        raw = zbuf[:n]
        if bias is None:
            torch.mm(x, weight.t(), out=raw)
        else:
            torch.addmm(bias, x, weight.t(), out=raw)
        leaf = zp = None
        src = raw
        if t.post is not None:  # its derivative is chained through autograd on the chunk
            with torch.enable_grad():
                leaf = raw.detach().requires_grad_(grads)
                zp = t.post(leaf)
            src = zp.detach()
        kd = None if t.kd is None else t.kd.rows(s, e)
        targets = None if t.targets is None else t.targets[s:e]
        kds = None if kd_scale is None else kd_scale[s:e]
        ces = None if ce_scale is None else ce_scale[s:e]

        def recompute(r, x=x):
            return logits_of(x[r])

        if impl is None:
            z = raw if (src is raw and raw.dtype == cdt) else own_buffer(n).copy_(src)
            res = head_chunk(
                z, kd=kd, temperature=t.temperature, ce_targets=targets, kd_scale=kds, ce_scale=ces,
                recompute=recompute,
            )  # fmt: skip
            dz = res.grad
            if kl_rows is not None:
                kl_rows[s:e] = res.kl
            if ce_rows is not None:
                ce_rows[s:e] = res.ce
        else:  # a plugged KL; the CE, if any, by the torch loss on a copy (the KL may write over z)
            dz = None
            if targets is not None:
                res = head_chunk(own_buffer(n).copy_(src), kd=None, ce_targets=targets, ce_scale=ces)
                ce_rows[s:e], dz = res.ce, res.grad
            if kd is not None:
                scale = None if kds is None else kds.to(torch.float32).contiguous()
                zin = raw if src is raw else src.clone()  # post's graph may hold src
                chunk_mask = None if t.mask is None else t.mask[s:e]
                got, dz_kl = impl(
                    zin, t.ids[s:e], t.tlp[s:e], chunk_mask, mode=t.mode, temperature=t.temperature,
                    grad_scale=scale,
                )  # fmt: skip
                kl_rows[s:e] = got
                if dz_kl is not None:
                    dz = dz_kl if dz is None else dz.add_(dz_kl)
        if dz is None:
            continue
        if leaf is not None:
            (dz,) = torch.autograd.grad(zp, leaf, grad_outputs=dz.to(zp.dtype))
            del zp, leaf
        with torch.no_grad():
            if dz.dtype != hidden.dtype:
                dz = raw.copy_(dz)  # the chunk's logits are spent: reuse their buffer
            if dx is not None:
                torch.mm(dz, weight, out=dx[s:e])  # [n, V] @ [V, d]
            if dw is not None:
                _accumulate_mm(dw, dz.t(), x, first=dw_first)  # [V, n] @ [n, d]
                dw_first = False
            if db is not None:
                db.add_(dz.sum(0, dtype=db.dtype))
        del dz
    if dw is not None and dw_first:  # no chunk had a gradient
        dw.zero_()
    return kl_rows, ce_rows, dx, dw, db


def _reduce(rows, count, reduction, out_dtype):
    if rows is None:
        return None
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum()
    return (total / count.clamp_min(1) if reduction == "mean" else total).to(out_dtype)


class FusedLinearLossFunction(torch.autograd.Function):
    """Liger-style: gradients computed in forward, scaled by grad_output in backward.

    Outputs (loss, kl, ce); kl and ce are not differentiable (zeros for a term not computed).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms: _Terms):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        N = hidden.shape[0]
        out_dtype = F64 if hidden.dtype == F64 else torch.float32
        ctx.terms, ctx.need, ctx.used = terms, need, False
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        kd_scale = ce_scale = None
        if any(need) and terms.reduction != "none":
            kd_scale, ce_scale = terms.row_scales(N, hidden.device, None)
        with torch.autocast(hidden.device.type, enabled=False):
            kl_rows, ce_rows, dx, dw, db = _run_chunks(hidden, weight, bias, terms, kd_scale, ce_scale, need)
        kd_n, ce_n = terms.counts(N, hidden.device)
        kl = _reduce(kl_rows, kd_n, terms.reduction, out_dtype)
        ce = _reduce(ce_rows, ce_n, terms.reduction, out_dtype)
        zero = torch.zeros((N,) if terms.reduction == "none" else (), dtype=out_dtype, device=hidden.device)
        loss = zero
        if kl is not None:
            loss = loss + terms.kd_weight * kl
        if ce is not None:
            loss = loss + terms.ce_weight * ce
        if terms.reduction == "none":
            # Per-row grad_output weights dW row by row: re-run the chunks in backward.
            ctx.save_for_backward(hidden, weight, bias)
        else:
            ctx.grads = (dx, dw, db)  # not saved tensors: backward scales them in place
        kl = zero.clone() if kl is None else kl
        ce = zero.clone() if ce is None else ce
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_output, _grad_kl, _grad_ce):
        if ctx.used:
            raise RuntimeError("fused_linear_losses: backward ran twice through the same forward")
        ctx.used = True
        if ctx.terms.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            kd_scale, ce_scale = ctx.terms.row_scales(hidden.shape[0], hidden.device, grad_output.detach())
            with torch.autocast(hidden.device.type, enabled=False):
                _, _, dx, dw, db = _run_chunks(hidden, weight, bias, ctx.terms, kd_scale, ce_scale, ctx.need)
        else:
            dx, dw, db = ctx.grads
            del ctx.grads
            g = grad_output.detach()
            for t in (dx, dw, db):
                if t is not None:
                    t.mul_(g.to(t.dtype))
        hdt, wdt, bdt = ctx.dtypes
        dw = None if dw is None else dw.to(wdt)
        db = None if db is None else db.to(bdt)
        dx = None if dx is None else dx.to(hdt)
        return dx, dw, db, None


def _check_targets_ce(targets, N, V, device, name) -> None:
    if not isinstance(targets, torch.Tensor) or targets.shape != (N,) or targets.dtype != torch.int64:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else targets
        raise LongkdError(f"{name}: targets must be int64 [N={N}] next-token ids, got {got}")
    if targets.device != device:
        raise LongkdError(f"{name}: targets are on {targets.device} but hidden states on {device}; move them")
    if targets.device.type == "cpu":  # no host sync here
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise LongkdError(
                f"{name}: target {int(targets[bad][0])} is outside the vocabulary [0, {V}); "
                f"use {IGNORE_INDEX} for positions without a label"
            )


def _apply(hidden, weight, bias, terms: _Terms):
    return FusedLinearLossFunction.apply(hidden.contiguous(), weight, bias, terms)


def fused_linear_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    target_logprobs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    mode: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    loss_impl: ChunkLoss | str = "auto",
    logit_postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HeadLosses:
    """The trainer's loss through the LM head, chunked: kd_weight * KL + ce_weight * CE (means).

    Both terms share each chunk's matmul (and, at T = 1, its softmax). A term with weight 0
    is computed for the log only and costs no gradient work.

    Args:
        hidden: [N, d] final hidden states (after the final norm). float32, bfloat16, float16,
            or float64 (then everything, the loss included, is computed in float64).
        weight: [V, d] LM head weight (same dtype and device as ``hidden``).
        bias: optional [V] LM head bias.
        ids: int64 [N, K] teacher ids (< 0 = padding), or None for no KL.
        target_logprobs: [N, K] teacher log-probs (for sampled caches log(counts/draws)),
            used in float32.
        targets: int64 [N] next-token ids (-100 = no label), or None for no CE.
        mode, temperature: the KL's settings, as for ``sparse_kl`` (the CE is at T = 1).
        mask: bool [N] or None; the KL's rows (the CE uses ``targets``' -100 instead).
        kd_weight, ce_weight: the terms' weights (>= 0).
        chunk_size: tokens per chunk (None: ``chunk_rows(V)``, about 2^25 logits); peak extra
            memory is about 2 * chunk_size * V values (more with ``logit_postprocess``).
        loss_impl: the per-chunk KL: "auto" (the CuPy kernel for CUDA chunks if available,
            else the torch loss), "reference" (the torch loss), "cupy", or a ``ChunkLoss``.
        logit_postprocess: differentiable elementwise map applied to the raw logits before
            the losses (e.g. Gemma's softcap, ``longkd.models.logit_postprocess(model)``).

    Returns:
        :class:`HeadLosses` ``(loss, kl, ce)``, float32 (float64 for float64 inputs).

    Raises:
        LongkdError: on mismatched shapes, dtypes or devices, ids or targets outside the
            vocabulary (checked for CPU tensors), or bad options.
    """
    name = "fused_linear_losses"
    if ids is None and targets is None:
        raise LongkdError(f"{name}: give teacher ids and target_logprobs, next-token targets, or both")
    for what, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if not float(value) >= 0:
            raise LongkdError(f"{name}: {what} must be >= 0, got {value}")
    tlp = None
    if ids is not None:
        tlp = target_logprobs.float() if isinstance(target_logprobs, torch.Tensor) else target_logprobs
        validate_loss_args(
            None, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction="mean",
            chunk_size=chunk_size, name=name, head=(hidden, weight, bias),
        )  # fmt: skip
    else:
        validate_head_args(hidden, weight, bias, chunk_size=chunk_size, name=name)
    if targets is not None:
        _check_targets_ce(targets, hidden.shape[0], weight.shape[0], hidden.device, name)
    terms = _make_terms(
        hidden, ids, tlp, mask, targets, mode=mode, temperature=temperature, kd_weight=kd_weight,
        ce_weight=ce_weight, reduction="mean", chunk_size=chunk_size, loss_impl=loss_impl,
        post=logit_postprocess, V=weight.shape[0],
    )  # fmt: skip
    loss, kl, ce = _apply(hidden, weight, bias, terms)
    return HeadLosses(loss, None if ids is None else kl, None if targets is None else ce)


def _make_terms(hidden, ids, tlp, mask, targets, *, mode, temperature, kd_weight, ce_weight, reduction,
                chunk_size, loss_impl, post, V) -> _Terms:  # fmt: skip
    cdt = F64 if hidden.dtype == F64 else torch.float32
    kd = None
    if ids is not None:
        spec = MODES[mode]
        ids, tlp = ids.contiguous(), tlp.contiguous()
        if spec.targets_sum_to_one and ids.device.type == "cpu":
            warn_unnormalised(tlp, ids, spec)
        kd = RowTargets.build(ids, tlp, spec, mask, cdt)
    return _Terms(
        kd=kd, ids=ids, tlp=tlp, mask=None if mask is None else mask.contiguous(),
        targets=None if targets is None else targets.contiguous(), mode=mode,
        temperature=float(temperature), kd_weight=float(kd_weight), ce_weight=float(ce_weight),
        reduction=reduction, chunk=chunk_rows(V, chunk_size), loss_impl=loss_impl, post=post,
    )  # fmt: skip


def fused_linear_sparse_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mode: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    loss_impl: ChunkLoss | str = "auto",
    logit_postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sparse KL of the student's LM head output against cached teacher entries, chunked.

    Args:
        hidden: [N, d] final hidden states (after the final norm); float64 is computed in
            float64 throughout.
        weight: [V, d] LM head weight (same dtype and device as ``hidden``).
        ids: int64 [N, K] teacher ids; < 0 = padding.
        target_logprobs: [N, K] teacher log-probs (for sampled caches log(counts/draws)), used
            in float32.
        bias: optional [V] LM head bias.
        mode: "bucket" | "renorm" | "sampled".
        temperature: T > 0.
        mask: bool [N] or None; False rows give zero loss and gradient.
        reduction: "mean" (over unmasked rows, 0 when none) | "sum" | "none" ([N]).
        chunk_size: tokens per chunk (None: ``chunk_rows(V)``); peak extra memory is about
            2 * chunk_size * V values (more with ``logit_postprocess``).
        loss_impl: the per-chunk KL: "auto" (the CuPy kernel for CUDA chunks if available,
            else the torch loss), "reference" (the torch loss), "cupy", or a ``ChunkLoss``.
        logit_postprocess: differentiable map applied to the raw logits before the loss (e.g.
            Gemma's tanh softcap ``lambda z: cap * torch.tanh(z / cap)``); its derivative is
            chained through autograd per chunk.

    Returns:
        float32 scalar, or [N] for reduction="none" (float64 for float64 inputs).

    Raises:
        LongkdError: on mismatched shapes, dtypes or devices, ids >= V (checked for CPU
            tensors), or bad options.
    """
    tlp = target_logprobs.float() if isinstance(target_logprobs, torch.Tensor) else target_logprobs
    validate_loss_args(
        None, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction=reduction,
        chunk_size=chunk_size, name="fused_linear_sparse_kl", head=(hidden, weight, bias),
    )  # fmt: skip
    terms = _make_terms(
        hidden, ids, tlp, mask, None, mode=mode, temperature=temperature, kd_weight=1.0, ce_weight=0.0,
        reduction=reduction, chunk_size=chunk_size, loss_impl=loss_impl, post=logit_postprocess,
        V=weight.shape[0],
    )  # fmt: skip
    return _apply(hidden, weight, bias, terms)[0]
