"""The sparse-KL distillation loss in plain torch, processed in token chunks.

Why it exists: it is the loss on CPU, the fallback on GPUs without the CuPy kernel, and the
reference the CUDA kernel (kernels/cupy_kl.py) is tested against. The student's logits [N, V]
are the largest tensor of a distillation step, so this never builds an fp32 [N, V] tensor
whole: forward and backward walk the rows ``chunk_size`` at a time, each chunk upcast to fp32
(so the logsumexp is never rounded to bf16), and the gradient is written chunk by chunk into
one buffer of the logits' own dtype. The math, with the derivation of the gradient, is in
docs/loss.md.

    from longkd.kernels.reference import sparse_kl_reference
    loss = sparse_kl_reference(logits, ids, target_logprobs, mode="bucket", mask=m)
    loss.backward()
"""

from __future__ import annotations

import warnings

import torch

from longkd.errors import LongkdError
from longkd.kernels.loss_modes import MODES
from longkd.kernels.validation import validate_loss_args

# Sampled targets are log(counts / draws): their probabilities sum to 1 up to the rounding of
# the stored float32 (or float16) log-probs; more than this means a truncated or wrong row.
SAMPLED_SUM_TOL = 1e-3
# Rows per chunk unless the caller says otherwise.
CHUNK_SIZE = 2048


def has_duplicate_ids(ids: torch.Tensor) -> bool:
    """Whether any row repeats a non-padding id (a caller error the loss does not detect).

    Args:
        ids: int64 [N, K], < 0 = padding.

    Returns:
        True if some row holds the same id >= 0 twice.
    """
    if ids.shape[1] < 2:
        return False
    s = ids.sort(dim=1).values
    return bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any())


def _row_targets(ids, target_logprobs, spec, compute_dtype):
    """Per-row teacher quantities shared by forward and backward (all [N, K] or [N]).

    ``spec`` is the mode's row of kernels/loss_modes.py: its target scale c (taken in log
    space, log c = -log P with log P a logsumexp over the row's entries) and tail mass r.

    Returns:
        idx: int64 [N, K], ids with padding pointed at column 0 (its weights are zero there).
        fill: [N, K], -inf at real entries and +inf at padding, for masking K columns out of a
            row with ``scatter_reduce(amin)`` (padding leaves column 0 untouched).
        w: [N, K] the teacher weight on each entry, c * p: p (bucket) or p~ (renorm,
            sampled); 0 at padding and at entries with log-prob -inf.
        logw: [N, K] log w where w > 0, else 0 (finite, so 0 * logw never makes NaN).
        r: [N] teacher tail mass: max(1 - P_K, 0) (bucket), else zeros.
        has: bool [N], the row carries some target mass (without a tail category it trains
            nothing otherwise).
    """
    valid = ids >= 0
    t = target_logprobs.to(compute_dtype)
    live = valid & (t > float("-inf"))
    t = torch.where(live, t, torch.zeros_like(t))
    # log P over the row's own entries (0 for a row without any); log w = t + log c, so with
    # c = 1 / P, w is the softmax of the teacher's log-probs over its entries.
    masked = torch.where(live, t, torch.full_like(t, float("-inf")))
    log_p = torch.logsumexp(masked, dim=1, keepdim=True)
    log_p = torch.where(torch.isfinite(log_p), log_p, torch.zeros_like(log_p))
    logw = torch.where(live, t + spec.log_target_scale(log_p), torch.zeros_like(t))
    w = torch.where(live, logw.exp(), torch.zeros_like(t))
    r = spec.tail_mass(w.sum(1))
    has = live.any(1)
    idx = ids.clamp_min(0)
    fill = torch.where(valid, float("-inf"), float("inf")).to(compute_dtype)
    return idx, fill, w, logw, r, has


def _warn_unnormalised(target_logprobs, ids, spec):
    live = (ids >= 0) & (target_logprobs > float("-inf"))
    sums = torch.where(live, target_logprobs.double().exp(), torch.zeros((), dtype=torch.float64)).sum(1)
    if bool((live.any(1) & ((sums - 1).abs() > SAMPLED_SUM_TOL)).any()):
        # A fixed message, so Python's warning filter shows it once per call site instead of
        # once per training step.
        warnings.warn(
            f"sparse_kl(mode={spec.name!r}): some rows' target probabilities do not sum to 1; pass "
            "log(counts / draws) with every sampled id, or use mode='renorm' for truncated rows",
            RuntimeWarning,
            stacklevel=4,
        )


