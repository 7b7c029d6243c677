"""The CuPy sparse-KL kernel against the torch reference, forward and backward.

GPU tests (``@pytest.mark.gpu``; skipped without CUDA, and without CuPy) poison every output
buffer with NaN before each run and cover fp32 / bf16 / fp16, V not a multiple of the block
or vector width, k in {1, 7, 64, 256}, sampled ids with counts, T != 1, ignored rows,
grad_output != 1, the in-place gradient, N * V > 2^31, and the fused-linear path on CUDA.
Per-dtype error bounds are the TOLERANCES table below.

CPU tests check the argument contract and the kernel's per-row algorithm (lse, P, Q, the
dense multiplier and target scale it stores) transcribed into torch against a plain
full-vocabulary oracle with autograd, so the formulas the CUDA code uses are checked here too.
"""

from __future__ import annotations

import pytest
import torch

from longkd.errors import LongkdError
from longkd.kernels import cupy_kl
from tests.kernels.test_fused_linear import dense_oracle, make_targets

MODES = ("bucket", "renorm", "sampled")

# Error bounds per logits dtype, as data. Inputs to kernel and reference hold the same values
# (the reference sees the logits upcast to fp32), so loss differences come from fp32 order of
# summation and fast exp/log only; gradient differences add one rounding to the logits dtype
# (2^-24, 2^-9, 2^-11 relative), hence "grad_rtol"; "grad_atol" is relative to max |grad|.
TOLERANCES = {
    torch.float32: {"loss_atol": 2e-5, "loss_rtol": 2e-5, "grad_atol": 1e-5, "grad_rtol": 1e-4},
    torch.bfloat16: {"loss_atol": 2e-5, "loss_rtol": 2e-5, "grad_atol": 4e-3, "grad_rtol": 8e-3},
    torch.float16: {"loss_atol": 2e-5, "loss_rtol": 2e-5, "grad_atol": 1e-3, "grad_rtol": 1e-3},
}


