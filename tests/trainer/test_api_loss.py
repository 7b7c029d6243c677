"""The public loss API (trainer/loss_api.py): the function, the module and the fused variant.

On fresh random [B, P, V] logits and top-k or sampled targets, the loss is compared with the
dense float64 oracle of tests/kernels/test_reference.py plus ``F.cross_entropy`` in float64,
with masks from ``labels`` and given explicitly; the fused variant with the unfused loss on the
same head (value and gradients); bad shapes and options give one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longkd.errors import LongkdError
from longkd.trainer.loss_api import SparseKLLoss, fused_sparse_kl_loss, sparse_kl_loss
from tests.helpers import reduce_rows
from tests.kernels.test_reference import make_targets, oracle_rows

B, P, V, K = 3, 7, 50, 6


def batch(mode, gen, *, drop=0.3):
    """Random logits [B, P, V], teacher entries [B, P, K'], labels [B, P] with -100 holes."""
    logits = torch.randn(B, P, V, generator=gen, dtype=torch.float64) * 2
    ids, tlp = make_targets(B * P, V, K, mode, gen)
    labels = torch.randint(0, V, (B, P), generator=gen)
    labels[torch.rand(B, P, generator=gen) < drop] = -100
    return logits.float(), ids.view(B, P, -1), tlp.view(B, P, -1), labels


def expected(logits, ids, tlp, labels, mask, *, mode, temperature, kd_weight, ce_weight):
    """kd_weight * mean sparse KL + ce_weight * mean CE over the mask, in float64."""
    rows = oracle_rows(
        logits.reshape(B * P, V),
        ids.reshape(B * P, -1),
        tlp.reshape(B * P, -1),
        mode=mode,
        temperature=temperature,
    )
    kl = reduce_rows(rows, mask.reshape(-1))
    targets = labels.reshape(-1).masked_fill(~mask.reshape(-1), -100)
    ce = F.cross_entropy(logits.reshape(B * P, V).double(), targets, ignore_index=-100) if mask.any() else 0.0
    return kd_weight * kl + ce_weight * ce


@pytest.mark.parametrize("mode", ["bucket", "renorm", "sampled"])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.7, 0.4), (0.0, 1.0)])
def test_function_and_module_match_the_oracle(mode, weights):
    gen = torch.Generator().manual_seed(torch.seed())
    logits, ids, tlp, labels = batch(mode, gen)
    kd, ce = weights
    temperature = 1.5
    want = expected(
        logits,
        ids,
        tlp,
        labels,
        labels != -100,
        mode=mode,
        temperature=temperature,
        kd_weight=kd * temperature**2,  # T^2 scaling, on by default as in longkd train
        ce_weight=ce,
    )
    got = sparse_kl_loss(
        logits, ids, tlp, labels, mode=mode, temperature=temperature, kd_weight=kd, ce_weight=ce
    )
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    module = SparseKLLoss(mode=mode, temperature=temperature, kd_weight=kd, ce_weight=ce)
    assert torch.equal(module(logits, ids, tlp, labels), got)
    assert f"mode={mode!r}" in repr(module)


@pytest.mark.parametrize("mode", ["renorm", "sampled"])
def test_other_temperature_retempers_the_teacher_as_the_trainer_does(mode):
    """At T != T_c the stored entries are re-tempered within K (p^(T_c/T), renormalised) and
    the KL takes T^2, exactly as longkd train's loss terms; bucket mode refuses it."""
    gen = torch.Generator().manual_seed(torch.seed())
    logits, ids, tlp, labels = batch(mode, gen)
    cache_t, T = 1.0, 2.0
    p = tlp.double().exp().pow(cache_t / T).masked_fill(ids < 0, 0.0)
    retempered = (p / p.sum(-1, keepdim=True)).log().float()
    mask = labels != -100
    want = expected(
        logits, ids, retempered, labels, mask, mode=mode, temperature=T, kd_weight=T**2, ce_weight=0
    )
    got = sparse_kl_loss(logits, ids, tlp, labels, mode=mode, temperature=T, cache_temperature=cache_t)
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    unscaled = sparse_kl_loss(
        logits, ids, tlp, labels, mode=mode, temperature=T, cache_temperature=cache_t, t2_scaling=False
    )
    assert float(got) == pytest.approx(float(unscaled) * T**2, rel=1e-6)
    with pytest.raises(LongkdError):
        sparse_kl_loss(logits, ids, tlp, labels, mode="bucket", temperature=T, cache_temperature=cache_t)


