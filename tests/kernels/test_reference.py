"""The chunked torch sparse-KL loss (kernels/reference.py) and the glue in kernels/sparse_kl.py.

Every loss and gradient is compared with a dense float64 implementation written plainly
here (full softmax, the K + 1 bucket categories built explicitly, autograd for the gradient)
on fresh random inputs: all modes, odd shapes, K = 1 and K = V, padding, temperatures,
masks, grad_output != 1, chunk sizes that do not divide N, bf16/fp16 logits, a student that
puts almost all its mass on K, and property checks (0 <= bucket <= full KL, renorm >= 0).
The chunked cross-entropy is compared with F.cross_entropy in float64, and a dispatch-mode
hook checks that no fp32 [N, V] tensor is ever built.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longkd.errors import LongkdError
from longkd.kernels.reference import sparse_kl_reference
from longkd.kernels.sparse_kl import cross_entropy_chunked, resolve_impl, sparse_kl, targets_from_cache
from tests.helpers import reduce_rows

MODES = ("bucket", "renorm", "sampled")

# Error bounds per logits dtype, as data. The oracle sees exactly the values the loss sees
# (low-precision logits upcast to float64), so the loss differs only by fp32 arithmetic; the
# gradient additionally carries one rounding to the logits' dtype (2^-24, 2^-9, 2^-11 relative).
# "grad_atol" is relative to max |grad| of the case.
TOLERANCES = {
    torch.float32: {"loss_atol": 1e-5, "loss_rtol": 1e-5, "grad_atol": 1e-6, "grad_rtol": 1e-4},
    torch.bfloat16: {"loss_atol": 1e-5, "loss_rtol": 1e-5, "grad_atol": 8e-3, "grad_rtol": 8e-3},
    torch.float16: {"loss_atol": 1e-5, "loss_rtol": 1e-5, "grad_atol": 1e-3, "grad_rtol": 1e-3},
}


# --------------------------------------------------------------------------------------------
# The float64 oracle and input builders
# --------------------------------------------------------------------------------------------


def oracle_rows(z, ids, tlp, *, mode, temperature):
    """Per-row loss, plainly, in float64 over the full vocabulary (autograd gives the gradient).

    bucket: categories = the K live ids plus one tail (every other token); teacher p_i and
    r = max(1 - sum p, 0), student q_i and the explicit sum of q over the non-K tokens;
    KL over those K + 1 categories with 0 log 0 = 0. K = V leaves no tail category. A row whose
    p sums above 1 is renormalised (docs/loss.md).
    renorm / sampled: KL(p~ || q) over K with p~ = p / sum p; a row without targets gives 0.
    """
    q = torch.softmax(z.double() / temperature, dim=-1)  # [N, V]
    valid = ids >= 0
    t = tlp.double()
    live = valid & torch.isfinite(t)
    p = torch.where(live, t, 0).exp() * live  # [N, K], exactly 0 off the live entries
    q_k = q.gather(1, ids.clamp_min(0))  # [N, K]

    def kl_terms(w):  # sum_K w (log w - log q), skipping w = 0 (0 log 0 = 0)
        w_safe = torch.where(w > 0, w, 1)
        return torch.where(w > 0, w * (w_safe.log() - q_k.log()), 0).sum(1)

    if mode == "bucket":
        p = p / p.sum(1, keepdim=True).clamp_min(1)
        outside = torch.ones(z.shape, dtype=torch.bool)  # the tail category's tokens
        for n in range(z.shape[0]):
            outside[n, ids[n][valid[n]]] = False
        r = (1 - p.sum(1)).clamp_min(0)
        q_tail = (q * outside).sum(1)  # sum of q over the non-K tokens, added up explicitly
        has_tail = (r > 0) & outside.any(1)
        r_safe = torch.where(has_tail, r, 1)
        q_tail_safe = torch.where(has_tail, q_tail, 1)
        return kl_terms(p) + torch.where(has_tail, r * (r_safe.log() - q_tail_safe.log()), 0)
    total = p.sum(1, keepdim=True)
    return torch.where(total[:, 0] > 0, kl_terms(p / torch.where(total > 0, total, 1)), 0)


def oracle(z, ids, tlp, *, mode, temperature=1.0, mask=None, reduction="mean"):
    return reduce_rows(oracle_rows(z, ids, tlp, mode=mode, temperature=temperature), mask, reduction)


def teacher_topk(N, V, K, gen, pad_frac=0.2, spread=2.0):
    """Real top-k of a random teacher distribution (realistic tails), with padding holes.

    Returns:
        (ids int64 [N, K], tlp float32 [N, K], full teacher log-probs float64 [N, V]).
    """
    logp = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * spread, -1)
    tlp, ids = logp.topk(K, dim=-1)
    pad = torch.rand(N, K, generator=gen) < pad_frac
    ids = torch.where(pad, -1, ids)
    tlp = torch.where(pad, float("-inf"), tlp)
    return ids, tlp.float(), logp


def teacher_sampled(N, V, K, gen, draws=None):
    """Sampled targets as a cache stores them (ids, counts; padding -1 / 0), via targets_from_cache."""
    draws = draws or 4 * K
    logp = torch.log_softmax(torch.randn(N, V, generator=gen) * 2.0, -1)
    width = 1
    rows = []
    for n in range(N):
        picks = torch.multinomial(logp[n].exp(), draws, replacement=True, generator=gen)
        uniq, counts = torch.unique(picks, return_counts=True)
        perm = torch.randperm(uniq.numel(), generator=gen)  # entry order is the producer's
        rows.append((uniq[perm], counts[perm]))
        width = max(width, uniq.numel())
    ids = np.full((N, width), -1, dtype=np.int32)
    counts = np.zeros((N, width), dtype=np.uint16)
    for n, (u, c) in enumerate(rows):
        ids[n, : u.numel()] = u.numpy()
        counts[n, : c.numel()] = c.numpy()
    return targets_from_cache(ids, None, counts=counts, draws=draws)


def make_targets(N, V, K, mode, gen):
    if mode == "sampled":
        return teacher_sampled(N, V, K, gen)
    ids, tlp, _ = teacher_topk(N, V, K, gen)
    return ids, tlp


def run_reference(logits, ids, tlp, grad_out=None, **kw):
    leaf = logits.detach().clone().requires_grad_(True)
    loss = sparse_kl_reference(leaf, ids, tlp, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), leaf.grad


def run_oracle(logits, ids, tlp, grad_out=None, chunk_size=None, **kw):
    leaf = logits.detach().double().requires_grad_(True)
    loss = oracle(leaf, ids, tlp, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), leaf.grad


def assert_matches(got, ref, dtype=torch.float32, what=""):
    tol = TOLERANCES[dtype]
    (loss, grad), (ref_loss, ref_grad) = got, ref
    assert grad.dtype == dtype, f"{what}: gradient dtype {grad.dtype} != logits dtype {dtype}"
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all(), what
    torch.testing.assert_close(
        loss.double(), ref_loss, atol=tol["loss_atol"], rtol=tol["loss_rtol"], msg=lambda m: f"{what} {m}"
    )
    # Floor of 1e-7: a row that trains nothing has an fp32 gradient of q - q ~ 1e-16, not 0.
    atol = tol["grad_atol"] * ref_grad.abs().max().item() + 1e-7
    torch.testing.assert_close(
        grad.double(), ref_grad, atol=atol, rtol=tol["grad_rtol"], msg=lambda m: f"{what} grad {m}"
    )


# --------------------------------------------------------------------------------------------
# Forward and backward against the oracle
# --------------------------------------------------------------------------------------------

# (N, V, K): N = 1; V and N multiples of nothing; K = 1; K = V (no tail category).
SHAPES = [(1, 5, 1), (7, 37, 5), (33, 1000, 16), (7, 37, 37), (33, 5, 2)]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-K{}".format(*s))
@pytest.mark.parametrize("mode", MODES)
def test_matches_dense_oracle(mode, shape, temperature):
    N, V, K = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mode, shape, temperature)).encode()))
    logits = torch.randn(N, V, generator=gen) * 3.0
    ids, tlp = make_targets(N, V, K, mode, gen)
    mask = torch.rand(N, generator=gen) > 0.3
    for chunk in (3, 2048):  # 3 divides neither 7 nor 33 (nor 1)
        kw = dict(mode=mode, temperature=temperature, mask=mask, chunk_size=chunk)
        got = run_reference(logits, ids, tlp, **kw)
        assert_matches(got, run_oracle(logits, ids, tlp, **kw), what=f"chunk={chunk}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_reductions_and_grad_output(mode, reduction):
    gen = torch.Generator().manual_seed(11 + len(mode) + len(reduction))
    N, V, K = 19, 53, 7
    logits = torch.randn(N, V, generator=gen) * 2.0
    ids, tlp = make_targets(N, V, K, mode, gen)
    ids[4], tlp[4] = -1, float("-inf")  # a row with no entries at all
    mask = torch.rand(N, generator=gen) > 0.4
    mask[4] = True
    # grad_output != 1: a scalar, or a fresh per-row weight (with signs) for "none".
    g = torch.randn(N, generator=gen) if reduction == "none" else torch.tensor(-0.37)
    kw = dict(mode=mode, temperature=1.3, mask=mask, reduction=reduction, chunk_size=4)
    got = run_reference(logits, ids, tlp, grad_out=g, **kw)
    assert_matches(got, run_oracle(logits, ids, tlp, grad_out=g, **kw), what=reduction)
    loss, grad = got
    if reduction == "none":
        assert loss.shape == (N,) and (loss[~mask] == 0).all()
    assert (grad[~mask] == 0).all(), "masked-out rows must get exactly zero gradient"
    if mode != "bucket":
        assert loss.reshape(-1)[4 if reduction == "none" else 0].isfinite()
    # The row without entries trains nothing in every mode.
    torch.testing.assert_close(grad[4], torch.zeros(V), atol=1e-7, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_all_rows_masked(mode, reduction):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 11, generator=gen)
    ids, tlp = make_targets(6, 11, 3, mode, gen)
    mask = torch.zeros(6, dtype=torch.bool)
    loss, grad = run_reference(logits, ids, tlp, mode=mode, mask=mask, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_logits(mode, dtype):
    gen = torch.Generator().manual_seed(3 + len(mode) + (dtype == torch.float16))
    N, V, K = 13, 301, 9
    logits = (torch.randn(N, V, generator=gen) * 4.0).to(dtype)
    ids, tlp = make_targets(N, V, K, mode, gen)
    mask = torch.rand(N, generator=gen) > 0.2
    g = torch.tensor(1.7)
    kw = dict(mode=mode, temperature=0.7, mask=mask, chunk_size=5)
    got = run_reference(logits, ids, tlp, grad_out=g, **kw)
    assert got[0].dtype == torch.float32
    assert_matches(got, run_oracle(logits, ids, tlp, grad_out=g, **kw), dtype=dtype, what=str(dtype))


# --------------------------------------------------------------------------------------------
# The tail guard: Q_K -> 1, r = 0, K = V
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("boost", [30.0, 200.0])
def test_student_mass_almost_all_on_k(boost):
    """1 - Q_K far below fp32 resolution: the loss stays finite and exact, the gradient too."""
    gen = torch.Generator().manual_seed(int(boost))
    N, V, K = 6, 1000, 5
    ids, tlp, _ = teacher_topk(N, V, K, gen, pad_frac=0.0, spread=1.0)  # tail r ~ 0.9
    logits = torch.randn(N, V, generator=gen)
    logits.scatter_(1, ids, boost + torch.randn(N, K, generator=gen))
    # The naive fp32 form of 1 - Q_K is off by orders of magnitude here (or exactly 0).
    q_k = torch.softmax(logits, -1).gather(1, ids).sum(1)
    q64 = torch.softmax(logits.double(), -1)
    true_tail = q64.sum(1) - q64.gather(1, ids).sum(1)
    assert ((1 - q_k).double() - true_tail).abs().max() > 10 * true_tail.max()
    for mode in ("bucket", "renorm"):
        got = run_reference(logits, ids, tlp, mode=mode)
        assert_matches(got, run_oracle(logits, ids, tlp, mode=mode), what=f"{mode} boost={boost}")
    # The tail term r (log r - log(1 - Q)) dominates: it grows with the boost.
    assert got[0] > 0


class _OpShapes(TorchDispatchMode):
    """Records the input shapes of the ops named in ``names``."""

    def __init__(self, *names):
        super().__init__()
        self.names, self.calls = names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.names:
            self.calls.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_complement_pass_only_on_rows_whose_tail_underflows():
    """The student's mass off K comes from the shared pass; only rows where it underflows fp32
    (the student puts all but < 1e-19 of its mass on K) get a logsumexp of their own."""
    gen = torch.Generator().manual_seed(17)
    N, V, K = 8, 300, 4
    ids, tlp, _ = teacher_topk(N, V, K, gen, pad_frac=0.0, spread=1.0)
    logits = torch.randn(N, V, generator=gen)
    for boosted in ([], [2, 5]):
        z = logits.clone()
        z[boosted] = z[boosted].scatter(1, ids[boosted], 200.0)
        spy = _OpShapes("logsumexp")
        with spy:
            got = run_reference(z, ids, tlp, mode="bucket", chunk_size=4)
        assert_matches(got, run_oracle(z, ids, tlp, mode="bucket"), what=f"boosted {boosted}")
        full_rows = sum(shape[0] for shape in spy.calls if shape[-1] == V)
        # the forward recomputes exactly the boosted rows; the backward reuses their lse_c
        assert full_rows == len(boosted), spy.calls


def test_rows_summing_above_one_forward_and_backward_agree():
    """float16 storage lets a row's probabilities sum up to ~2e-3 above 1. Such rows have no tail
    and are renormalised, so the gradient is the derivative of the computed loss and sums to 0."""
    gen = torch.Generator().manual_seed(23)
    N, V, K = 12, 50, 6
    ids, tlp, _ = teacher_topk(N, V, K, gen, pad_frac=0.0, spread=3.0)
    sums = tlp.double().exp().sum(1, keepdim=True)
    above = 1 + (torch.rand(N, 1, generator=gen, dtype=torch.float64) + 0.01) * 2e-3
    tlp = (tlp.double() + (above / sums).log()).float()
    assert (tlp.double().exp().sum(1) > 1 + 1e-5).all()
    logits = torch.randn(N, V, generator=gen) * 2
    for T in (1.0, 1.6):
        kw = dict(mode="bucket", temperature=T, reduction="sum")
        loss, grad = run_reference(logits, ids, tlp, **kw)
        assert_matches((loss, grad), run_oracle(logits, ids, tlp, **kw), what=f"T={T}")
        # a gradient of a function of softmax(z / T) sums to 0 over the vocabulary, row by row
        assert grad.double().sum(1).abs().max() < 1e-6
    # without the rule the rows would train towards q - p, whose sum 1 - P is far from 0
    assert (1 - tlp.double().exp().sum(1)).abs().min() > 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("peaked", [False, True], ids=["Q-small", "Q-large"])
def test_bucket_row_losses_exact_down_to_1e3(peaked, temperature):
    """Per-row bucket losses within 1e-5 relative of a float64 reference on rows with losses from
    1e-3 to ~2, with the student's mass on K both small (log1p(-Q)) and large (the complement),
    through the reference and the fused path (the logits are hidden @ I, exact)."""
    from longkd.kernels.fused_linear import fused_linear_sparse_kl

    gen = torch.Generator().manual_seed(int(temperature * 10) + peaked)
    N, V, K = 64, 2000, 32
    logits = torch.randn(N, V, generator=gen) * (5.0 if peaked else 1.0)
    # The teacher: the student's own distribution at T perturbed, more from row to row, so the
    # row losses spread from ~1e-4 to ~2.
    noise = torch.logspace(-1.7, 0.3, N, dtype=torch.float64)[:, None]
    teacher = logits.double() / temperature + noise * torch.randn(N, V, generator=gen, dtype=torch.float64)
    tlp, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    tlp = tlp.float()
    want = oracle_rows(logits, ids, tlp, mode="bucket", temperature=temperature)
    kw = dict(mode="bucket", temperature=temperature, reduction="none")
    got = sparse_kl_reference(logits, ids, tlp, chunk_size=7, **kw).double()
    fused = fused_linear_sparse_kl(logits, torch.eye(V), ids, tlp, chunk_size=9, **kw).double()
    rows = want >= 1e-3
    assert rows.sum() > 30 and want[rows].min() < 1.5e-3  # the small losses are really there
    q_k = torch.softmax(logits.double() / temperature, -1).gather(1, ids).sum(1)
    assert (q_k[rows] >= 0.5).any() if peaked else (q_k < 0.5).all()
    for name, value in (("reference", got), ("fused", fused)):
        rel = ((value - want).abs() / want)[rows]
        assert rel.max() < 1e-5, f"{name}: per-row relative error {rel.max():.2e}"


def test_zero_tail_and_full_vocabulary():
    """r == 0 (teacher mass entirely on K) and K == V: tail term 0, no NaN in the gradient."""
    gen = torch.Generator().manual_seed(2)
    V = 9
    logits = torch.randn(4, V, generator=gen) * 3
    ids = torch.tensor([[3, -1, -1], [0, 8, -1], [5, 1, 2], [-1, 4, -1]])
    half = math.log(0.5)
    third = math.log(1 / 3)
    inf = math.inf
    tlp = torch.tensor([[0.0, -inf, -inf], [half, half, -inf], [third, third, third], [-inf, 0.0, -inf]])
    got = run_reference(logits, ids, tlp, mode="bucket", reduction="none")
    assert_matches(got, run_oracle(logits, ids, tlp, mode="bucket", reduction="none"), what="r=0")
    # K = V with float32-rounded targets: P may miss 1 by a rounding error; no tail category.
    ids_full, tlp_full, _ = teacher_topk(3, V, V, gen, pad_frac=0.0)
    got = run_reference(logits[:3], ids_full, tlp_full, mode="bucket")
    assert_matches(got, run_oracle(logits[:3], ids_full, tlp_full, mode="bucket"), what="K=V")
    # Here bucket and renorm are both the full KL.
    renorm = run_reference(logits[:3], ids_full, tlp_full, mode="renorm")
    torch.testing.assert_close(got[0], renorm[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 4, 32])
def test_bucket_between_zero_and_full_kl(K):
    """Merging categories never increases KL: 0 <= bucket <= KL(p || q) over the vocabulary."""
    gen = torch.Generator().manual_seed(100 + K)
    N, V = 40, 257
    ids, tlp, logp = teacher_topk(N, V, K, gen, pad_frac=0.0)
    for scale in (0.5, 3.0):
        logits = torch.randn(N, V, generator=gen) * scale
        bucket = sparse_kl_reference(logits, ids, tlp, mode="bucket", reduction="none").double()
        renorm = sparse_kl_reference(logits, ids, tlp, mode="renorm", reduction="none").double()
        logq = torch.log_softmax(logits.double(), -1)
        full = (logp.exp() * (logp - logq)).sum(1)
        assert (bucket >= -1e-6).all() and (renorm >= -1e-6).all()
        assert (bucket <= full + 1e-5).all(), (bucket - full).max()
        assert (bucket < full - 1e-3).any()  # strict somewhere: the bound is not vacuous


def test_student_equal_to_teacher_gives_zero():
    gen = torch.Generator().manual_seed(8)
    N, V, K = 5, 40, 6
    ids, tlp, logp = teacher_topk(N, V, K, gen, pad_frac=0.0)
    logits = (logp * 1.3).float()  # softmax(z / 1.3) is the teacher
    loss, grad = run_reference(logits, ids, tlp, mode="bucket", temperature=1.3)
    assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6


# --------------------------------------------------------------------------------------------
# Memory: no fp32 [N, V] tensor, chunking does not change results
# --------------------------------------------------------------------------------------------


class _LargestFloat32(TorchDispatchMode):
    """Records the largest fp32/fp64 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", MODES)
