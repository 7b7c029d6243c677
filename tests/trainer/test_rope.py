"""RoPE schedules and apply_rope on tiny real models.

After ``apply_rope`` the rotary module must hold exactly what transformers' own rope
initialisation computes for a freshly built config with those parameters, and a checkpoint
saved with ``save_pretrained`` must reload through ``AutoModelForCausalLM`` and give the same
logits beyond the original context.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longkd.errors import LongkdError
from longkd.models import build_tiny_model, tiny_config
from longkd.trainer.rope import (
    Phase,
    active_phase,
    apply_phase,
    apply_rope,
    build_schedule,
    check_schedule_against_cache,
    initial_rope,
    rotary_modules,
)
from longkd.trainer.rope_params import ROPE_TYPES

S = 32  # the tiny students' original context
LONG = 80  # a length beyond it


def fresh_reference(arch, params, max_pos, **cfg):
    """(inv_freq, attention_scaling) computed independently for a config built from scratch."""
    if arch == "phi3" and "original_max_position_embeddings" in params:
        # Phi-3 configs carry the pre-training length as a top-level attribute, which wins
        cfg["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    config = tiny_config(arch, max_position_embeddings=max_pos, rope_parameters=dict(params), **cfg)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        theta = config.rope_parameters["rope_theta"]
        head_dim = config.hidden_size // config.num_attention_heads
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


def scaled_schedule(rope_type, base_config, preset="phasewise"):
    return build_schedule(
        {
            "preset": preset,
            "windows": [S // 2, S, 2 * S, 4 * S],
            "until": [5, 10, 15, 20],
            "rope_type": rope_type,
        },
        base_config=base_config,
    )


CASES = [("llama", t, {}) for t in ROPE_TYPES] + [
    ("phi3", "longrope", {"partial_rotary_factor": 0.5}),
    ("phi3", "default", {"partial_rotary_factor": 0.5}),
    ("qwen2", "yarn", {}),
]


@pytest.mark.parametrize("arch,rope_type,cfg", CASES, ids=[f"{a}-{t}" for a, t, _ in CASES])
def test_apply_rope_matches_transformers_init_and_reloads(arch, rope_type, cfg, tmp_path):
    config = tiny_config(arch, vocab_size=64, hidden_size=64, max_position_embeddings=S, **cfg)
    model = build_tiny_model(config, seed=1)
    if rope_type == "default":
        # a change of theta: the one parameter the default rope has
        params = {"rope_type": "default", "rope_theta": 500.0}
        if "partial_rotary_factor" in cfg:
            params["partial_rotary_factor"] = cfg["partial_rotary_factor"]
        max_pos = S
    else:
        phase = scaled_schedule(rope_type, config)[-1]
        params, max_pos = phase.rope_parameters, phase.max_position_embeddings
        assert params["factor"] == 4.0
    before = [m for _, _, m in rotary_modules(model)]
    apply_rope(model, params, max_pos)
    after = rotary_modules(model)
    assert len(after) == len(before) >= 1
    assert all(new is not old for (_, _, new), old in zip(after, before))

    inv_ref, scale_ref = fresh_reference(arch, params, max_pos, vocab_size=64, hidden_size=64, **cfg)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == rope_type
    torch.testing.assert_close(rotary.inv_freq, inv_ref, rtol=0, atol=0)
    assert rotary.attention_scaling == pytest.approx(scale_ref, rel=1e-12)
    if rope_type not in ("default", "dynamic"):
        # the scaled rope really differs from the original one
        assert not torch.equal(rotary.inv_freq, before[0].inv_freq) or rotary.attention_scaling != 1.0
    assert model.config.max_position_embeddings == max_pos
    assert model.config.rope_parameters["rope_type"] == rope_type

    torch.manual_seed(0)
    ids = torch.randint(4, 64, (2, LONG))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters["rope_type"] == rope_type
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_apply_phase_restores_initial_rope():
    config = tiny_config("llama", vocab_size=64, max_position_embeddings=S)
    model = build_tiny_model(config)
    start = initial_rope(model.config)
    inv0 = model.model.rotary_emb.inv_freq.clone()
    torch.manual_seed(3)
    ids = torch.randint(4, 64, (1, 24))
    with torch.no_grad():
        logits0 = model(input_ids=ids).logits
    schedule = scaled_schedule("yarn", config)
    apply_phase(model, schedule[-1], start)
    assert not torch.equal(model.model.rotary_emb.inv_freq, inv0)
    apply_phase(model, schedule[0], start)  # factor 1: back to the initial rope
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv0, rtol=0, atol=0)
    assert model.model.rotary_emb.attention_scaling == 1.0
    assert model.config.max_position_embeddings == S
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits0, rtol=0, atol=0)


def test_apply_rope_keeps_dtype_and_every_rotary_module():
    config = tiny_config("gemma2", vocab_size=64, max_position_embeddings=S)
    model = build_tiny_model(config).to(torch.bfloat16)
    phase = scaled_schedule("linear", config)[-1]
    apply_rope(model, phase.rope_parameters, phase.max_position_embeddings)
    modules = rotary_modules(model)
    assert modules
    for _, _, module in modules:
        assert module.inv_freq.dtype == torch.bfloat16
        ref, _ = fresh_reference(
            "gemma2", phase.rope_parameters, phase.max_position_embeddings, vocab_size=64
        )
        torch.testing.assert_close(module.inv_freq, ref.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3", "longrope", "dynamic"])
def test_presets_give_documented_factors(rope_type):
    config = tiny_config("llama", max_position_embeddings=S)
    windows = [S // 2, S, 3 * S, 8 * S]
    spec = {"windows": windows, "until": [10, 20, 30, 40], "rope_type": rope_type}

    phasewise = build_schedule({"preset": "phasewise", **spec}, base_config=config)
    assert [p.window for p in phasewise] == windows
    assert [p.until for p in phasewise] == [10, 20, 30, 40]
    assert phasewise[0].rope_parameters is None and phasewise[1].rope_parameters is None
    assert [p.rope_parameters["factor"] for p in phasewise[2:]] == [3.0, 8.0]
    for p in phasewise[2:]:
        assert p.rope_parameters["rope_type"] == rope_type
        assert p.rope_parameters["rope_theta"] == 10000.0
        if rope_type in ("yarn", "llama3", "longrope"):
            assert p.rope_parameters["original_max_position_embeddings"] == S
        assert p.max_position_embeddings == (S if rope_type == "dynamic" else p.window)
    if rope_type == "llama3":
        assert phasewise[-1].rope_parameters["low_freq_factor"] == 1.0
        assert phasewise[-1].rope_parameters["high_freq_factor"] == 4.0
    if rope_type == "longrope":
        half = config.hidden_size // config.num_attention_heads // 2
        p = phasewise[-1].rope_parameters
        assert p["short_factor"] == [1.0] * half
        assert len(p["long_factor"]) == half
        assert p["long_factor"][0] == 1.0 and p["long_factor"][-1] == pytest.approx(8.0)
        assert all(a < b for a, b in zip(p["long_factor"], p["long_factor"][1:]))

    static = build_schedule({"preset": "static", **spec}, base_config=config)
    assert [p.window for p in static] == windows
    assert all(p.rope_parameters == static[-1].rope_parameters for p in static)
    assert static[0].rope_parameters["factor"] == 8.0

    none = build_schedule({"preset": "none", **spec}, base_config=config)
    assert [p.window for p in none] == windows
    assert all(p.rope_parameters is None and p.max_position_embeddings is None for p in none)


def test_preset_options_tokens_lr_extra_keys_and_total_steps():
    config = tiny_config("phi3", max_position_embeddings=S, partial_rotary_factor=0.5, rope_theta=5000.0)
    sched = build_schedule(
        {
            "preset": "phasewise",
            "windows": [S, 2 * S, 5 * S],
            "until": [1000, 3000],
            "rope_type": "longrope",
            "until_unit": "steps",
            "lr": [1e-3, 5e-4, 1e-4],
            "attention_factor": 1.25,
        },
        base_config=config,
        total_steps=50000,
    )
    assert [p.until for p in sched] == [1000, 3000, 50000]
    assert [p.lr for p in sched] == [1e-3, 5e-4, 1e-4]
    last = sched[-1].rope_parameters
    assert last["factor"] == 5.0 and last["attention_factor"] == 1.25
    assert last["rope_theta"] == 5000.0 and last["partial_rotary_factor"] == 0.5
    assert len(last["long_factor"]) == int(16 * 0.5) // 2

    by_tokens = build_schedule(
        {
            "preset": "static",
            "windows": [S, 2 * S],
            "until": [1000, 5000],
            "until_unit": "tokens",
            "original_window": 16,
            "rope_type": "linear",
        },
        base_config=tiny_config("llama", max_position_embeddings=S),
    )
    assert by_tokens[0].rope_parameters["factor"] == 4.0  # 64 / 16 from step 0
    assert [active_phase(by_tokens, step, t) for step, t in [(0, 0), (99, 999), (0, 1000), (0, 10**9)]] == [
        0,
        0,
        1,
        1,
    ]


def test_user_written_phases():
    config = tiny_config("llama", max_position_embeddings=S)
    sched = build_schedule(
        [
            {"until": 100, "window": S, "lr": 1e-3},
            {"until": 200, "window": 2 * S, "rope": {"rope_type": "yarn", "factor": 2, "beta_fast": 16}},
            {"window": 4 * S, "rope": {"type": "default", "rope_theta": 40000.0}, "name": "theta"},
        ],
        base_config=config,
        total_steps=300,
    )
    assert sched[0] == Phase("phase1-w32", 100, "steps", S, None, 1e-3, None)
    assert sched[1].rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 2,
        "original_max_position_embeddings": S,
        "beta_fast": 16,
    }
    assert sched[1].max_position_embeddings == 2 * S
    assert sched[2].name == "theta" and sched[2].until == 300
    assert sched[2].rope_parameters == {"rope_type": "default", "rope_theta": 40000.0}
    assert [active_phase(sched, s, 0) for s in (0, 99, 100, 199, 200, 299, 300, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        2,
        2,
    ]


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"preset": "phasewise", "windows": [64, 32], "until": [1, 2]}, "must not decrease"),
        ({"preset": "phasewise", "windows": [32, 64], "until": [2, 2]}, "must increase"),
        ({"preset": "phasewise", "windows": [32, 64], "until": [1]}, "total_steps"),
        ({"preset": "phasewise", "windows": [32, 64], "until": [1, 2, 3]}, "one per window"),
        ({"preset": "wild", "windows": [32], "until": [1]}, "unknown rope preset"),
        (
            {"preset": "static", "windows": [32, 128], "until": [1, 2], "rope_type": "ntk"},
            "unknown rope type",
        ),
        (
            {"preset": "static", "windows": [32, 128], "until": [1, 2], "rope_type": "yarn", "betafast": 3},
            "Unrecognized keys",
        ),
        ({"preset": "phasewise", "windows": [32, "x"], "until": [1, 2]}, "positive integer"),
        ([{"until": 5, "window": 32, "rope": {"rope_type": "linear", "factor": 0.5}}], "factor must be >= 1"),
        (
            [
                {
                    "until": 5,
                    "window": 32,
                    "rope": {"rope_type": "longrope", "factor": 2, "long_factor": [1.0]},
                }
            ],
            "long_factor",
        ),
        ([{"until": 5, "window": 32, "speed": 3}], "unknown keys"),
        ([{"until": 5, "window": 32}, {"until": 6, "window": 64, "until_unit": "tokens"}], "same unit"),
        ("phasewise", "preset dict or a list"),
    ],
)
def test_invalid_specs_raise(spec, match):
    config = tiny_config("llama", max_position_embeddings=S)
    with pytest.raises(LongkdError, match=match):
        build_schedule(spec, base_config=config)


def test_architecture_refuses_rope_type():
    config = tiny_config("phi3", max_position_embeddings=S, partial_rotary_factor=0.5)
    with pytest.raises(LongkdError, match="phi3"):
        build_schedule({"preset": "static", "windows": [S, 4 * S], "until": [1, 2]}, base_config=config)
    model = build_tiny_model(config)
    inv0 = model.model.rotary_emb.inv_freq.clone()
    params = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(LongkdError, match="linear"):
        apply_rope(model, params, 2 * S)
    # a refused rope leaves the model untouched
    assert model.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv0, rtol=0, atol=0)


def test_check_schedule_against_cache():
    config = tiny_config("llama", max_position_embeddings=S)
    sched = build_schedule(
        {"preset": "phasewise", "windows": [S, 4 * S], "until": [1, 2]}, base_config=config
    )
    check_schedule_against_cache(sched, 4 * S)
    with pytest.raises(LongkdError, match=f"window {4 * S}.*cache window is {3 * S}"):
        check_schedule_against_cache(sched, 3 * S)


def test_yarn_attention_scaling_grows_with_the_phase():
    config = tiny_config("llama", max_position_embeddings=S)
    sched = scaled_schedule("yarn", config)
    model = build_tiny_model(config)
    start = initial_rope(model.config)
    scales = []
    for phase in sched:
        apply_phase(model, phase, start)
        scales.append(model.model.rotary_emb.attention_scaling)
    factors = [max(1.0, p.window / S) for p in sched]
    assert scales == pytest.approx([1.0 if f == 1 else 0.1 * math.log(f) + 1.0 for f in factors])


def test_nested_rope_scales_global_layers_only(tmp_path):
    """Gemma-3-like configs keep one rope per layer type: the sliding layers stay as they were."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = AutoConfig.for_model("gemma3_text", max_position_embeddings=S, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    local_before = model.model.rotary_emb.sliding_attention_inv_freq.clone()
    phase = scaled_schedule("yarn", config)[-1]
    assert phase.rope_parameters["rope_theta"] == config.rope_parameters["full_attention"]["rope_theta"]
    apply_rope(model, phase.rope_parameters, phase.max_position_embeddings)
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, local_before, rtol=0, atol=0)
    fresh = AutoConfig.for_model(
        "gemma3_text",
        max_position_embeddings=phase.max_position_embeddings,
        rope_parameters={
            "sliding_attention": dict(config.rope_parameters["sliding_attention"]),
            "full_attention": dict(phase.rope_parameters),
        },
        **kwargs,
    )
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](fresh, torch.device("cpu"), layer_type="full_attention")
    torch.testing.assert_close(rotary.full_attention_inv_freq, inv, rtol=0, atol=0)
    assert rotary.full_attention_attention_scaling == pytest.approx(scale) and scale > 1
    ids = torch.randint(4, 64, (1, LONG))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
