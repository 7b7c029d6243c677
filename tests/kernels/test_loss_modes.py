"""The loss-mode table (kernels/loss_modes.py) against the CUDA source, a dense oracle and its readers.

The table's per-row quantities in the kernel's form (the tail mass r, the dense multiplier a,
the target scale c) are assembled into a gradient the way sparse_kl.cu assembles it and checked
against autograd through a plain full-vocabulary loss; the reference's log form of c is checked
against the kernel's. The modes' codes are read back from sparse_kl.cu, and each public loss
call is checked to validate its arguments exactly once.
"""

from __future__ import annotations

import re

import pytest
import torch

from longkd.errors import LongkdError
from longkd.kernels import validation
from longkd.kernels.cupy_kl import SOURCE_PATH
from longkd.kernels.fused_linear import fused_linear_sparse_kl
from longkd.kernels.loss_modes import MODE_NAMES, MODES, loss_mode
from longkd.kernels.reference import sparse_kl_reference
from longkd.kernels.sparse_kl import sparse_kl
from longkd.trainer.config import LOSS_MODES
from tests.kernels.test_fused_linear import dense_oracle, make_targets


def table_gradient(logits, ids, tlp, spec, temperature):
    """T-scaled gradient of the summed row losses, built from the table as sparse_kl.cu does:
    q * a everywhere, then (q_i - c p_i) on the row's K entries; a = c = 0 zeroes the row."""
    z = logits.double() / temperature
    q = torch.softmax(z, dim=1)  # [N, V]
    valid = ids >= 0
    idx = ids.clamp_min(0)
    q_k = torch.where(valid, q.gather(1, idx), 0)
    live = valid & (tlp > float("-inf"))
    p = torch.where(live, tlp.double().exp(), 0)
    P, Q = p.sum(1), q_k.sum(1)
    a, c = spec.dense_multiplier(P, Q), spec.target_scale(P)
    fix = torch.where(valid, q_k - c[:, None] * p - q_k * a[:, None], 0)
    grad = (q * a[:, None]).scatter_add(1, idx, fix)
    trains = (a != 0) | (c != 0)
    return torch.where(trains[:, None], grad, 0) / temperature


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_kernel_quantities_give_the_oracle_gradient(mode, temperature):
    gen = torch.Generator().manual_seed(101 * MODES[mode].code + int(10 * temperature))
    N, V, K = 29, 83, 7
    logits = torch.randn(N, V, generator=gen) * 2.5
    ids, tlp = make_targets(N, V, K, mode, gen)
    ids[0], tlp[0] = -1, float("-inf")  # only padding
    tlp[1] = float("-inf")  # real ids, no target mass
    leaf = logits.clone().requires_grad_(True)
    rows = dense_oracle(leaf, ids, tlp, mode=mode, temperature=temperature, reduction="none")
    rows.sum().backward()
    got = table_gradient(logits, ids, tlp, MODES[mode], temperature)
    torch.testing.assert_close(got.float(), leaf.grad, atol=1e-6, rtol=1e-5)
    assert got[2:].abs().sum() > 0  # the rows with targets do train


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_log_target_scale_is_the_kernels_scale_in_log_space(mode):
    gen = torch.Generator().manual_seed(7 + MODES[mode].code)
    P = torch.rand(50, generator=gen, dtype=torch.float64) * 0.999 + 1e-3
    spec = MODES[mode]
    torch.testing.assert_close(spec.log_target_scale(P.log()).exp(), spec.target_scale(P))
    assert spec.tail_mass(P).shape == P.shape
    assert bool((spec.tail_mass(P) > 0).all()) == spec.keeps_tail


def test_codes_are_the_ones_sparse_kl_cu_reads():
    source = SOURCE_PATH.read_text()
    contract = re.search(r"//\s+mode\s+(.+)", source).group(1)
    assert {name: int(code) for code, name in re.findall(r"(\d+) (\w+)", contract)} == {
        spec.name: spec.code for spec in MODES.values()
    }
    # The kernel branches on one code, the tail-keeping one; every other code renormalises.
    branched = {int(code) for code in re.findall(r"mode == (\d+)", source)}
    assert branched == {spec.code for spec in MODES.values() if spec.keeps_tail}


def test_every_reader_lists_the_table():
    assert LOSS_MODES == MODE_NAMES == tuple(MODES)
    assert all(MODES[name].name == name for name in MODES)
    assert len({spec.code for spec in MODES.values()}) == len(MODES)
    assert loss_mode("sampled") is MODES["sampled"]
    expected = f"^fused_linear_sparse_kl: unknown mode .*; use one of {', '.join(MODE_NAMES)}$"
    for bad in ("full", ["bucket"], None):
        with pytest.raises(LongkdError, match=expected):
            loss_mode(bad, "fused_linear_sparse_kl")


def test_each_public_call_validates_once(monkeypatch):
    calls = []
    check = validation._check_targets

    def counted(*args, **kwargs):
        calls.append(kwargs["name"])
        check(*args, **kwargs)

    monkeypatch.setattr(validation, "_check_targets", counted)
    gen = torch.Generator().manual_seed(3)
    N, d, V, K = 12, 6, 31, 4
    hidden = torch.randn(N, d, generator=gen).requires_grad_(True)
    weight = torch.randn(V, d, generator=gen)
    ids, tlp = make_targets(N, V, K, "renorm", gen)
    logits = (hidden @ weight.t()).detach()
    kw = dict(mode="renorm", chunk_size=5)
    for run in (
        lambda: sparse_kl(logits, ids, tlp, **kw),
        lambda: sparse_kl_reference(logits, ids, tlp, **kw),
        lambda: fused_linear_sparse_kl(hidden, weight, ids, tlp, **kw).backward(),
        lambda: fused_linear_sparse_kl(hidden, weight, ids, tlp, reduction="none", **kw).sum().backward(),
    ):
        calls.clear()
        run()
        assert len(calls) == 1, calls
