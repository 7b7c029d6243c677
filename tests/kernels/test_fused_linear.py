"""Fused LM head + sparse KL vs the unfused path (F.linear, then the loss on full logits).

Runs on CPU: the chunk loop, dX / dW / db accumulation, the Liger-style grad_output scaling,
the reduction="none" recompute and the softcap chain rule are all device independent; the
per-chunk loss is plugged in (an independent dense oracle, or the torch reference when it is
installed). The CUDA kernel path is checked by the GPU tests in test_cupy_kl.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longkd.errors import LongkdError
from longkd.kernels.fused_linear import fused_linear_losses, fused_linear_sparse_kl
from tests.helpers import reduce_rows

MODES = ("bucket", "renorm", "sampled")


def dense_oracle(logits, ids, tlp, *, mode, temperature=1.0, mask=None, reduction="mean"):
    """Per-row sparse KL written plainly over the full vocabulary (fp32, autograd-friendly).

    bucket: sum_K p log(p/q) + r log(r / (1 - Q)), p renormalised where it sums above 1;
    renorm/sampled: KL(p/P || q) over K.
    """
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = (ids >= 0) & torch.isfinite(tlp)
    t = torch.where(valid, tlp, torch.zeros_like(tlp))  # finite everywhere: no NaN gradients
    p = torch.where(valid, t.exp(), torch.zeros_like(t))
    logq_k = logq.gather(1, ids.clamp_min(0))
    P = p.sum(1)
    if mode == "bucket":
        over = P.clamp_min(1)
        p, t, P = p / over[:, None], t - torch.log(over)[:, None], P / over
        Q = torch.where(ids >= 0, logq_k.exp(), torch.zeros_like(logq_k)).sum(1)
        r = (1 - P).clamp_min(0)
        rows = (p * (t - logq_k)).sum(1) + torch.xlogy(r, r) - r * torch.log1p(-Q)
    else:
        Ps = P.clamp_min(1e-30)
        ph = p / Ps[:, None]
        rows = (ph * (t - torch.log(Ps)[:, None] - logq_k)).sum(1)
        rows = torch.where(P > 0, rows, torch.zeros_like(rows))
    return reduce_rows(rows, mask, reduction)


def oracle_chunk_loss(z, ids, tlp, mask, *, mode, temperature, grad_scale=None, seen=None):
    """A ChunkLoss built on the dense oracle (independent of kernels/reference.py)."""
    if seen is not None:
        seen.append(z.shape[0])
    leaf = z.detach().float().requires_grad_(True)
    with torch.enable_grad():
        rows = dense_oracle(leaf, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction="none")
        if grad_scale is None:
            return rows.detach(), None
        (dz,) = torch.autograd.grad(rows, leaf, grad_outputs=grad_scale.reshape(-1).expand(rows.shape[0]))
    return rows.detach(), dz.to(z.dtype)


def make_targets(N, V, K, mode, gen, pad_frac=0.2):
    """Teacher entries as a cache stores them: top-k of a full softmax, or sampled counts."""
    teacher = torch.randn(N, V, generator=gen) * 2.0
    logp = torch.log_softmax(teacher, -1)
    if mode == "sampled":
        draws = K  # at most K distinct ids: every row keeps all its draws and sums to 1
        ids = torch.full((N, K), -1, dtype=torch.int64)
        tlp = torch.full((N, K), float("-inf"))
        for n in range(N):
            picks = torch.multinomial(logp[n].exp(), draws, replacement=True, generator=gen)
            uniq, counts = torch.unique(picks, return_counts=True)
            keep = min(K, uniq.numel())
            order = counts.argsort(descending=True)[:keep]
            ids[n, :keep] = uniq[order]
            tlp[n, :keep] = torch.log(counts[order].float() / draws)
        return ids, tlp
    tlp, ids = logp.topk(K, dim=-1)
    pad = torch.rand(N, K, generator=gen) < pad_frac
    ids = torch.where(pad, torch.full_like(ids, -1), ids)
    tlp = torch.where(pad, torch.full_like(tlp, float("-inf")), tlp)
    return ids, tlp


def make_case(N, d, V, K, mode, seed, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=gen).to(dtype)
    weight = (torch.randn(V, d, generator=gen) / d**0.5).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype) if bias else None
    ids, tlp = make_targets(N, V, K, mode, gen)
    mask = torch.rand(N, generator=gen) > 0.25
    return hidden, weight, b, ids, tlp, mask


def run_both(
    hidden,
    weight,
    bias,
    ids,
    tlp,
    *,
    mode,
    temperature,
    mask,
    reduction,
    grad_out,
    post=None,
    loss_impl=oracle_chunk_loss,
    chunk_size=8,
):
    """(loss, grads) of the fused path and of the unfused path, same inputs and grad_output."""
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        if fused:
            loss = fused_linear_sparse_kl(
                h,
                w,
                ids,
                tlp,
                bias=b,
                mode=mode,
                temperature=temperature,
                mask=mask,
                reduction=reduction,
                chunk_size=chunk_size,
                loss_impl=loss_impl,
                logit_postprocess=post,
            )
        else:
            z = F.linear(h, w, b)
            z = post(z) if post is not None else z
            loss = dense_oracle(
                z, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction=reduction
            )
        loss.backward(grad_out)
        results.append((loss.detach(), h.grad, w.grad, None if b is None else b.grad))
    return results


def assert_close_all(fused, unfused, atol=1e-5, rtol=1e-4):
    for name, a, b in zip(("loss", "dX", "dW", "db"), fused, unfused):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_unfused(mode, reduction):
    N, d, V, K = 37, 24, 101, 7  # odd shapes: the last chunk is partial
    hidden, weight, bias, ids, tlp, mask = make_case(
        N, d, V, K, mode, seed=10 * MODES.index(mode) + len(reduction)
    )
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.rand(N, generator=gen) + 0.5 if reduction == "none" else torch.tensor(0.7)
    fused, unfused = run_both(
        hidden,
        weight,
        bias,
        ids,
        tlp,
        mode=mode,
        temperature=1.0,
        mask=mask,
        reduction=reduction,
        grad_out=grad_out,
    )
    assert_close_all(fused, unfused)
    assert fused[2].abs().sum() > 0  # the comparison is not between two zero tensors


@pytest.mark.parametrize("mode", ["bucket", "renorm"])
def test_temperature_softcap_and_no_bias(mode):
    N, d, V, K = 29, 16, 67, 5
    hidden, weight, _, ids, tlp, mask = make_case(N, d, V, K, mode, seed=11, bias=False)
    cap = 3.0
    fused, unfused = run_both(
        hidden * 3,
        weight,
        None,
        ids,
        tlp,
        mode=mode,
        temperature=2.5,
        mask=mask,
        reduction="mean",
        grad_out=torch.tensor(1.3),
        post=lambda z: cap * torch.tanh(z / cap),
    )
    assert_close_all(fused, unfused)
    # The softcap matters here: without it the loss differs.
    plain = fused_linear_sparse_kl(
        hidden * 3,
        weight,
        ids,
        tlp,
        mode=mode,
        temperature=2.5,
        mask=mask,
        chunk_size=8,
        loss_impl=oracle_chunk_loss,
    )
    assert not torch.allclose(plain, fused[0])


def test_chunks_bounded_and_chunk_size_independent():
    N, d, V, K = 50, 12, 41, 6
    hidden, weight, bias, ids, tlp, mask = make_case(N, d, V, K, "bucket", seed=3)
    outs = []
    for chunk in (1, 7, 50, 4096):
        seen = []

        def impl(*args, seen=seen, **kwargs):
            return oracle_chunk_loss(*args, seen=seen, **kwargs)

        h = hidden.clone().requires_grad_(True)
        loss = fused_linear_sparse_kl(
            h, weight, ids, tlp, bias=bias, mask=mask, chunk_size=chunk, loss_impl=impl
        )
        loss.backward()
        assert max(seen) <= chunk and sum(seen) == N  # never more than a chunk of logits at once
        outs.append((loss.detach(), h.grad))
    for loss, grad in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, outs[0][1], atol=1e-6, rtol=1e-5)


def test_all_rows_masked_gives_zero():
    hidden, weight, bias, ids, tlp, _ = make_case(9, 8, 31, 4, "bucket", seed=4)
    mask = torch.zeros(9, dtype=torch.bool)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fused_linear_sparse_kl(
        h, w, ids, tlp, bias=bias, mask=mask, chunk_size=4, loss_impl=oracle_chunk_loss
    )
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bfloat16_inputs_follow_fp32():
    """bf16 hidden/weight: grads come back in bf16, close to an fp32 run of the same values."""
    N, d, V, K = 33, 16, 53, 5
    hidden, weight, bias, ids, tlp, mask = make_case(N, d, V, K, "bucket", seed=8, dtype=torch.bfloat16)
    # the same loss settings for both runs: only the inputs' dtype differs
    kw = dict(mode="bucket", temperature=1.0, mask=mask, reduction="sum", grad_out=torch.tensor(1.0))
    got = run_both(hidden, weight, bias, ids, tlp, **kw)[0]
    ref = run_both(hidden.float(), weight.float(), bias.float(), ids, tlp, **kw)[1]
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[0], ref[0], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_default_loss_impl_uses_reference(mode):
    """On CPU the default per-chunk loss is kernels/reference.py: it must agree with the oracle."""
    pytest.importorskip("longkd.kernels.reference")
    hidden, weight, bias, ids, tlp, mask = make_case(21, 10, 45, 6, mode, seed=21)
    fused, unfused = run_both(
        hidden,
        weight,
        bias,
        ids,
        tlp,
        mode=mode,
        temperature=1.5,
        mask=mask,
        reduction="mean",
        grad_out=torch.tensor(0.9),
        loss_impl="auto",
        chunk_size=5,
    )
    assert_close_all(fused, unfused)


def test_bad_inputs_raise_longkd_error():
    hidden, weight, bias, ids, tlp, mask = make_case(6, 8, 20, 3, "bucket", seed=1)
    with pytest.raises(LongkdError, match="weight"):
        fused_linear_sparse_kl(hidden, weight[:, :5], ids, tlp)
    with pytest.raises(LongkdError, match="ids"):
        fused_linear_sparse_kl(hidden, weight, ids.int(), tlp)
    with pytest.raises(LongkdError, match="mode"):
        fused_linear_sparse_kl(hidden, weight, ids, tlp, mode="full")
    with pytest.raises(LongkdError, match="mask"):
        fused_linear_sparse_kl(hidden, weight, ids, tlp, mask=mask[:3])
    with pytest.raises(LongkdError, match="dtype"):
        fused_linear_sparse_kl(hidden.double(), weight, ids, tlp)


# --------------------------------------------------------------------------------------------
# KL and CE in one chunk pass (the trainer's fused_linear_losses)
# --------------------------------------------------------------------------------------------


def unfused_losses(h, w, b, ids, tlp, targets, *, mode, temperature, mask, kd_weight, ce_weight, post=None):
    """(loss, kl, ce) on materialised logits: F.linear, the dense oracle, F.cross_entropy."""
    z = F.linear(h, w, b)
    z = post(z) if post is not None else z
    kl = dense_oracle(z, ids, tlp, mode=mode, temperature=temperature, mask=mask)
    kept = targets != -100
    ce = F.cross_entropy(z.float(), targets, ignore_index=-100) if kept.any() else z.sum() * 0
    return kd_weight * kl + ce_weight * ce, kl, ce


def next_tokens(N, V, mask, gen):
    targets = torch.randint(0, V, (N,), generator=gen)
    return targets.masked_fill(~mask, -100)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("impl", ["auto", "plugged"])
def test_kd_and_ce_share_the_chunks(weights, temperature, impl):
    """loss, the logged kl and ce, dX, dW and db equal the unfused path's; a term of weight 0
    adds nothing to the gradient. T = 1 shares one softmax; T != 1 gives the CE its own."""
    kd_weight, ce_weight = weights
    N, d, V, K = 41, 12, 67, 6
    hidden, weight, bias, ids, tlp, mask = make_case(N, d, V, K, "bucket", seed=int(31 * temperature))
    gen = torch.Generator().manual_seed(8)
    targets = next_tokens(N, V, mask, gen)
    post = (lambda z: 4.0 * torch.tanh(z / 4.0)) if impl == "plugged" else None
    got, want = [], []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        kw = dict(mode="bucket", temperature=temperature, mask=mask, kd_weight=kd_weight, ce_weight=ce_weight)
        if fused:
            out = fused_linear_losses(
                h, w, bias=b, ids=ids, target_logprobs=tlp, targets=targets, chunk_size=8,
                loss_impl=oracle_chunk_loss if impl == "plugged" else "auto", logit_postprocess=post, **kw,
            )  # fmt: skip
            loss, kl, ce = out
        else:
            loss, kl, ce = unfused_losses(h, w, b, ids, tlp, targets, post=post, **kw)
        loss.backward(torch.tensor(1.3))
        (got if fused else want).append((loss.detach(), kl.detach(), ce.detach(), h.grad, w.grad, b.grad))
    for name, a, e in zip(("loss", "kl", "ce", "dX", "dW", "db"), got[0], want[0]):
        torch.testing.assert_close(a, e.to(a.dtype), atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if kd_weight == 0 or ce_weight == 0:  # the logged-only term adds nothing to the gradient
        only = unfused_losses(
            hidden.clone().requires_grad_(True), weight, bias, ids, tlp, targets, mode="bucket",
            temperature=temperature, mask=mask, kd_weight=kd_weight, ce_weight=ce_weight, post=post,
        )[0]  # fmt: skip
        assert only.requires_grad and got[0][3].abs().sum() > 0


def test_logged_only_terms_run_no_gradient_work():
    """With ce_weight 0 the fused path's chunk ops are those of the KL alone plus two gathers:
    no CE gradient (no target scatter), and the logged CE is still right."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    N, d, V, K = 30, 8, 40, 5
    hidden, weight, _, ids, tlp, mask = make_case(N, d, V, K, "bucket", seed=2, bias=False)
    targets = next_tokens(N, V, mask, torch.Generator().manual_seed(3))
    counts = {}
    for ce_weight in (0.0, 1.0):
        spy = Ops()
        h = hidden.clone().requires_grad_(True)
        with spy:
            out = fused_linear_losses(
                h, weight, ids=ids, target_logprobs=tlp, targets=targets, mask=mask, ce_weight=ce_weight,
                chunk_size=N,
            )  # fmt: skip
        counts[ce_weight] = spy.names.count("scatter_add_")
        want = F.cross_entropy(F.linear(hidden, weight).double(), targets, ignore_index=-100)
        torch.testing.assert_close(out.ce.double(), want, atol=1e-6, rtol=1e-6)
    assert counts == {0.0: 1, 1.0: 2}, counts  # K fix-ups; K and target fix-ups


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_matches_materialised_reference(mode, temperature):
    """The fused path against F.linear + sparse_kl_reference (the trainer's loss.fused: false),
    with masks, padding ids, T != 1, and rows whose student tail underflows (recomputed through
    the fused path's own head). Both run the same per-row math: float32 rounding apart."""
    from longkd.kernels.reference import sparse_kl_reference

    N, d, V, K = 53, 64, 211, 9
    hidden, weight, bias, ids, tlp, mask = make_case(N, d, V, K, mode, seed=5 + MODES.index(mode))
    if mode == "bucket":
        # Rows 3 and 40: a hidden state orthogonal to every other row's, and the head's rows
        # for their teacher ids raised 150 along it, so only these rows' students put all but
        # ~e^-150 of their mass on K (below fp32's range: the tail is recomputed).
        gen = torch.Generator().manual_seed(40)
        for row in (3, 40):
            others = torch.cat([hidden[:row], hidden[row + 1 :]])
            basis = torch.linalg.svd(others.double(), full_matrices=True).Vh[others.shape[0] :]
            coef = torch.randn(basis.shape[0], generator=gen, dtype=torch.float64)
            u = (basis.t() @ coef).float()
            hidden[row] = u / u.norm()
            live = ids[row][ids[row] >= 0]
            weight[live] += 150.0 * hidden[row]
            mask[row] = True
        q = torch.softmax(F.linear(hidden, weight, bias).double() / temperature, -1)
        in_k = torch.zeros(N, V, dtype=torch.bool)
        rows, cols = (ids >= 0).nonzero(as_tuple=True)
        in_k[rows, ids[rows, cols]] = True
        off_k = (q * ~in_k).sum(1)  # the student's mass off K, summed explicitly
        assert (off_k[[3, 40]] < 1e-30).all() and (off_k[mask].sort().values[2] > 1e-3)
    outs = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        kw = dict(mode=mode, temperature=temperature, mask=mask, chunk_size=7)
        if fused:
            loss = fused_linear_sparse_kl(h, w, ids, tlp, bias=b, **kw)
        else:
            loss = sparse_kl_reference(F.linear(h, w, b), ids, tlp, **kw)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad, b.grad))
    for name, a, e in zip(("loss", "dX", "dW", "db"), *outs):
        scale = e.abs().max().item()
        torch.testing.assert_close(a, e, atol=1e-6 * scale, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_float64_is_computed_in_float64():
    from tests.kernels.test_reference import oracle

    N, d, V, K = 19, 7, 33, 5
    hidden, weight, bias, ids, tlp, mask = make_case(N, d, V, K, "bucket", seed=6, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    loss = fused_linear_sparse_kl(h, weight, ids, tlp, bias=bias, mask=mask, temperature=1.3, chunk_size=4)
    loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    want = oracle(F.linear(h2, weight, bias), ids, tlp, mode="bucket", temperature=1.3, mask=mask)
    want.backward()
    assert loss.dtype == torch.float64 and h.grad.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-12, rtol=1e-10)


def test_chunk_size_ids_and_targets_are_checked():
    hidden, weight, bias, ids, tlp, mask = make_case(6, 8, 20, 3, "bucket", seed=1)
    for bad in (0, -3, 2.5):
        with pytest.raises(LongkdError, match=r"chunk_size must be >= 1"):
            fused_linear_sparse_kl(hidden, weight, ids, tlp, chunk_size=bad)
        with pytest.raises(LongkdError, match=r"chunk_size must be >= 1"):
            fused_linear_losses(hidden, weight, targets=torch.zeros(6, dtype=torch.long), chunk_size=bad)
    with pytest.raises(LongkdError, match="ids reach 20 but the logits have V=20 columns"):
        fused_linear_sparse_kl(hidden, weight, ids.clamp_min(0).fill_(20), tlp)
    with pytest.raises(LongkdError, match=r"target 25 is outside the vocabulary \[0, 20\)"):
        fused_linear_losses(hidden, weight, targets=torch.full((6,), 25))
    with pytest.raises(LongkdError, match="give teacher ids and target_logprobs, next-token targets"):
        fused_linear_losses(hidden, weight)
    with pytest.raises(LongkdError, match="ce_weight must be >= 0"):
        fused_linear_losses(hidden, weight, targets=torch.zeros(6, dtype=torch.long), ce_weight=-1.0)