def kernel_row_math(logits, ids, tlp, *, mode, temperature, mask):
    """The kernel's algorithm in torch: per-row loss and the gradient of the row-loss sum."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    valid = (ids >= 0) & (ids < z.shape[1])
    zk = z.gather(1, ids.clamp(0, z.shape[1] - 1))
    logq = zk - lse[:, None]
    q = torch.where(valid, logq.exp(), torch.zeros_like(logq))
    has_p = valid & (tlp > -3.0e38)
    t = torch.where(has_p, tlp, torch.zeros_like(tlp))
    p = torch.where(has_p, t.exp(), torch.zeros_like(t))
    P, Q, A = p.sum(1), q.sum(1), (p * (t - logq)).sum(1)
    if mode == "bucket":
        r = (1 - P).clamp_min(0)
        omq = (1 - Q).clamp_min(1e-7)
        loss = A + torch.xlogy(r, r) - r * omq.log()
        a, c = 1 - r / omq, torch.ones_like(P)
    else:
        Ps = P.clamp_min(1e-30)
        loss = torch.where(P > 0, A / Ps - Ps.log(), torch.zeros_like(P))
        a = torch.where(P > 0, torch.ones_like(P), torch.zeros_like(P))
        c = torch.where(P > 0, 1 / Ps, torch.zeros_like(P))
    qall = torch.exp(z - lse[:, None])
    grad = qall * a[:, None]  # dense pass
    # K fix-ups: q_i - c p_i replaces the dense value q_i a (padding adds a zero delta).
    delta = torch.where(valid, q - c[:, None] * p - q * a[:, None], torch.zeros_like(q))
    grad = grad.scatter_add(1, ids.clamp(0, z.shape[1] - 1), delta) / temperature
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
        grad = torch.where(mask[:, None], grad, torch.zeros_like(grad))
    return loss, grad


def random_case(N, V, K, mode, seed, device="cpu", dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * scale).to(dtype)
    ids, tlp = make_targets(N, V, K, mode, gen)
    mask = torch.rand(N, generator=gen) > 0.3
    return logits.to(device), ids.to(device), tlp.to(device), mask.to(device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_kernel_row_math_matches_oracle(mode, temperature):
    logits, ids, tlp, mask = random_case(23, 97, 9, mode, seed=7 * len(mode) + int(10 * temperature))
    loss, grad = kernel_row_math(logits, ids, tlp, mode=mode, temperature=temperature, mask=mask)
    leaf = logits.clone().requires_grad_(True)
    ref = dense_oracle(leaf, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, leaf.grad, atol=1e-6, rtol=1e-5)
    assert (loss[mask] > 0).all()  # a real divergence on every trained row


def test_bucket_never_exceeds_full_kl():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(16, 50, generator=gen) * 2, -1)
    student = torch.randn(16, 50, generator=gen)
    tlp, ids = teacher.topk(6, dim=-1)
    loss, _ = kernel_row_math(student, ids, tlp, mode="bucket", temperature=1.0, mask=None)
    full = (teacher.exp() * (teacher - torch.log_softmax(student, -1))).sum(1)
    assert (loss <= full + 1e-6).all() and (loss > 0).all()


def test_contract_errors_on_cpu():
    logits, ids, tlp, mask = random_case(4, 11, 3, "bucket", seed=1)
    with pytest.raises(LongkdError, match="mode"):
        cupy_kl.check_inputs(logits, ids, tlp, None, "topk", 1.0)
    with pytest.raises(LongkdError, match="temperature"):
        cupy_kl.check_inputs(logits, ids, tlp, None, "bucket", 0.0)
    with pytest.raises(LongkdError, match="int64"):
        cupy_kl.check_inputs(logits, ids.int(), tlp, None, "bucket", 1.0)
    with pytest.raises(LongkdError, match="target_logprobs"):
        cupy_kl.check_inputs(logits, ids, tlp.double(), None, "bucket", 1.0)
    with pytest.raises(LongkdError, match="mask"):
        cupy_kl.check_inputs(logits, ids, tlp, mask.float(), "bucket", 1.0)
    with pytest.raises(LongkdError, match="exceeds"):
        big = torch.zeros(4, cupy_kl.MAX_K + 1, dtype=torch.int64)
        cupy_kl.check_inputs(logits, big, big.float(), None, "bucket", 1.0)
    with pytest.raises(LongkdError, match="CUDA"):
        cupy_kl.sparse_kl_cupy(logits, ids, tlp)


def test_availability_is_reported_not_raised():
    ok = cupy_kl.is_available()
    assert isinstance(ok, bool)
    assert (cupy_kl.unavailable_reason() == "") == ok
    if not ok:
        with pytest.raises(LongkdError, match="unavailable"):
            cupy_kl.warmup()


# --------------------------------------------------------------------------------------------
# GPU: kernel vs reference
# --------------------------------------------------------------------------------------------


def _need_kernel():
    pytest.importorskip("cupy")
    if not cupy_kl.is_available():
        pytest.skip(f"CuPy kernel unavailable: {cupy_kl.unavailable_reason()}")
    return pytest.importorskip("longkd.kernels.reference").sparse_kl_reference


def reference_rows_and_grad(reference, logits, ids, tlp, *, mode, temperature, mask, row_scale):
    """Reference per-row loss and gradient of sum(row_scale * rows), on fp32 logits."""
    leaf = logits.detach().float().requires_grad_(True)
    rows = reference(leaf, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction="none")
    rows.backward(row_scale.expand_as(rows))
    return rows.detach(), leaf.grad


def assert_grad_close(got, ref, dtype, what=""):
    tol = TOLERANCES[dtype]
    atol = tol["grad_atol"] * ref.abs().max().item()
    torch.testing.assert_close(
        got.float(), ref, atol=atol, rtol=tol["grad_rtol"], msg=lambda m: f"{what} {m}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 7, 64, 256])
def test_launch_vs_reference(dtype, mode, k):
    reference = _need_kernel()
    N, V, T = 67, 5003, (0.7 if k % 2 else 1.0)  # V odd: misaligned rows, ragged tails
    logits, ids, tlp, mask = random_case(N, V, k, mode, seed=k, device="cuda", dtype=dtype)
    scale = torch.rand(N, device="cuda") + 0.5  # per-row grad_output (reduction="none")
    nan = float("nan")
    loss = torch.full((N,), nan, device="cuda")
    stats = torch.full((N, 3), nan, device="cuda")
    loss, stats = cupy_kl.launch_forward(
        logits, ids, tlp, mask, mode=mode, temperature=T, loss_rows=loss, stats=stats
    )
    grad = torch.full_like(logits, nan)
    cupy_kl.launch_backward(logits, ids, tlp, mask, stats, grad, scale, temperature=T)
    fused = torch.full_like(logits, nan)  # the same-pass (Liger-style) gradient
    loss2, _ = cupy_kl.launch_forward(
        logits, ids, tlp, mask, mode=mode, temperature=T, grad=fused, grad_scale=scale
    )
    torch.cuda.synchronize()
    ref_rows, ref_grad = reference_rows_and_grad(
        reference, logits, ids, tlp, mode=mode, temperature=T, mask=mask, row_scale=scale
    )
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, ref_rows, atol=tol["loss_atol"], rtol=tol["loss_rtol"])
    assert torch.equal(loss, loss2)
    assert_grad_close(grad, ref_grad, dtype, "backward kernel")
    assert_grad_close(fused, ref_grad, dtype, "fused forward")
    assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all() and (fused[~mask] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_vs_reference(reduction, dtype):
    reference = _need_kernel()
    N, V, K, T = 129, 32001, 64, 2.0
    logits, ids, tlp, mask = random_case(N, V, K, "bucket", seed=3, device="cuda", dtype=dtype)
    g = torch.rand(N, device="cuda") + 0.5 if reduction == "none" else torch.tensor(0.37, device="cuda")
    leaf = logits.clone().requires_grad_(True)
    out = cupy_kl.sparse_kl_cupy(leaf, ids, tlp, temperature=T, mask=mask, reduction=reduction)
    out.backward(g)
    ref_leaf = logits.float().requires_grad_(True)
    ref = reference(ref_leaf, ids, tlp, temperature=T, mask=mask, reduction=reduction)
    ref.backward(g)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref.float(), atol=tol["loss_atol"], rtol=tol["loss_rtol"])
    assert leaf.grad.dtype == dtype
    assert_grad_close(leaf.grad, ref_leaf.grad, dtype)


@pytest.mark.gpu
def test_inplace_gradient_and_all_masked():
    _need_kernel()
    logits, ids, tlp, mask = random_case(40, 7001, 16, "renorm", seed=9, device="cuda", dtype=torch.bfloat16)
    a = logits.clone().requires_grad_(True)
    cupy_kl.sparse_kl_cupy(a, ids, tlp, mode="renorm", mask=mask).backward()
    x = logits.clone().requires_grad_(True)
    z = x * 1  # a non-leaf, as the LM head's output is
    cupy_kl.sparse_kl_cupy(z, ids, tlp, mode="renorm", mask=mask, inplace_grad=True).backward()
    assert torch.equal(z.detach(), a.grad)  # the gradient was written over the logits' storage
    assert torch.equal(x.grad, a.grad)
    none = torch.zeros_like(mask)
    c = logits.clone().requires_grad_(True)
    out = cupy_kl.sparse_kl_cupy(c, ids, tlp, mode="renorm", mask=none)
    out.backward()
    assert out.item() == 0.0 and (c.grad == 0).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_31_elements():
    """N * V > 2^31 (about 5 GB of bf16 logits): rows past the 32-bit boundary are right."""
    reference = _need_kernel()
    N, V, K = 16384, 152064, 64
    torch.manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    ids = torch.randint(0, V, (N, K), device="cuda")
    ids = torch.sort(ids, dim=1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids = torch.where(dup, torch.full_like(ids, -1), ids)  # distinct ids per row, duplicates padded
    tlp = torch.log_softmax(torch.randn(N, K, device="cuda"), -1) - 0.5  # P_K = e^-0.5
    tlp = torch.where(ids >= 0, tlp, torch.full_like(tlp, float("-inf")))
    scale = torch.full((1,), 1.0 / N, device="cuda")
    rows = torch.cat([torch.arange(0, 256), torch.arange(N - 256, N)]).cuda()  # 2^31 / V ~ row 14122
    fresh = logits[rows].clone()  # kept before the in-place gradient overwrites the logits
    loss, stats = cupy_kl.launch_forward(logits, ids, tlp, None, mode="bucket", temperature=1.0)
    cupy_kl.launch_backward(logits, ids, tlp, None, stats, logits, scale, temperature=1.0)  # in place
    ref_rows, ref_grad = reference_rows_and_grad(
        reference, fresh, ids[rows], tlp[rows], mode="bucket", temperature=1.0, mask=None, row_scale=scale
    )
    torch.testing.assert_close(loss[rows], ref_rows, atol=2e-5, rtol=2e-5)
    assert_grad_close(logits[rows], ref_grad, torch.bfloat16, "rows past 2^31")


@pytest.mark.gpu
@pytest.mark.parametrize("post", [None, "softcap"])
def test_fused_linear_kernel_path(post):
    _need_kernel()
    from longkd.kernels.fused_linear import fused_linear_sparse_kl

    gen = torch.Generator().manual_seed(2)
    N, d, V, K = 301, 64, 5003, 32
    hidden = torch.randn(N, d, generator=gen).cuda().to(torch.bfloat16)
    weight = (torch.randn(V, d, generator=gen) / 8).cuda().to(torch.bfloat16)
    ids, tlp = make_targets(N, V, K, "bucket", gen)
    ids, tlp = ids.cuda(), tlp.cuda()
    mask = (torch.rand(N, generator=gen) > 0.2).cuda()
    fn = None if post is None else (lambda z: 30.0 * torch.tanh(z / 30.0))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_linear_sparse_kl(h, w, ids, tlp, mask=mask, chunk_size=64, logit_postprocess=fn)
    loss.backward(torch.tensor(1.7, device="cuda"))
    h2, w2 = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    z = h2 @ w2.t()
    z = fn(z) if fn is not None else z
    ref = dense_oracle(z, ids, tlp, mode="bucket", mask=mask)
    ref.backward(torch.tensor(1.7, device="cuda"))
    torch.testing.assert_close(loss, ref, atol=2e-3, rtol=2e-3)  # logits rounded to bf16 per chunk
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=3e-2)