def test_no_full_fp32_logits(mode):
    gen = torch.Generator().manual_seed(4)
    N, V, K, chunk = 64, 300, 8, 8
    logits = torch.randn(N, V, generator=gen).bfloat16().requires_grad_(True)
    ids, tlp = make_targets(N, V, K, mode, gen)
    spy = _LargestFloat32()
    with spy:
        loss = sparse_kl_reference(logits, ids, tlp, mode=mode, chunk_size=chunk)
        loss.backward()
        ce = cross_entropy_chunked(logits, ids[:, 0].clamp_min(0), chunk_size=chunk)
        ce.backward()
    assert logits.grad.dtype == torch.bfloat16
    assert 0 < spy.largest <= chunk * V, f"an fp32 tensor of {spy.largest} elements (chunk is {chunk * V})"


@pytest.mark.parametrize("mode", MODES)
def test_chunk_size_one_matches_whole(mode):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(10, 23, generator=gen)
    ids, tlp = make_targets(10, 23, 4, mode, gen)
    a = run_reference(logits, ids, tlp, mode=mode, chunk_size=1, temperature=0.7)
    b = run_reference(logits, ids, tlp, mode=mode, chunk_size=10_000, temperature=0.7)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Chunked cross-entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_matches_torch(reduction, dtype):
    gen = torch.Generator().manual_seed(21)
    N, V = 29, 103
    logits = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.3] = -100
    g = torch.randn(N, generator=gen) if reduction == "none" else torch.tensor(0.6)
    leaf = logits.clone().requires_grad_(True)
    loss = cross_entropy_chunked(leaf, targets, reduction=reduction, chunk_size=4)
    loss.backward(g)
    ref_leaf = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_leaf, targets, reduction=reduction, ignore_index=-100)
    ref.backward(g.double())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), atol=tol["loss_atol"], rtol=tol["loss_rtol"])
    assert leaf.grad.dtype == dtype
    atol = tol["grad_atol"] * ref_leaf.grad.abs().max().item()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=atol, rtol=tol["grad_rtol"])


