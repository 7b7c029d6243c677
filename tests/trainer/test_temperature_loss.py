"""The trainer's loss at a student temperature: T^2 scaling and re-tempered teacher entries.

``loss.t2_scaling`` multiplies the KL by T^2 in one place (trainer/losses.py, ``LossTerms.of``),
so every path gets it identically: the loss and every gradient must be exactly T^2 times
those without it (T = 2: a power of two, so exact in floating point) through the materialised
torch reference, the fused LM-head path, and the CUDA kernel executed on the CPU
(kernels/host, where it is available). At T != T_c the KL must equal the KL against the cached
entries re-tempered by hand, p^(T_c / T) renormalised over K.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from longkd.kernels.reference import sparse_kl_reference
from longkd.models import build_tiny_model, tiny_config
from longkd.trainer.config import LossConfig, parse_config
from longkd.trainer.losses import LossTerms, head_losses
from longkd.trainer.stream import WindowBatch

B, P, K, VOCAB, HIDDEN = 2, 12, 6, 64, 16


def model_and_batch(seed: int, cache_temperature: float):
    """A tiny student and a hand-made batch whose teacher rows are a random model's top-K at T_c."""
    config = tiny_config("llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=2)
    model = build_tiny_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, P, VOCAB, generator=gen) * 3.0
    tlp, ids = torch.log_softmax(teacher / cache_temperature, -1).topk(K, dim=-1)
    batch = WindowBatch(
        input_ids=torch.randint(0, VOCAB, (B, P), generator=gen),
        position_ids=torch.arange(P).expand(B, P).clone(),
        lengths=torch.tensor([P, P - 3]),
        segment_starts=torch.tensor([[0, 5], [0, -1]]),
        ids=ids,
        teacher_logprobs=tlp,
        next_token_logprob=torch.zeros(B, P),
        window_ids=torch.arange(B),
    )
    hidden = torch.randn(B, P, HIDDEN, generator=gen)
    return model, batch, hidden


def loss_and_grads(model, batch, hidden, loss_cfg, *, mode, temperature, cache_temperature, fused):
    """(loss, KL, d loss / d hidden, d loss / d head weight) through ``head_losses``."""
    terms = LossTerms.of(
        batch, loss_cfg, mode=mode, temperature=temperature, amp=None, fused=fused,
        cache_temperature=cache_temperature,
    )  # fmt: skip
    model.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_(True)
    loss, kl, _ = head_losses(model, h, terms)
    loss.backward()
    return loss.detach(), kl, h.grad, model.get_output_embeddings().weight.grad.clone()


def host_execution():
    """kernels/host's CPU execution of the CUDA kernel, or a skip where it is not in the tree."""
    host = pytest.importorskip("longkd.kernels.host.cupy_host", reason="no kernels/host in this tree")
    if shutil.which("g++") is None:
        pytest.skip("the host kernel build needs g++")
    return host.use_host_execution()


PATHS = [("materialised", False, "reference"), ("fused", True, "reference")]
KERNEL_PATHS = [("materialised kernel", False, "cupy"), ("fused kernel", True, "cupy")]


def check_t2(fused, impl, mode, cache_t, T):
    model, batch, hidden = model_and_batch(3, cache_t)
    got = {}
    for on in (False, True):
        cfg = LossConfig(mode=mode, temperature=T, kd_weight=0.7, ce_weight=0.0, impl=impl, t2_scaling=on)
        got[on] = loss_and_grads(
            model, batch, hidden, cfg, mode=mode, temperature=T, cache_temperature=cache_t, fused=fused
        )
    (loss0, kl0, dh0, dw0), (loss1, kl1, dh1, dw1) = got[False], got[True]
    assert torch.equal(kl0, kl1)  # the logged KL is the KL itself
    assert float(loss0) > 0 and dh0.abs().max() > 0
    assert torch.equal(loss1, T * T * loss0)
    assert torch.equal(dh1, T * T * dh0) and torch.equal(dw1, T * T * dw0)


@pytest.mark.parametrize(("mode", "cache_t"), [("bucket", 2.0), ("renorm", 1.0)])
@pytest.mark.parametrize(("name", "fused", "impl"), PATHS, ids=[p[0] for p in PATHS])
def test_t2_scaling_multiplies_loss_and_gradients_by_exactly_t2(name, fused, impl, mode, cache_t):
    check_t2(fused, impl, mode, cache_t, T=2.0)


@pytest.mark.parametrize(("name", "fused", "impl"), KERNEL_PATHS, ids=[p[0] for p in KERNEL_PATHS])
def test_t2_scaling_through_the_kernel_on_the_cpu(name, fused, impl):
    with host_execution() as host:
        launches = host.launches
        check_t2(fused, impl, "bucket", 2.0, T=2.0)
        assert host.launches > launches  # the kernel computed the KL


def test_t2_scaling_is_approximately_t2_at_other_temperatures():
    """T = 1.5 (T^2 = 2.25 is not a power of two: equal to float rounding), with a CE term
    that the factor must leave alone."""
    model, batch, hidden = model_and_batch(4, 1.5)
    out = {}
    for on in (False, True):
        cfg = LossConfig(temperature=1.5, kd_weight=1.0, ce_weight=0.3, t2_scaling=on)
        out[on] = loss_and_grads(
            model, batch, hidden, cfg, mode="bucket", temperature=1.5, cache_temperature=1.5, fused=True
        )
    kl = out[False][1]
    torch.testing.assert_close(out[True][0] - out[False][0], (2.25 - 1) * kl, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
def test_retempered_kl_equals_the_kl_against_hand_retempered_entries(fused):
    cache_t, T = 1.0, 2.0
    model, batch, hidden = model_and_batch(5, cache_t)
    cfg = LossConfig(mode="renorm", temperature=T, t2_scaling=False)
    _, kl, _, _ = loss_and_grads(
        model, batch, hidden, cfg, mode="renorm", temperature=T, cache_temperature=cache_t, fused=fused
    )
    # by hand, in float64: p^(T_c / T) renormalised over K
    ids = batch.ids.reshape(B * P, K)
    p = batch.teacher_logprobs.reshape(B * P, K).double().exp().pow(cache_t / T)
    tlp = (p / p.sum(1, keepdim=True)).log().float()
    mask = batch.loss_mask().reshape(-1)
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden).reshape(B * P, VOCAB)
    want = sparse_kl_reference(logits, ids, tlp, mode="renorm", temperature=T, mask=mask)
    torch.testing.assert_close(kl, want, rtol=1e-6, atol=1e-7)
    # and not the KL against the entries as cached (what tempering the student alone gave)
    stale = sparse_kl_reference(logits, ids, batch.teacher_logprobs.reshape(B * P, K), mode="renorm",
                                temperature=T, mask=mask)  # fmt: skip
    assert abs(float(stale) - float(kl)) > 0.05


def test_config_key_and_default():
    data = {"cache": "c", "out": "o", "students": [{"name": "a", "init": "m"}]}
    assert parse_config(data).students[0].loss.t2_scaling is True
    data["students"][0]["loss"] = {"t2_scaling": False}
    assert parse_config(data).students[0].loss.t2_scaling is False
    data["students"][0]["loss"] = {"t2_scaling": "yes"}
    with pytest.raises(Exception, match=r"students\[0\].loss.t2_scaling: expected true or false"):
        parse_config(data)