def _chunk_logits(logits, s, e, temperature, compute_dtype):
    # Always a fresh fp32 (or fp64) copy: later steps work in place on it, and .float() of fp32
    # logits would alias the caller's tensor.
    return logits[s:e].to(compute_dtype, copy=True).div_(temperature)


class SparseKLReferenceFunction(torch.autograd.Function):
    """Chunked forward (loss and per-row lse) and chunked backward that recomputes the softmax."""

    @staticmethod
    def forward(ctx, logits, ids, target_logprobs, mask, mode, temperature, reduction, chunk_size):
        N, _ = logits.shape
        spec = MODES[mode]
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        idx, fill, w, logw, r, has = _row_targets(ids, target_logprobs, spec, cdt)
        rows = torch.zeros(N, dtype=cdt, device=logits.device)
        lse = torch.empty(N, dtype=cdt, device=logits.device)
        lse_c = torch.empty(N, dtype=cdt, device=logits.device) if spec.keeps_tail else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = _chunk_logits(logits, s, e, temperature, cdt)  # [n, V]
            lse[s:e] = torch.logsumexp(z, dim=1)
            logq = z.gather(1, idx[s:e]) - lse[s:e, None]  # [n, K]
            # sum_K w (log w - log q); entries with w = 0 (padding, -inf) add exactly 0.
            rows[s:e] = torch.where(w[s:e] > 0, w[s:e] * (logw[s:e] - logq), 0).sum(1)
            if spec.keeps_tail:
                # log(1 - Q_K) taken as log of the student's mass OUTSIDE K, i.e. the logsumexp
                # over the non-K logits minus lse. Forming 1 - Q_K from the sum of q over K
                # cancels catastrophically when the student puts nearly all its mass on K
                # (1 - Q < 1e-7 rounds to 0 in fp32 and log1p(-Q) becomes -inf); the
                # complement's logsumexp stays exact however small that mass is. It costs one
                # more pass over the chunk, which is already in fast memory.
                z.scatter_reduce_(1, idx[s:e], fill[s:e], reduce="amin")
                lse_c[s:e] = torch.logsumexp(z, dim=1)
            del z
        if spec.keeps_tail:
            log_omq = lse_c - lse  # log(1 - Q_K), -inf when the student has no mass off K
            # The tail category exists when the teacher leaves mass off K (r > 0) and the student
            # can put mass there (finite lse_c). r > 0 with an empty complement (K = V) is the
            # rounding of the stored log-probs, and 0 log 0 = 0 covers r = 0: both give 0.
            tail_on = (r > 0) & torch.isfinite(lse_c)
            r_safe = torch.where(tail_on, r, torch.ones_like(r))
            rows = rows + torch.where(tail_on, r * (r_safe.log() - torch.where(tail_on, log_omq, 0)), 0)
        else:
            rows = torch.where(has, rows, 0)
        if mask is not None:
            rows = torch.where(mask, rows, 0)
        count = rows.new_tensor(float(N)) if mask is None else mask.sum().to(cdt)
        ctx.save_for_backward(logits, idx, fill, w, r, has, mask, lse, lse_c, count)
        ctx.mode, ctx.temperature, ctx.reduction, ctx.chunk_size = mode, temperature, reduction, chunk_size
        rows = rows.to(torch.float32) if cdt == torch.float32 else rows
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / count.clamp_min(1).to(total.dtype) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        logits, idx, fill, w, r, has, mask, lse, lse_c, count = ctx.saved_tensors
        N, _ = logits.shape
        cdt = lse.dtype
        T = ctx.temperature
        keeps_tail = MODES[ctx.mode].keeps_tail
        # Row scale: grad_output (scalar, or [N] for reduction "none") / count for a mean, / T
        # for the chain rule through z / T, zero for masked-out rows and (renorm) empty rows.
        scale = grad_output.detach().to(cdt).reshape(-1).expand(N)
        if ctx.reduction == "mean":
            scale = scale / count.clamp_min(1)
        scale = scale / T
        keep = torch.ones_like(has) if keeps_tail else has
        if mask is not None:
            keep = keep & mask
        scale = torch.where(keep, scale, 0)
        if keeps_tail:
            # p~ off K is r * q_j / (1 - Q_K) = r * exp(z_j - lse_c). When the complement is
            # empty (lse_c = -inf) there is no j off K and the tail weight is 0, not NaN.
            tail_on = torch.isfinite(lse_c)
            lse_c_safe = torch.where(tail_on, lse_c, 0)
            r_eff = torch.where(tail_on, r, 0)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            z = _chunk_logits(logits, s, e, T, cdt)  # [n, V]
            if keeps_tail:
                tail = z.clone().scatter_reduce_(1, idx[s:e], fill[s:e], reduce="amin")
                tail.sub_(lse_c_safe[s:e, None]).exp_().mul_(r_eff[s:e, None])  # 0 on K
            g = z.sub_(lse[s:e, None]).exp_()  # q, in place over z
            if keeps_tail:
                g.sub_(tail)
                del tail
            g.scatter_add_(1, idx[s:e], -w[s:e])  # - p (bucket) or - p~ on K; padding adds 0
            g.mul_(scale[s:e, None])
            grad[s:e].copy_(g)
            del g, z
        return grad, None, None, None, None, None, None, None