def test_cross_entropy_all_ignored_and_errors():
    logits = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy_chunked(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()
    with pytest.raises(LongkdError, match="outside the vocabulary"):
        cross_entropy_chunked(logits, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(LongkdError, match="targets must be int64"):
        cross_entropy_chunked(logits, torch.tensor([0, 1, 2, 3], dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# Dispatch, validation, cache targets
# --------------------------------------------------------------------------------------------


def test_dispatch_on_cpu():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 12, generator=gen)
    ids, tlp, _ = teacher_topk(5, 12, 3, gen)
    assert resolve_impl("auto", logits) == "reference"
    ref = sparse_kl_reference(logits, ids, tlp, mode="renorm", temperature=2.0)
    for impl in ("auto", "reference"):
        got = sparse_kl(logits, ids, tlp, mode="renorm", temperature=2.0, impl=impl)
        assert torch.equal(got, ref)
    strided = torch.randn(12, 5, generator=gen).t()  # [5, 12], not contiguous
    torch.testing.assert_close(
        sparse_kl(strided, ids, tlp, chunk_size=2), sparse_kl(strided.contiguous(), ids, tlp), atol=0, rtol=0
    )
    with pytest.raises(LongkdError, match=r"--loss-impl cupy needs a CUDA device and the `cupy` package"):
        sparse_kl(logits, ids, tlp, impl="cupy")
    with pytest.raises(LongkdError, match="unknown impl"):
        sparse_kl(logits, ids, tlp, impl="triton")


def test_bad_arguments_raise_longkd_error():
    logits = torch.randn(4, 10)
    ids = torch.tensor([[1, 2], [3, -1], [0, 9], [5, 6]])
    tlp = torch.full((4, 2), -1.0)
    bad = {
        "ids must be int64": dict(ids=ids.int()),
        "must have the ids' shape": dict(target_logprobs=tlp[:, :1]),
        "target_logprobs must be float32": dict(target_logprobs=tlp.half()),
        r"ids must be \[N=4, K\]": dict(ids=ids[:3], target_logprobs=tlp[:3]),
        "mask must be a bool": dict(mask=torch.ones(4)),
        "unknown mode": dict(mode="full"),
        "unknown reduction": dict(reduction="avg"),
        "temperature must be > 0": dict(temperature=0.0),
        "chunk_size must be >= 1": dict(chunk_size=0),
        r"logits must be a \[N, V\]": dict(logits=logits[None]),
        "logits dtype": dict(logits=logits.int()),
        "V=10 columns": dict(ids=ids.clone().fill_(10)),
    }
    for message, override in bad.items():
        for fn in (sparse_kl, sparse_kl_reference):
            args = dict(logits=logits, ids=ids, target_logprobs=tlp) | override
            with pytest.raises(LongkdError, match=message):
                fn(args.pop("logits"), args.pop("ids"), args.pop("target_logprobs"), **args)
    with pytest.raises(LongkdError, match="repeats a token id"):
        sparse_kl(logits, torch.tensor([[1, 1], [3, -1], [0, 9], [5, 6]]), tlp, check_ids=True)
    # Repeated padding is fine.
    sparse_kl(logits, torch.tensor([[1, 2], [-1, -1], [0, 9], [5, 6]]), tlp, check_ids=True)


def test_sampled_targets_not_summing_to_one_warn():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 20, generator=gen)
    ids, tlp, _ = teacher_topk(3, 20, 4, gen, pad_frac=0.0)  # top-k: sums < 1
    with pytest.warns(RuntimeWarning, match="do not sum to 1"):
        sparse_kl(logits, ids, tlp, mode="sampled")


def test_targets_from_cache():
    ids = np.array([[[4, 1, -1], [2, -1, -1]]], dtype=np.int32)  # [1, 2, 3]
    lp = np.array([[[-0.5, -1.5, -np.inf], [-0.1, -np.inf, -np.inf]]], dtype=np.float16)
    out_ids, out_lp = targets_from_cache(ids, lp)
    assert out_ids.dtype == torch.int64 and out_lp.dtype == torch.float32 and out_ids.shape == (1, 2, 3)
    assert out_ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(out_lp.numpy(), lp.astype(np.float32))
    counts = np.array([[[5, 3, 0], [8, 0, 0]]], dtype=np.uint16)
    s_ids, s_lp = targets_from_cache(torch.from_numpy(ids), None, counts=counts, draws=8)
    expected = np.log(np.array([[[5 / 8, 3 / 8, 1], [1.0, 1, 1]]]))
    expected[ids < 0] = -np.inf
    np.testing.assert_allclose(s_lp.numpy(), expected, rtol=1e-7)
    assert torch.isneginf(s_lp[ids < 0]).all() and (s_ids[ids < 0] == -1).all()
    with pytest.raises(LongkdError, match="draws"):
        targets_from_cache(ids, None, counts=counts)
    with pytest.raises(LongkdError, match="pass logprobs"):
        targets_from_cache(ids)
    with pytest.raises(LongkdError, match="shape"):
        targets_from_cache(ids, lp[..., :2])


def test_sampled_equals_renorm_on_normalised_targets():
    """Sampled targets sum to 1, so renormalising changes nothing: both modes agree."""
    gen = torch.Generator().manual_seed(12)
    ids, tlp = teacher_sampled(9, 31, 6, gen)
    logits = torch.randn(9, 31, generator=gen)
    a = run_reference(logits, ids, tlp, mode="sampled", temperature=0.9)
    b = run_reference(logits, ids, tlp, mode="renorm", temperature=0.9)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_reference_on_cuda_and_auto_dispatch(mode, dtype):
    """The reference is device-agnostic (CUDA equals CPU), and "auto" on CUDA agrees with it."""
    gen = torch.Generator().manual_seed(31)
    N, V, K = 67, 1001, 13
    logits = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    ids, tlp = make_targets(N, V, K, mode, gen)
    mask = torch.rand(N, generator=gen) > 0.2
    kw = dict(mode=mode, temperature=0.8, mask=mask, chunk_size=16)
    cpu = run_reference(logits, ids, tlp, **kw)
    cuda_kw = dict(kw, mask=mask.cuda())
    gpu = run_reference(logits.cuda(), ids.cuda(), tlp.cuda(), **cuda_kw)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=tol["loss_atol"], rtol=tol["loss_rtol"])
    atol = tol["grad_atol"] * cpu[1].abs().max().item() + 1e-7
    torch.testing.assert_close(gpu[1].cpu().float(), cpu[1].float(), atol=atol, rtol=tol["grad_rtol"])
    leaf = logits.cuda().requires_grad_(True)
    auto = sparse_kl(leaf, ids.cuda(), tlp.cuda(), impl="auto", **cuda_kw)
    auto.backward()
    torch.testing.assert_close(auto.cpu(), cpu[0], atol=1e-4, rtol=1e-4)
    atol = tol["grad_atol"] * cpu[1].abs().max().item() + 1e-6
    torch.testing.assert_close(leaf.grad.cpu().float(), cpu[1].float(), atol=atol, rtol=tol["grad_rtol"])
