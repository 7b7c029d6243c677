"""RoPE analyses: q/k position perturbation on tiny real models, and q/k drift per frequency pair."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch

from longkd.cli import main
from longkd.errors import LongkdError
from longkd.models import build_tiny_model, tiny_config
from longkd.tools import analyze


def _model(arch="llama", **overrides):
    # A larger init than the default 0.02 makes attention sharp, so a position shift is visible
    # in the output of a random model (with 0.02 the logits are nearly uniform).
    cfg = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, initializer_range=0.3)
    cfg.update(overrides)
    return build_tiny_model(tiny_config(arch, **cfg), seed=0)


ARCHS = [("llama", {}), ("qwen2", {"num_kv_heads": 2}), ("phi3", {"partial_rotary_factor": 0.5})]


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_delta_zero_changes_nothing_and_shifting_q_or_k_changes_something(arch, extra):
    model = _model(arch, **extra)
    rep = analyze.perturb(model, length=48, deltas=[0, 3, 40], windows=2, vocab=range(4, 64))
    assert rep["layers"] == 2 and rep["span"] == 24
    by = {(r["mode"], r["delta"]): r for r in rep["results"]}
    for mode in analyze.MODES:
        zero = by[(mode, 0)]
        assert zero["rel_change"] == [0.0, 0.0] and zero["kl"] == 0.0
        assert zero["accuracy"] == rep["baseline_accuracy"]
    for mode in ("q", "k"):
        for delta in (3, 40):
            r = by[(mode, delta)]
            assert min(r["rel_change"]) > 1e-2 and r["kl"] > 1e-3, (mode, delta, r)
    # Shifting q and k together leaves every q.k product as it was (RoPE is relative): a control.
    for delta in (3, 40):
        assert max(by[("both", delta)]["rel_change"]) < 1e-4 and by[("both", delta)]["kl"] < 1e-6


def test_shifting_both_equals_running_at_shifted_positions():
    model = _model()
    ids = torch.randint(4, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40).expand(2, 40)
    with torch.no_grad():
        with analyze.shifted_rope(model, pos, 17, "both") as state:
            shifted = model(input_ids=ids, position_ids=pos).logits
        reference = model(input_ids=ids, position_ids=pos + 17).logits
        plain = model(input_ids=ids, position_ids=pos).logits
    assert state["calls"] == 2
    torch.testing.assert_close(shifted, reference, rtol=0, atol=1e-6)
    # A query-only shift by d is not a position change of the whole sequence.
    with torch.no_grad(), analyze.shifted_rope(model, pos, 17, "q"):
        q_only = model(input_ids=ids, position_ids=pos).logits
    assert (q_only - plain).abs().max() > 1e-2


def test_patch_is_removed_even_on_error():
    model = _model()
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    pos = torch.arange(8)[None]
    with pytest.raises(RuntimeError, match="boom"):
        with analyze.shifted_rope(model, pos, 2, "k"):
            assert module.apply_rotary_pos_emb is not original
            raise RuntimeError("boom")
    assert module.apply_rotary_pos_emb is original


def test_unsupported_models_and_bad_input():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    )
    with pytest.raises(LongkdError, match="Llama-family"):
        analyze.perturb(gpt2, length=16, deltas=[1], windows=1)
    model = _model()
    with pytest.raises(LongkdError, match="unknown"):
        analyze.perturb(model, length=16, modes=["v"], windows=1)
    with pytest.raises(LongkdError, match="repeats"):
        analyze.perturb(model, length=16, repeats=1)
    with pytest.raises(LongkdError, match="non-negative"):
        analyze.perturb(model, length=16, deltas=[-1])


def test_repeated_windows():
    w = analyze.repeated_windows(3, 20, 2, range(10, 20), seed=4)
    assert w.shape == (3, 20) and w.min() >= 10 and w.max() < 20
    assert torch.equal(w[:, :10], w[:, 10:])
    w = analyze.repeated_windows(2, 31, 3, 50, seed=4)  # span 10, three copies, one extra token
    assert (
        torch.equal(w[:, :10], w[:, 10:20])
        and torch.equal(w[:, :10], w[:, 20:30])
        and torch.equal(w[:, 30], w[:, 0])
    )
    assert torch.equal(w, analyze.repeated_windows(2, 31, 3, 50, seed=4))


def _pair_rows(head: int, pair: int, head_dim: int, rotary_dim: int) -> list[int]:
    return [head * head_dim + pair, head * head_dim + pair + rotary_dim // 2]


@pytest.mark.parametrize(
    "arch,extra", [("llama", {"num_kv_heads": 2}), ("qwen2", {}), ("phi3", {"partial_rotary_factor": 0.5})]
)
def test_qdrift_lights_exactly_the_changed_pair(arch, extra):
    before = _model(arch, num_layers=3, hidden_size=64, **extra)
    rep = analyze.qdrift(before, before)
    assert all(x == 0.0 for key in ("q", "k") for row in rep[key] for x in row)

    after = copy.deepcopy(before)
    layer, pair, scale = 1, 3, 1.5
    cfg = before.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotary_dim = rep["rotary_dim"]
    assert rotary_dim == (head_dim // 2 if arch == "phi3" else head_dim)
    attn = after.model.layers[layer].self_attn
    with torch.no_grad():
        if arch == "phi3":  # fused [q; k; v] rows
            nq = cfg.num_attention_heads * head_dim
            q_rows = [
                r for h in range(cfg.num_attention_heads) for r in _pair_rows(h, pair, head_dim, rotary_dim)
            ]
            k_rows = [
                nq + r
                for h in range(cfg.num_key_value_heads)
                for r in _pair_rows(h, pair, head_dim, rotary_dim)
            ]
            attn.qkv_proj.weight[q_rows + k_rows] *= scale
        else:
            for proj, heads in (
                (attn.q_proj, cfg.num_attention_heads),
                (attn.k_proj, cfg.num_key_value_heads),
            ):
                rows = [r for h in range(heads) for r in _pair_rows(h, pair, head_dim, rotary_dim)]
                proj.weight[rows] *= scale
                if proj.bias is not None:
                    proj.bias[rows] *= scale
    rep = analyze.qdrift(before, after)
    for key in ("q", "k"):
        for l, row in enumerate(rep[key]):
            for i, x in enumerate(row):
                if (l, i) == (layer, pair):
                    assert x == pytest.approx(scale - 1, rel=1e-5)  # rows scaled by 1.5: relative change 0.5
                else:
                    assert x == 0.0, (key, l, i, x)


def test_qdrift_single_head_and_marked_pair():
    before = _model(hidden_size=64, max_position_embeddings=512, rope_theta=10000.0)
    after = copy.deepcopy(before)
    head_dim = 16
    with torch.no_grad():  # only head 2, pair 5 of layer 0's q_proj: the head average is 1/4 of it
        after.model.layers[0].self_attn.q_proj.weight[_pair_rows(2, 5, head_dim, head_dim)] += 0.1
    rep = analyze.qdrift(before, after)
    w = before.model.layers[0].self_attn.q_proj.weight[_pair_rows(2, 5, head_dim, head_dim)].detach()
    expected = 0.1 * math.sqrt(w.numel()) / float(w.norm()) / 4
    assert rep["q"][0][5] == pytest.approx(expected, rel=1e-5)
    assert sum(x > 0 for row in rep["q"] for x in row) == 1 and all(x == 0 for row in rep["k"] for x in row)
    # Wavelengths 2*pi*10000^(2i/16); the one nearest 512 on a log scale.
    wl = [2 * math.pi * 10000 ** (2 * i / head_dim) for i in range(head_dim // 2)]
    assert rep["wavelength"] == pytest.approx(wl, rel=1e-5)
    assert rep["train_length"] == 512
    assert rep["marked_pair"] == min(range(len(wl)), key=lambda i: abs(math.log(wl[i] / 512)))
    assert analyze.qdrift(before, after, train_length=20)["marked_pair"] == 1  # 2*pi*10000^(1/8) ~ 19.9


def test_qdrift_rejects_different_shapes():
    with pytest.raises(LongkdError, match="layers"):
        analyze.qdrift(_model(), _model(num_layers=3))


@pytest.mark.slow
def test_cli_writes_tables_and_plots(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    model = _model(hidden_size=64, max_position_embeddings=256)
    model.save_pretrained(a)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[_pair_rows(0, 6, 16, 16)] *= 2
    model.save_pretrained(b)
    out = tmp_path / "qd"
    assert main(["analyze", "qdrift", str(a), str(b), "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["marked_pair"] is not None and rep["k"][1][6] > 0 and sum(map(sum, rep["k"])) == rep["k"][1][6]
    assert json.loads((out / "qdrift.json").read_text())["k"] == rep["k"]
    assert (out / "qdrift.png").stat().st_size > 10_000 and "| layer |" in (out / "qdrift.md").read_text()

    out = tmp_path / "pt"
    assert main(["analyze", "perturb", str(a), "--length", "32", "--windows", "1", "--deltas", "0,4",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "| q | 4 |" in capsys.readouterr().out
    rep = json.loads((out / "perturb.json").read_text())
    assert rep["deltas"] == [0, 4] and len(rep["results"]) == 6
    assert (out / "perturb.png").stat().st_size > 10_000
    assert main(["analyze", "qdrift", str(a), str(tmp_path / "missing")]) == 2
