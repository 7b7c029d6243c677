"""LM head + sparse KL in token chunks, never materialising the [N, V] logits.

Why it exists: at long context the student's logits dwarf everything else (N = 16384 tokens,
V = 152064: 5 GB in bf16, 10 GB more for an fp32 softmax). Like Liger's fused linear
cross-entropy, this computes, per chunk of tokens, logits = hidden @ W^T, the loss and its
gradient dZ, then immediately dX = dZ @ W and dW += dZ^T @ X (fp32 accumulation), keeping
only O(chunk * V) alive. Forward stores dX, dW, db; backward scales them by grad_output.
For reduction="none" the gradient needs a per-row weight, so backward re-runs the chunks.

The per-chunk loss is pluggable (``loss_impl``): the CuPy kernel on CUDA (gradient written in
place over the chunk's logits), the torch reference otherwise, or any function with the
``ChunkLoss`` signature, which is how the chunking is tested on CPU.

    from longkd.kernels.fused_linear import fused_linear_sparse_kl
    loss = fused_linear_sparse_kl(h.view(-1, d), model.lm_head.weight, ids, logprobs, mask=m)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from longkd.kernels.reference import CHUNK_SIZE, reference_on_validated
from longkd.kernels.validation import validate_loss_args

# loss_impl(z [n, V], ids [n, K], target_logprobs [n, K], mask [n] | None, *, mode, temperature,
#           grad_scale float32 (1 element or [n]) | None) -> (loss_rows float32 [n], dz [n, V] | None)
# dz = grad_scale * d(loss_rows)/dz, in z's dtype; it may alias z (z belongs to the caller).
ChunkLoss = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def reference_chunk_loss(z, ids, target_logprobs, mask, *, mode, temperature, grad_scale=None):
    """``ChunkLoss`` through the torch reference (kernels/reference.py) and autograd.

    Runs on arguments ``fused_linear_sparse_kl`` has validated.

    Args:
        z: [n, V] logits chunk.
        ids: int64 [n, K]; target_logprobs: float32 [n, K]; mask: bool [n] or None.
        mode, temperature: as for ``sparse_kl``.
        grad_scale: float32, 1 element or [n]; None = loss only.

    Returns:
        (loss_rows float32 [n], dz [n, V] in z's dtype or None).
    """
    kwargs = dict(mode=mode, temperature=temperature, mask=mask, reduction="none", chunk_size=CHUNK_SIZE)
    if grad_scale is None:
        with torch.no_grad():
            return reference_on_validated(z, ids, target_logprobs, **kwargs).float(), None
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        rows = reference_on_validated(leaf, ids, target_logprobs, **kwargs)
        weights = grad_scale.to(rows.dtype).reshape(-1).expand(rows.shape[0])
        (dz,) = torch.autograd.grad(rows, leaf, grad_outputs=weights)
    return rows.detach().float(), dz


def default_chunk_loss(z: torch.Tensor) -> ChunkLoss:
    """The CuPy kernel for CUDA logits when it is available, else the torch reference."""
    if z.is_cuda:
        from longkd.kernels import cupy_kl

        if cupy_kl.is_available():
            return cupy_kl.loss_and_grad_chunk
    return reference_chunk_loss


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to a's (bf16/fp16) dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # cuBLAS writes fp32 straight from its fp32 accumulators
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.float(), b.float())


def _run_chunks(
    hidden, weight, bias, ids, tlp, mask, *, mode, temperature, chunk_size, loss_impl, post, row_scale, need
):
    """Loop over token chunks: loss rows and (when ``row_scale`` is given) dX, dW, db.

    Args:
        row_scale: float32 device tensor, 1 element (same for all rows) or [N]; None = loss only.
        need: (dX, dW, db) flags.

    Returns:
        (loss_rows float32 [N], dX [N, d] | None, dW float32 [V, d] | None, db float32 [V] | None)
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    impl = loss_impl
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grads = row_scale is not None
    dx = torch.empty_like(hidden) if grads and need[0] else None
    dw = (
        torch.zeros(V, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        if grads and need[1]
        else None
    )
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if grads and need[2] else None
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        x = hidden[s:e]
        with torch.no_grad():
            raw = F.linear(x, weight, bias)  # [n, V]
        if impl is None:
            impl = default_chunk_loss(raw)
        scale = None
        if grads:
            scale = row_scale if row_scale.numel() == 1 else row_scale[s:e]
        chunk_mask = None if mask is None else mask[s:e]
        if post is None:
            rows, dz = impl(
                raw, ids[s:e], tlp[s:e], chunk_mask, mode=mode, temperature=temperature, grad_scale=scale
            )
        else:
            with torch.enable_grad():
                leaf = raw.requires_grad_(True)
                z = post(leaf)
            # A private copy for the loss: kernels may write dZ over it, and post's graph may
            # have saved its output.
            zl = z.detach().clone() if grads else z.detach()
            rows, dz = impl(
                zl, ids[s:e], tlp[s:e], chunk_mask, mode=mode, temperature=temperature, grad_scale=scale
            )
            if dz is not None:
                (dz,) = torch.autograd.grad(z, leaf, grad_outputs=dz.to(z.dtype))  # chain post's derivative
            del z, leaf, zl
        loss_rows[s:e] = rows
        if dz is None:
            continue
        with torch.no_grad():
            dz = dz.to(hidden.dtype)
            if dx is not None:
                torch.mm(dz, weight, out=dx[s:e])  # [n, V] @ [V, d]
            if dw is not None:
                _accumulate_mm(dw, dz.t(), x)  # [V, n] @ [n, d]
            if db is not None:
                db.add_(dz.sum(0, dtype=torch.float32))
        del raw, dz
    return loss_rows, dx, dw, db


class FusedLinearSparseKLFunction(torch.autograd.Function):
    """Liger-style: gradients computed in forward, scaled by grad_output in backward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ids, tlp, mask, mode, temperature, reduction, chunk_size, loss_impl, post
    ):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        N = hidden.shape[0]
        if mask is None:
            count = torch.full((), float(N), dtype=torch.float32, device=hidden.device)
        else:
            count = mask.sum(dtype=torch.float32)  # stays on device: no host sync
        opts = dict(mode=mode, temperature=temperature, chunk_size=chunk_size, loss_impl=loss_impl, post=post)
        ctx.reduction, ctx.opts, ctx.need = reduction, opts, need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        row_scale = None
        if any(need) and reduction != "none":
            row_scale = (1.0 / count.clamp_min(1.0)) if reduction == "mean" else torch.ones_like(count)
            row_scale = row_scale.reshape(1)
        loss_rows, dx, dw, db = _run_chunks(
            hidden, weight, bias, ids, tlp, mask, row_scale=row_scale, need=need, **opts
        )
        if reduction == "none":
            # Per-row grad_output weights dW row by row: re-run the chunks in backward.
            ctx.save_for_backward(hidden, weight, bias, ids, tlp, mask)
            return loss_rows
        ctx.save_for_backward(dx, dw, db)
        total = loss_rows.sum()
        return total / count.clamp_min(1.0) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, ids, tlp, mask = ctx.saved_tensors
            scale = grad_output.detach().to(torch.float32).contiguous()
            _, dx, dw, db = _run_chunks(
                hidden, weight, bias, ids, tlp, mask, row_scale=scale, need=ctx.need, **ctx.opts
            )
        else:
            dx, dw, db = ctx.saved_tensors
            g = grad_output.detach()
            dx = None if dx is None else dx * g.to(dx.dtype)
            dw = None if dw is None else dw * g.to(torch.float32)
            db = None if db is None else db * g.to(torch.float32)
        hdt, wdt, bdt = ctx.dtypes
        dw = None if dw is None else dw.to(wdt)
        db = None if db is None else db.to(bdt)
        dx = None if dx is None else dx.to(hdt)
        return dx, dw, db, None, None, None, None, None, None, None, None, None


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
    chunk_size: int = 4096,
    loss_impl: ChunkLoss | None = None,
    logit_postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sparse KL of the student's LM head output against cached teacher entries, chunked.

    Args:
        hidden: [N, d] final hidden states (after the final norm).
        weight: [V, d] LM head weight (same dtype and device as ``hidden``).
        ids: int64 [N, K] teacher ids; < 0 = padding.
        target_logprobs: float32 [N, K] teacher log-probs (for sampled caches log(counts/draws)).
        bias: optional [V] LM head bias.
        mode: "bucket" | "renorm" | "sampled".
        temperature: T > 0.
        mask: bool [N] or None; False rows give zero loss and gradient.
        reduction: "mean" (over unmasked rows, 0 when none) | "sum" | "none" ([N]).
        chunk_size: tokens per chunk; peak extra memory is about chunk_size * V logits
            (twice that, plus post's autograd buffers, with ``logit_postprocess``).
        loss_impl: per-chunk ``ChunkLoss``; default: CuPy kernel on CUDA if available, else
            the torch reference.
        logit_postprocess: differentiable map applied to the raw logits before the loss (e.g.
            Gemma's tanh softcap ``lambda z: cap * torch.tanh(z / cap)``); its derivative is
            chained through autograd per chunk.

    Returns:
        float32 scalar, or [N] for reduction="none".

    Raises:
        LongkdError: on mismatched shapes, dtypes or devices, or bad options.
    """
    # Sparse-KL targets may come as float16 or float64: they are used in float32.
    tlp = target_logprobs.float() if isinstance(target_logprobs, torch.Tensor) else target_logprobs
    validate_loss_args(
        None, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction=reduction,
        chunk_size=chunk_size, name="fused_linear_sparse_kl", head=(hidden, weight, bias),
    )  # fmt: skip
    return FusedLinearSparseKLFunction.apply(
        hidden.contiguous(),
        weight,
        bias,
        ids.contiguous(),
        tlp.contiguous(),
        None if mask is None else mask.contiguous(),
        mode,
        float(temperature),
        reduction,
        int(chunk_size),
        loss_impl,
        logit_postprocess,
    )
