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
from longkd.kernels.fused_linear import fused_linear_sparse_kl
from tests.helpers import reduce_rows

MODES = ("bucket", "renorm", "sampled")


def dense_oracle(logits, ids, tlp, *, mode, temperature=1.0, mask=None, reduction="mean"):
    """Per-row sparse KL written plainly over the full vocabulary (fp32, autograd-friendly).

    bucket: sum_K p log(p/q) + r log(r / (1 - Q)); renorm/sampled: KL(p/P || q) over K.
    """
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = (ids >= 0) & torch.isfinite(tlp)
    t = torch.where(valid, tlp, torch.zeros_like(tlp))  # finite everywhere: no NaN gradients
    p = torch.where(valid, t.exp(), torch.zeros_like(t))
    logq_k = logq.gather(1, ids.clamp_min(0))
    P = p.sum(1)
    if mode == "bucket":
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