def sparse_kl_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    mode: str = "bucket",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Sparse KL(teacher || student) from cached teacher entries, in token chunks.

    Args:
        logits: [N, V] student logits (before 1/T), float32, bfloat16 or float16 (float64 is
            accepted and then computed in float64). Any device.
        ids: int64 [N, K] teacher token ids; < 0 = padding. Non-padding ids must be distinct
            within a row (a caller error otherwise, not detected: see ``has_duplicate_ids``).
        target_logprobs: float32 [N, K] teacher log-probs normalised over the full vocabulary
            (-inf at padding); for sampled caches log(counts / draws).
        mode: "bucket" (K entries plus one tail category; default), "renorm" (teacher
            renormalised over its K entries) or "sampled" (renorm's formula on targets that
            already sum to 1; warns when they do not).
        temperature: T > 0; the student distribution is softmax(logits / T).
        mask: bool [N] or None; True = row trained. False rows give 0 loss and 0 gradient.
        reduction: "mean" (over rows with mask True; 0 with zero gradient when there are
            none), "sum", or "none" (per-row losses [N], 0 at masked-out rows).
        chunk_size: rows processed at a time; peak extra memory is about 3 * chunk_size * V
            fp32 values.

    Returns:
        float32 scalar, or float32 [N] for reduction "none" (float64 for float64 logits).
        Its gradient w.r.t. ``logits`` has the logits' dtype: grad_output * (q - p~) / T.

    Raises:
        LongkdError: on bad shapes, dtypes, devices, options, or ids >= V.
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
    return reference_on_validated(
        logits, ids, target_logprobs, mode=mode, temperature=temperature, mask=mask,
        reduction=reduction, chunk_size=chunk_size,
    )  # fmt: skip


def reference_on_validated(logits, ids, target_logprobs, *, mode, temperature, mask, reduction, chunk_size):
    """``sparse_kl_reference`` after ``validate_loss_args`` has passed (each public path validates once).

    Still checks what validation cannot see without reading values: ids within V (an
    out-of-range id would otherwise fail deep inside a scatter).
    """
    if ids.numel() and int(ids.max()) >= logits.shape[1]:
        raise LongkdError(
            f"sparse_kl: ids reach {int(ids.max())} but the logits have V={logits.shape[1]} columns; "
            "the cache's vocabulary does not match the student's"
        )
    spec = MODES[mode]
    if spec.targets_sum_to_one:
        _warn_unnormalised(target_logprobs, ids, spec)
    return SparseKLReferenceFunction.apply(
        logits, ids, target_logprobs, mask, mode, float(temperature), reduction, int(chunk_size)
    )