def test_explicit_mask_and_no_labels():
    gen = torch.Generator().manual_seed(torch.seed())
    logits, ids, tlp, labels = batch("bucket", gen)
    mask = torch.rand(B, P, generator=gen) < 0.5
    want = expected(
        logits, ids, tlp, labels, mask, mode="bucket", temperature=1.0, kd_weight=1.0, ce_weight=0.5
    )
    got = sparse_kl_loss(logits, ids, tlp, labels, mask=mask, ce_weight=0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    everything = torch.ones(B, P, dtype=torch.bool)
    want = expected(
        logits, ids, tlp, labels, everything, mode="bucket", temperature=1.0, kd_weight=1, ce_weight=0
    )
    assert float(sparse_kl_loss(logits, ids, tlp)) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_gradient_flows_to_the_logits():
    gen = torch.Generator().manual_seed(torch.seed())
    logits, ids, tlp, labels = batch("bucket", gen)
    leaf = logits.clone().requires_grad_(True)
    sparse_kl_loss(leaf, ids, tlp, labels, ce_weight=0.3).backward()
    ref = logits.double().clone().requires_grad_(True)
    expected(
        ref, ids, tlp, labels, labels != -100, mode="bucket", temperature=1.0, kd_weight=1.0, ce_weight=0.3
    ).backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)
    assert not leaf.grad[labels == -100].any()  # untrained rows get no gradient


def test_fused_equals_unfused_on_the_same_head():
    gen = torch.Generator().manual_seed(torch.seed())
    d = 16
    hidden = torch.randn(B, P, d, generator=gen, requires_grad=True)
    head = torch.nn.Linear(d, V, bias=True)
    _, ids, tlp, labels = batch("bucket", gen)
    cap = 3.0
    fused = fused_sparse_kl_loss(
        hidden,
        head.weight,
        ids,
        tlp,
        labels,
        head_bias=head.bias,
        temperature=1.3,
        chunk_size=5,
        logit_postprocess=lambda z: cap * torch.tanh(z / cap),
    )
    grads = torch.autograd.grad(fused, [hidden, head.weight, head.bias])
    plain = sparse_kl_loss(cap * torch.tanh(head(hidden) / cap), ids, tlp, labels, temperature=1.3)
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight, head.bias])
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6, abs=1e-7)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_one_line():
    gen = torch.Generator().manual_seed(0)
    logits, ids, tlp, labels = batch("bucket", gen)
    cases = [
        (lambda: sparse_kl_loss(logits, ids[:, :-1], tlp, labels), "teacher_ids must have shape"),
        (lambda: sparse_kl_loss(logits, ids, tlp, labels[:, :-1]), "labels must have shape"),
        (lambda: sparse_kl_loss(logits, ids, tlp, ce_weight=1.0), "needs labels"),
        (lambda: sparse_kl_loss(logits, ids, tlp, labels, kd_weight=-1.0), ">= 0"),
        (lambda: sparse_kl_loss(logits[0, 0], ids, tlp), "logits must be"),
        (lambda: sparse_kl_loss(logits, ids, tlp, labels, mode="nope"), "mode"),
        (lambda: fused_sparse_kl_loss(logits, torch.randn(V, 3), ids, tlp, labels), "fused_linear_sparse_kl"),
    ]
    for call, words in cases:
        with pytest.raises(LongkdError, match=words) as err:
            call()
        assert "\n" not in str(err.value)
