"""The sparse-KL distillation loss (and the next-token CE beside it) in plain torch, by token chunks.

Why it exists: it is the loss on CPU, the fallback on GPUs without the CuPy kernel, and the
reference the CUDA kernel (kernels/cupy_kl.py) is tested against. The student's logits [N, V]
are the largest tensor of a distillation step, so nothing here builds an fp32 [N, V] tensor
whole: rows are processed ``chunk_size`` at a time in one reused fp32 buffer (so the
logsumexp is never rounded to bf16). Two callers share the per-chunk math,
:func:`head_chunk`:

- ``sparse_kl_reference`` on materialised logits: the forward keeps per-row statistics
  (lse and the dense multiplier a, as the CUDA kernel does), and the backward is one pass,
  g = exp(z/T - lse) * a * scale, then the K fix-ups;
- the fused LM-head path (kernels/fused_linear.py), which hands over each chunk of logits it
  has just computed and gets the losses and the gradient in the same buffer.

The dense [n, V] work runs in fp32 (fp64 for fp64 logits); per-row and per-entry quantities
(O(N K)) in fp64, so row losses are exact to about 1e-10 even where they are tiny. The math,
with the derivation of the gradient, is in docs/loss.md.

    from longkd.kernels.reference import sparse_kl_reference
    loss = sparse_kl_reference(logits, ids, target_logprobs, mode="bucket", mask=m)
    loss.backward()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from longkd.kernels.loss_modes import MODES, LossMode
from longkd.kernels.validation import validate_loss_args

# Sampled targets are log(counts / draws): their probabilities sum to 1 up to the rounding of
# the stored float32 (or float16) log-probs; more than this means a truncated or wrong row.
SAMPLED_SUM_TOL = 1e-3
# A chunk holds at most this many logits unless the caller gives chunk_size (128 MiB in fp32):
# 261 rows at V = 128256, 4096 rows at V = 8192.
CHUNK_ELEMENTS = 1 << 25
# Next-token targets with this value have no label (torch's cross-entropy convention).
IGNORE_INDEX = -100
F64 = torch.float64


def chunk_rows(V: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size``, or as many as keep a chunk within ``CHUNK_ELEMENTS`` logits."""
    if chunk_size is not None:
        return int(chunk_size)
    return max(1, CHUNK_ELEMENTS // max(int(V), 1))


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


# --------------------------------------------------------------------------------------------
# Per-row teacher quantities
# --------------------------------------------------------------------------------------------


@dataclass
class RowTargets:
    """The teacher side of the KL, per row, shared by forward and backward.

    ``spec`` is the mode's row of kernels/loss_modes.py: its target scale c (in log space,
    log c from log P, a logsumexp over the row's entries) and its tail mass r.

    Attributes:
        idx: int64 [N, K], ids with padding pointed at column 0 (its weights are 0 there).
        valid: bool [N, K], a real id (>= 0).
        fill: [N, K] in the compute dtype: -inf at real ids, +inf at padding, for setting the
            K columns of a row to -inf with ``scatter_reduce(amin)`` (padding leaves column 0).
        w: float64 [N, K], the teacher's weight on each entry, c * p: 0 at padding and at
            entries with log-prob -inf.
        logw: float64 [N, K], log w where w > 0, else 0 (finite, so 0 * logw is never NaN).
        r: float64 [N], the teacher's tail mass kept as a category (0 without one).
        trains: bool [N], the row is trained on: mask True and, without a tail category, some
            target mass.
        keeps_tail: the mode's ``keeps_tail``.
    """

    idx: torch.Tensor
    valid: torch.Tensor
    fill: torch.Tensor
    w: torch.Tensor
    logw: torch.Tensor
    r: torch.Tensor
    trains: torch.Tensor
    keeps_tail: bool

    @classmethod
    def build(cls, ids, target_logprobs, spec: LossMode, mask, compute_dtype) -> RowTargets:
        """From validated ids int64 [N, K], target_logprobs [N, K] and mask bool [N] | None."""
        valid = ids >= 0
        t = target_logprobs.to(F64)
        live = valid & (t > float("-inf"))
        t = torch.where(live, t, 0.0)
        log_p = torch.logsumexp(torch.where(live, t, float("-inf")), dim=1, keepdim=True)
        log_p = torch.where(torch.isfinite(log_p), log_p, 0.0)
        logw = torch.where(live, t + spec.log_target_scale(log_p), 0.0)
        w = torch.where(live, logw.exp(), 0.0)
        trains = torch.ones_like(valid[:, 0]) if spec.keeps_tail else live.any(1)
        if mask is not None:
            trains = trains & mask
        return cls(
            idx=ids.clamp_min(0),
            valid=valid,
            fill=torch.where(valid, float("-inf"), float("inf")).to(compute_dtype),
            w=w,
            logw=logw,
            r=spec.tail_mass(w.sum(1)),
            trains=trains,
            keeps_tail=spec.keeps_tail,
        )

    def rows(self, s: int, e: int) -> RowTargets:
        """The rows [s, e) (views)."""
        return RowTargets(
            **{f.name: getattr(self, f.name)[s:e] for f in fields(self) if f.name != "keeps_tail"},
            keeps_tail=self.keeps_tail,
        )


def warn_unnormalised(target_logprobs, ids, spec):
    """Warn (RuntimeWarning) when some row's targets do not sum to 1 within ``SAMPLED_SUM_TOL``."""
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


# --------------------------------------------------------------------------------------------
# One chunk: losses and gradient
# --------------------------------------------------------------------------------------------


def tail_floor(dtype: torch.dtype) -> float:
    """Below this share of the row's exp-sum the complement's sum has lost precision to
    underflow (its entries sit below the dtype's normal range): about 1e-19 in fp32."""
    return torch.finfo(dtype).tiny ** 0.5


@dataclass
class ChunkResult:
    """What :func:`head_chunk` computed for one chunk of n rows.

    Attributes:
        kl: float64 [n] KL rows (0 where the row is not trained), or None.
        ce: float64 [n] CE rows (0 where the target is ignored), or None.
        lse: float64 [n], logsumexp of the KL's z / T (of z without KL).
        shift: [n] in z's dtype, the max of z / T that the exponentials were taken from.
        s: float64 [n], their sum: lse = shift + log s.
        a: float64 [n], the KL's dense multiplier, 1 on rows whose tail was recomputed.
        exact: bool [n], rows whose student tail mass underflowed the shared pass, recomputed
            with the complement's own logsumexp ``lse_c``.
        lse_c: float64 [n], that logsumexp on ``exact`` rows (0 elsewhere).
        grad: [n, V] d(loss)/dz (z's storage, unless only a T != 1 CE is trained), or None.
    """

    kl: torch.Tensor | None
    ce: torch.Tensor | None
    lse: torch.Tensor
    shift: torch.Tensor
    s: torch.Tensor
    a: torch.Tensor | None
    exact: torch.Tensor | None
    lse_c: torch.Tensor | None
    grad: torch.Tensor | None


def head_chunk(
    z: torch.Tensor,
    *,
    kd: RowTargets | None,
    temperature: float = 1.0,
    ce_targets: torch.Tensor | None = None,
    kd_scale: torch.Tensor | None = None,
    ce_scale: torch.Tensor | None = None,
    recompute: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ChunkResult:
    """Per-row KL and CE of one chunk of logits, and their gradient in the same buffer.

    One shared softmax feeds both losses when T = 1: max, exp(z - max) with the K columns
    set to 0, one sum over the rest (the student's mass off K, exact however small), the
    K entries' probabilities recomputed in fp64, then (with scales) g = e * coef and the K
    and target fix-ups. A CE beside a KL at T != 1 needs a softmax of its own.

    The tail log log(1 - Q) is log1p(-Q) when Q < 0.5 and log(s_rest / s) otherwise, both in
    fp64 from the same sums as lse, so it is accurate in both regimes and consistent with the
    K terms. Rows whose tail mass underflows the shared pass (below ``tail_floor``, when the
    student puts nearly all its mass on K) are recomputed through ``recompute`` with the
    complement's own logsumexp.

    Args:
        z: [n, V] raw logits (before 1/T) in the compute dtype (float32 or float64); owned by
            this call: it is overwritten (by the gradient when scales are given).
        kd: the chunk's rows of :class:`RowTargets`, or None for no KL.
        temperature: T of the KL (the CE is at T = 1).
        ce_targets: int64 [n] next-token ids (``IGNORE_INDEX`` = none), or None for no CE.
        kd_scale: float [n], d(loss)/d(KL row) per row (the chain rule's 1/T is added here),
            or None: KL logged only, no gradient.
        ce_scale: float [n], d(loss)/d(CE row), or None: CE logged only.
        recompute: rows int64 [m] -> their raw logits [m, V]; needed only when a row's tail
            underflows (bucket mode).

    Returns:
        A :class:`ChunkResult`.
    """
    cdt = z.dtype
    T = float(temperature) if kd is not None else 1.0  # the CE alone runs at T = 1
    m = z.amax(1)  # [n]; also the max of z / T (T > 0)
    zk = None if kd is None else z.gather(1, kd.idx).to(F64)  # raw logits at K
    keep = tidx = zt = None
    if ce_targets is not None:
        keep = ce_targets != IGNORE_INDEX
        tidx = torch.where(keep, ce_targets, 0)[:, None]
        zt = z.gather(1, tidx)[:, 0].to(F64)
    ce_rows = ce_grad = None
    if ce_targets is not None and T != 1:  # the CE's own softmax, at T = 1
        e1 = torch.sub(z, m[:, None]).exp_()
        s1 = e1.sum(1).to(F64)
        ce_rows = torch.where(keep, m.to(F64) + s1.log() - zt, 0.0)
        if ce_scale is not None:
            cs = torch.where(keep, ce_scale.to(F64), 0.0)
            ce_grad = e1.mul_((cs / s1).to(cdt)[:, None]).scatter_add_(1, tidx, (-cs).to(cdt)[:, None])
        del e1
    if T != 1:
        z.div_(T)
        m = m.div(T)
    if kd is not None:
        z.scatter_reduce_(1, kd.idx, kd.fill, reduce="amin")  # K columns -> -inf
    e = z.sub_(m[:, None]).exp_()  # exp(z/T - m), 0 at K
    s_rest = e.sum(1).to(F64)  # the student's mass off K, times s
    m64 = m.to(F64)
    s = s_rest
    if kd is not None:
        ek = torch.where(kd.valid, (zk / T - m64[:, None]).exp(), 0.0)  # [n, K]
        s = s_rest + ek.sum(1)
    lse = m64 + s.log()
    if ce_targets is not None and ce_rows is None:
        ce_rows = torch.where(keep, lse - zt, 0.0)
    kl = a = exact = lse_c = tail = None
    if kd is not None:
        kl, a, exact, lse_c, tail = _kl_rows(kd, zk / T - lse[:, None], ek, s, s_rest, lse, T, cdt, recompute)
    grad = None
    shared_ce = ce_scale is not None and ce_grad is None
    if kd_scale is not None or shared_ce:
        coef = torch.zeros_like(s)
        if kd_scale is not None:
            ks = torch.where(kd.trains, kd_scale.to(F64), 0.0) / T
            coef = coef + a * ks
        if shared_ce:
            cs = torch.where(keep, ce_scale.to(F64), 0.0)
            coef = coef + cs
        grad = e.mul_((coef / s).to(cdt)[:, None])
        if kd is not None:  # e is 0 at K: add the whole K values
            qk = ek / s[:, None]
            val = torch.zeros_like(qk)
            if kd_scale is not None:
                val = val + ks[:, None] * (qk - kd.w)
            if shared_ce:
                val = val + cs[:, None] * qk
            grad.scatter_add_(1, kd.idx, torch.where(kd.valid, val, 0.0).to(cdt))
        if shared_ce:
            grad.scatter_add_(1, tidx, (-cs).to(cdt)[:, None])
        if kd_scale is not None and tail is not None:  # r q_j / (1 - Q) from the complement itself
            rows, spread = tail
            grad.index_add_(0, rows, spread.mul_((-(ks * kd.r))[rows].to(cdt)[:, None]))
        if ce_grad is not None:
            grad.add_(ce_grad)
    elif ce_grad is not None:
        grad = ce_grad
    return ChunkResult(kl=kl, ce=ce_rows, lse=lse, shift=m, s=s, a=a, exact=exact, lse_c=lse_c, grad=grad)


def _kl_rows(kd: RowTargets, logq, ek, s, s_rest, lse, T, cdt, recompute):
    """KL rows, dense multiplier a and the recomputed tails of one chunk (see :func:`head_chunk`).

    Returns:
        (kl float64 [n], a float64 [n], exact bool [n] | None, lse_c float64 [n] | None,
        tail: (rows int64 [m], exp(z/T - lse_c) with K at 0 [m, V]) for the recomputed rows
        whose tail is on, or None).
    """
    kl = torch.where(kd.w > 0, kd.w * (kd.logw - logq), 0.0).sum(1)  # sum_K w (log w - log q)
    if not kd.keeps_tail:
        return torch.where(kd.trains, kl, 0.0), kd.trains.to(F64), None, None, None
    # log(1 - Q): log1p(-Q) while Q < 0.5, else the log of the complement's own share.
    q_k = ek.sum(1) / s  # Q, consistent with lse = m + log s
    log_omq = torch.where(q_k < 0.5, torch.log1p(-q_k), s_rest.log() - s.log())
    exact = kd.trains & (kd.r > 0) & (s_rest < tail_floor(cdt) * s)
    lse_c = torch.zeros_like(lse)
    zc = None
    if bool(exact.any()):  # a host sync only where the chunk's K holds nearly all the mass
        rows = exact.nonzero()[:, 0]
        zc = recompute(rows).to(cdt, copy=True).div_(T)
        zc.scatter_reduce_(1, kd.idx[rows], kd.fill[rows], reduce="amin")  # the complement only
        lse_c[rows] = torch.logsumexp(zc, dim=1).to(F64)
        log_omq[rows] = lse_c[rows] - lse[rows]
    # No tail category when the teacher leaves nothing off K (r = 0: 0 log 0) or the student
    # has no mass there (K = V, or -inf logits): the term and its gradient are 0.
    tail_on = kd.trains & (kd.r > 0) & (log_omq > float("-inf"))
    r_safe = torch.where(tail_on, kd.r, 1.0)
    kl = kl + torch.where(tail_on, kd.r * (r_safe.log() - torch.where(tail_on, log_omq, 0.0)), 0.0)
    shared = tail_on & ~exact
    omq = torch.where(shared, torch.where(q_k < 0.5, 1 - q_k, s_rest / s), 1.0)
    a = torch.where(shared, 1 - kd.r / omq, 1.0)  # 1 on recomputed rows: their spread is exact
    exact = exact & tail_on
    tail = None
    if zc is not None and bool(exact.any()):
        on = exact[rows]
        rows, zc = rows[on], zc[on]
        tail = (rows, zc.sub_(lse_c[rows].to(cdt)[:, None]).exp_())  # r q_j / (1 - Q) = r * this
    return torch.where(kd.trains, kl, 0.0), a, exact, lse_c, tail


# --------------------------------------------------------------------------------------------
# The loss on materialised logits
# --------------------------------------------------------------------------------------------


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class SparseKLReferenceFunction(torch.autograd.Function):
    """Chunked forward (loss and per-row lse, a) and a one-pass chunked backward."""

    @staticmethod
    def forward(ctx, logits, ids, target_logprobs, mask, mode, temperature, reduction, chunk_size):
        N, V = logits.shape
        cdt = _compute_dtype(logits)
        kd = RowTargets.build(ids, target_logprobs, MODES[mode], mask, cdt)
        rows = torch.zeros(N, dtype=F64, device=logits.device)
        lse = torch.empty(N, dtype=F64, device=logits.device)
        shift = torch.empty(N, dtype=cdt, device=logits.device)
        sums = torch.empty(N, dtype=F64, device=logits.device)
        a = torch.empty(N, dtype=F64, device=logits.device)
        exact = torch.zeros(N, dtype=torch.bool, device=logits.device)
        lse_c = torch.zeros(N, dtype=F64, device=logits.device)
        work = torch.empty(min(chunk_size, N), V, dtype=cdt, device=logits.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = work[: e - s].copy_(logits[s:e])
            res = head_chunk(
                z,
                kd=kd.rows(s, e),
                temperature=temperature,
                recompute=lambda r, s=s, e=e: logits[s:e][r],
            )
            rows[s:e], lse[s:e], shift[s:e], sums[s:e], a[s:e] = res.kl, res.lse, res.shift, res.s, res.a
            if res.exact is not None:
                exact[s:e], lse_c[s:e] = res.exact, res.lse_c
        del work
        count = rows.new_tensor(float(N)) if mask is None else mask.sum().to(F64)
        ctx.save_for_backward(
            logits, kd.idx, kd.valid, kd.fill, kd.w, kd.r, kd.trains, lse, shift, sums, a, exact, lse_c, count
        )
        ctx.temperature, ctx.reduction, ctx.chunk_size = temperature, reduction, chunk_size
        rows = rows.to(cdt)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / count.clamp_min(1).to(total.dtype) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        logits, idx, valid, fill, w, r, trains, lse, shift, sums, a, exact, lse_c, count = ctx.saved_tensors
        N, V = logits.shape
        cdt = _compute_dtype(logits)
        T = ctx.temperature
        # Row scale: grad_output (scalar, or [N] for reduction "none") / count for a mean, / T
        # for the chain rule through z / T, zero for rows not trained on.
        scale = grad_output.detach().to(F64).reshape(-1).expand(N)
        if ctx.reduction == "mean":
            scale = scale / count.clamp_min(1)
        scale = torch.where(trains, scale / T, 0.0)
        dense = (a * scale / sums).to(cdt)  # q_j = exp(z_j/T - shift) / s, as the forward had it
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        own = logits.dtype == cdt  # write straight into the gradient's rows
        any_exact = bool(exact.any())  # one host sync, not one per chunk
        work = None if own else torch.empty(min(ctx.chunk_size, N), V, dtype=cdt, device=logits.device)
        for s in range(0, N, ctx.chunk_size):
            e = min(s + ctx.chunk_size, N)
            g = grad[s:e] if own else work[: e - s]
            g.copy_(logits[s:e])
            if T != 1:
                g.div_(T)
            g.scatter_reduce_(1, idx[s:e], fill[s:e], reduce="amin")  # K columns -> 0 after exp
            g.sub_(shift[s:e, None]).exp_().mul_(dense[s:e, None])  # q * a * scale off K
            qk = (logits[s:e].gather(1, idx[s:e]).to(F64) / T - lse[s:e, None]).exp()
            fix = torch.where(valid[s:e], scale[s:e, None] * (qk - w[s:e]), 0.0)
            g.scatter_add_(1, idx[s:e], fix.to(cdt))  # (q - p~) * scale on K
            rows = exact[s:e].nonzero()[:, 0] if any_exact and bool(exact[s:e].any()) else None
            if rows is not None:  # tails too small for the shared pass: r q_j / (1 - Q) exactly
                zc = (
                    logits[s:e][rows]
                    .to(cdt)
                    .div_(T)
                    .scatter_reduce_(1, idx[s:e][rows], fill[s:e][rows], "amin")
                )
                spread = zc.sub_(lse_c[s:e][rows].to(cdt)[:, None]).exp_()
                g.index_add_(0, rows, spread.mul_((-(scale * r))[s:e][rows].to(cdt)[:, None]))
            if not own:
                grad[s:e].copy_(g)
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sparse KL(teacher || student) from cached teacher entries, in token chunks.

    Args:
        logits: [N, V] student logits (before 1/T), float32, bfloat16 or float16 (float64 is
            accepted and then computed in float64). Any device.
        ids: int64 [N, K] teacher token ids; < 0 = padding. Non-padding ids must be distinct
            within a row (a caller error otherwise, not detected: see ``has_duplicate_ids``).
            Ids >= V are refused when ``ids`` is on the CPU (a cheap scan there); on CUDA
            they are not checked (that would need a host sync).
        target_logprobs: float32 [N, K] teacher log-probs normalised over the full vocabulary
            (-inf at padding); for sampled caches log(counts / draws).
        mode: "bucket" (K entries plus one tail category; default), "renorm" (teacher
            renormalised over its K entries) or "sampled" (renorm's formula on targets that
            already sum to 1; warns when they do not).
        temperature: T > 0; the student distribution is softmax(logits / T).
        mask: bool [N] or None; True = row trained. False rows give 0 loss and 0 gradient.
        reduction: "mean" (over rows with mask True; 0 with zero gradient when there are
            none), "sum", or "none" (per-row losses [N], 0 at masked-out rows).
        chunk_size: rows processed at a time (None: ``chunk_rows(V)``); peak extra memory is
            about 2 * chunk_size * V fp32 values.

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
    """``sparse_kl_reference`` after ``validate_loss_args`` has passed (each public path validates once)."""
    spec = MODES[mode]
    if spec.targets_sum_to_one and ids.device.type == "cpu":  # on CUDA the check would sync
        warn_unnormalised(target_logprobs, ids, spec)
    rows = chunk_rows(logits.shape[1], chunk_size)
    return SparseKLReferenceFunction.apply(
        logits, ids, target_logprobs, mask, mode, float(temperature), reduction, rows
    )
