"""`longkd train` end to end on caches built by the real `longkd cache build` from a tiny teacher.

The loss the loop trains on is checked against a direct computation from the model's own
forward; distillation must lower KL(teacher || student) on held-out windows; two students
trained together must equal each trained alone bitwise; a phase switch must leave a
checkpoint whose config carries the phase's rope; bad inputs fail with one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from longkd.cli import main
from longkd.errors import LongkdError
from longkd.trainer.config import OptimizerConfig, parse_config
from longkd.trainer.loop import prepare, train
from longkd.trainer.losses import batch_losses
from longkd.trainer.lr_schedule import lr_at
from longkd.trainer.rope import Phase
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32


def write_data(path: Path, n: int, seed: int) -> Path:
    return write_random_text(path, samples=n, vocab=VOCAB, lengths=(5, 40), seed=seed)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama teacher whose attention outputs are zeroed.

    Its next-token distribution is then a fixed nonlinear function of the current token (peaked:
    about 2 nats of entropy out of log 64 = 4.2, from the larger init scale), which a tiny
    student can learn in a few dozen steps. With live random attention the teacher is chaotic
    in its context and a CPU-sized run cannot show learning on held-out windows.
    """
    from longkd.models import build_tiny_model, tiny_config
    from longkd.tools.random_models import build_word_tokenizer

    config = tiny_config(
        "llama", vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256, initializer_range=0.3
    )
    model = build_tiny_model(config, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("o_proj.weight"):
                p.zero_()
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    build_word_tokenizer(VOCAB).save_pretrained(out)
    return out


def make_cache(teacher_dir, data, out, windows, *selection) -> Path:
    selection = selection or ("--top-k", "8")
    return build_cache(teacher_dir, data, out, *selection, window=W, max_windows=windows, batch_size=8)


@pytest.fixture(scope="module")
def caches(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    train_cache = make_cache(teacher_dir, write_data(root / "train.jsonl", 300, 0), root / "train", 96)
    heldout = make_cache(teacher_dir, write_data(root / "heldout.jsonl", 40, 1), root / "heldout", 12)
    return {"train": train_cache, "heldout": heldout}


def student(name="s", seed=1, **init):
    base = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "seed": seed}
    base.update(init)
    return {"name": name, "init": base, "optimizer": {"lr": 3e-3, "warmup_steps": 0}}


def config(cache, out, students, **top):
    data = {"cache": str(cache), "out": str(out), "steps": 4, "batch_size": 4, "students": students}
    data.update(top)
    return data


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- units


def test_lr_schedule_warmup_cosine_and_per_phase():
    opt = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    phase = Phase("p", until=100, until_unit="steps", window=8, rope_parameters=None)
    kw = dict(tokens=0, total_steps=100, phase_start_step=0, phase_start_tokens=0)
    assert [lr_at(opt, phase, step=s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in (10, 50, 99):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 100))
        assert lr_at(opt, phase, step=s, **kw) == pytest.approx(want)
    assert lr_at(opt, phase, step=150, **kw) == pytest.approx(0.1)  # past the end: the floor
    const = OptimizerConfig(lr=2.0, lr_schedule="constant")
    assert lr_at(const, phase, step=70, **kw) == 2.0
    # per phase: warmup and cosine restart where the phase began, phase lr overrides
    second = Phase("q", until=60, until_unit="steps", window=8, rope_parameters=None, lr=0.5)
    pp = OptimizerConfig(lr=1.0, warmup_steps=2, per_phase=True, min_lr_ratio=0.0)
    kw = dict(tokens=0, total_steps=100, phase_start_step=20, phase_start_tokens=0)
    assert lr_at(pp, second, step=20, **kw) == 0.25
    assert lr_at(pp, second, step=40, **kw) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    tok = Phase("t", until=1000, until_unit="tokens", window=8, rope_parameters=None)
    kw = dict(total_steps=100, phase_start_step=5, phase_start_tokens=200)
    assert lr_at(pp, tok, step=50, tokens=600, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def bucket_kl_direct(logits, ids, logprobs, mask, temperature):
    """KL(teacher top-k + tail bucket || student) per row, float64, from the full softmax."""
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    valid = ids >= 0
    lq = torch.gather(logq, 1, ids.clamp(min=0))
    p = torch.where(valid, logprobs.double().exp(), torch.zeros_like(lq))
    terms = torch.where(valid & (p > 0), p * (logprobs.double() - lq), torch.zeros_like(lq)).sum(-1)
    r = (1 - p.sum(-1)).clamp(min=0)
    qk = torch.where(valid, lq.exp(), torch.zeros_like(lq)).sum(-1)
    tail = torch.where(r > 0, r * (torch.log(r) - torch.log1p(-qk)), torch.zeros_like(r))
    rows = terms + tail
    return rows[mask].mean()


def renorm_kl_direct(logits, ids, logprobs, mask, temperature, cache_temperature):
    """KL(teacher renormalised over K || student) per row, float64, the teacher's cached entries
    re-tempered by hand from T_c to T (p^(T_c / T) renormalised over K)."""
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    valid = ids >= 0
    lq = torch.gather(logq, 1, ids.clamp(min=0))
    p = torch.where(valid, logprobs.double().exp() ** (cache_temperature / temperature), torch.zeros_like(lq))
    p = p / p.sum(-1, keepdim=True)
    rows = torch.where(p > 0, p * (p.log() - lq), torch.zeros_like(lq)).sum(-1)
    return rows[mask].mean()


@pytest.mark.parametrize("t2_scaling", [True, False])
def test_loss_equals_direct_computation(caches, tmp_path, t2_scaling):
    """At T = 1.5 on a cache built at T_c = 1, renorm: the teacher re-tempered, the KL times T^2
    under t2_scaling."""
    s = student(seed=3)
    s["loss"] = {
        "mode": "renorm", "kd_weight": 0.7, "ce_weight": 0.3, "skip_first_tokens": 2, "temperature": 1.5,
        "t2_scaling": t2_scaling,
    }  # fmt: skip
    run = prepare(parse_config(config(caches["train"], tmp_path / "run", [s])))
    st = run.students[0]
    assert run.stream.temperature == 1.0 and run.temperatures["s"] == 1.5
    batch = next(iter(run.stream)).prefix(20)
    loss, kl, ce, n = batch_losses(st, batch, mode="renorm", temperature=1.5, amp=None, cache_temperature=1.0)
    st.model.eval()  # no dropout in this model; eval to compare against a plain forward
    with torch.no_grad():
        logits = st.model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    b, p = batch.input_ids.shape
    mask = torch.zeros(b, p, dtype=torch.bool)
    for i in range(b):
        length = int(batch.lengths[i])
        mask[i, : length - 1] = True
        for start in batch.segment_starts[i].tolist():
            if start >= 0:
                mask[i, start : start + 2] = False  # skip_first_tokens=2 at every packed sample
    flat = logits.reshape(b * p, -1)
    ids, cached = batch.ids.reshape(b * p, -1), batch.teacher_logprobs.reshape(b * p, -1)
    want_kl = renorm_kl_direct(flat, ids, cached, mask.reshape(-1), 1.5, 1.0)
    targets = torch.cat([batch.input_ids[:, 1:], torch.zeros(b, 1, dtype=torch.long)], 1).reshape(-1)
    want_ce = F.cross_entropy(flat.double()[mask.reshape(-1)], targets[mask.reshape(-1)])
    assert n == int(mask.sum()) and 0 < n < b * p
    assert float(kl) == pytest.approx(float(want_kl), rel=1e-5)
    assert float(ce) == pytest.approx(float(want_ce), rel=1e-5)
    kd_weight = 0.7 * (1.5**2 if t2_scaling else 1.0)
    assert float(loss.detach()) == pytest.approx(kd_weight * float(want_kl) + 0.3 * float(want_ce), rel=1e-5)
    assert loss.requires_grad


# ----------------------------------------------------------------------------- training


def heldout_kl(model, cache) -> float:
    """Mean bucket KL over every row of every window of ``cache`` (teacher || student)."""
    from longkd.cache.reader import CacheReader

    reader = CacheReader(str(cache))
    model.eval()
    total, rows = 0.0, 0
    with torch.no_grad():
        for i in range(reader.num_windows):
            w = reader.read_window(i)
            ids = torch.from_numpy(w.input_ids.astype(np.int64))[None]
            pos = torch.from_numpy(w.position_ids)[None]
            logits = model(input_ids=ids, position_ids=pos).logits[0]
            mask = torch.arange(W) < w.length - 1
            kl = bucket_kl_direct(
                logits, torch.from_numpy(w.ids.astype(np.int64)), torch.from_numpy(w.logprobs), mask, 1.0
            )
            total += float(kl) * int(mask.sum())
            rows += int(mask.sum())
    model.train()
    return total / rows


def test_distillation_lowers_heldout_kl(caches, tmp_path):
    s = student(seed=5)
    s["optimizer"]["lr"] = 1e-2
    cfg = config(caches["train"], tmp_path / "run", [s], steps=40, batch_size=4)
    run = prepare(parse_config(cfg))
    before = heldout_kl(run.students[0].model, caches["heldout"])
    from longkd.trainer.loop import run_loop

    result = run_loop(run, progress=False)
    after = heldout_kl(result.students[0].model, caches["heldout"])
    assert after < 0.7 * before, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert set(lines[0]) >= {"step", "phase", "window", "lr", "loss", "kl", "ce", "tokens", "tokens_per_s"}
    assert lines[-1]["kl"] < lines[0]["kl"]
    assert lines[-1]["tokens"] == sum(4 * (W - 0) for _ in range(40))  # no padded windows: 4 x W per step
    assert any((tmp_path / "run" / "s" / "tb").glob("events.out.tfevents.*"))


def test_two_students_together_equal_each_alone(caches, tmp_path):
    # student a has attention dropout: its randomness must come from its own RNG only
    a = student("a", seed=1, attention_dropout=0.2)
    a["seed"] = 11
    b = student("b", seed=2)
    b["schedule"] = {
        "preset": "phasewise",
        "windows": [16, 32],
        "until": [2, 3],
        "rope_type": "linear",
        "original_window": 16,
    }
    b["optimizer"]["per_phase"] = True
    common = dict(steps=3, grad_accum=2)
    both = train(parse_config(config(caches["train"], tmp_path / "both", [a, b], **common)), progress=False)
    alone_a = train(parse_config(config(caches["train"], tmp_path / "a", [a], **common)), progress=False)
    alone_b = train(parse_config(config(caches["train"], tmp_path / "b", [b], **common)), progress=False)
    assert_bitwise_equal(weights(both.students[0].model), weights(alone_a.students[0].model))
    assert_bitwise_equal(weights(both.students[1].model), weights(alone_b.students[0].model))
    # and the dropout really draws random numbers: without it student a ends elsewhere
    a_nodrop = student("a", seed=1)
    a_nodrop["seed"] = 11
    plain = train(
        parse_config(config(caches["train"], tmp_path / "plain", [a_nodrop], **common)), progress=False
    )
    wa, wp = weights(alone_a.students[0].model), weights(plain.students[0].model)
    assert any(not torch.equal(wa[k], wp[k]) for k in wa)


def test_phase_switch_checkpoint_carries_rope_and_reloads(caches, tmp_path):
    from transformers import AutoModelForCausalLM

    s = student("grow", seed=4, max_position_embeddings=16)
    s["schedule"] = {"preset": "phasewise", "windows": [16, 32], "until": [2, 4], "rope_type": "yarn"}
    cfg = config(caches["train"], tmp_path / "run", [s], checkpoint_every=2)
    result = train(parse_config(cfg), progress=False)
    root = tmp_path / "run" / "grow" / "checkpoints"
    first = json.loads((root / "step-0000002" / "config.json").read_text())
    last = json.loads((root / "step-0000004" / "config.json").read_text())
    assert first["rope_parameters"]["rope_type"] == "default" and first["max_position_embeddings"] == 16
    assert last["rope_parameters"]["rope_type"] == "yarn" and last["rope_parameters"]["factor"] == 2.0
    assert last["rope_parameters"]["original_max_position_embeddings"] == 16
    assert last["max_position_embeddings"] == 32
    assert (root / "latest").read_text().strip() == "step-0000004"
    state = json.loads((root / "step-0000004" / "trainer_state.json").read_text())
    assert (state["step"], state["phase"], state["window"]) == (4, 1, 32)
    reloaded = AutoModelForCausalLM.from_pretrained(root / "step-0000004").eval()
    model = result.students[0].model.eval()
    ids = torch.randint(4, VOCAB, (2, W), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the scaling is really in force: the original rope gives other logits at 32 positions
    original = AutoModelForCausalLM.from_pretrained(root / "step-0000002").eval()
    original.load_state_dict(reloaded.state_dict())
    with torch.no_grad():
        assert not torch.allclose(original(input_ids=ids).logits, want, atol=1e-4)


# ----------------------------------------------------------------------------- command line


def cli(tmp_path, data, *args, capsys) -> tuple[int, str, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["train", str(path), "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_and_prints_a_summary(caches, tmp_path, capsys):
    data = config(caches["train"], tmp_path / "ignored", [student("x"), student("y", seed=2)], steps=50)
    code, out, err = cli(
        tmp_path,
        data,
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "students.y.loss.ce_weight=0.5",
        "--set",
        "students.y.loss={mode: renorm, temperature: 2, t2_scaling: false, ce_weight: 0.5}",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert code == 0, err
    assert "trained 2 student(s) to step 2" in out
    lines = out.splitlines()
    # the temperatures in force, one line per student, before the first step
    assert lines[:2] == [
        "x: cache T_c=1, student T=1 (teacher as cached), T^2 scaling on (KL x 1)",
        "y: cache T_c=1, student T=2 (teacher re-tempered within its top entries), T^2 scaling off",
    ]
    table = lines[2:]
    assert table[1].split()[:3] == ["student", "steps", "tokens"]
    assert [line.split()[0] for line in table[3:5]] == ["x", "y"]
    assert not (tmp_path / "ignored").exists()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["students"][1]["loss"]["ce_weight"] == 0.5
    for name in ("x", "y"):
        assert len((tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()) == 2
    # a second run into the same directory must not silently overwrite it
    code, out, err = cli(tmp_path, data, "--steps", "2", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "already holds checkpoints; pass --resume" in err


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d, c: d.update(cache=str(c.parent / "nope")), "nope"),
        (lambda d, c: d["students"][0]["init"].update(vocab_size=40), "smaller than the cache's tokenizer"),
        (
            lambda d, c: d["students"][0].update(schedule={"preset": "none", "windows": [64], "until": [4]}),
            "wants window 64 but the cache window is 32",
        ),
        (
            lambda d, c: d["students"][0].update(
                schedule=[{"until": 4, "window": 32, "rope": {"rope_type": "ntk", "factor": 2}}]
            ),
            "unknown rope type 'ntk'",
        ),
        (lambda d, c: d["students"][0]["loss"].update(mode="sampled"), "needs a sampled cache"),
        (
            lambda d, c: d["students"][0]["loss"].update(temperature=2.0),
            "students[0] (s).loss: mode 'bucket' at temperature 2 needs the teacher's tail mass at T=2, "
            "which a cache built at T=1 does not hold; use mode renorm",
        ),
        (lambda d, c: d["students"][0].update(init=str(c.parent / "no-model")), "could not be loaded"),
        (lambda d, c: d["students"][0]["optimizer"].update(lr_schedule="linear"), "is not one of cosine"),
    ],
)
def test_setup_errors_are_one_line(caches, tmp_path, capsys, edit, expected):
    s = student()
    s["loss"] = {}
    data = config(caches["train"], tmp_path / "run", [s])
    edit(data, caches["train"])
    code, out, err = cli(tmp_path, data, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longkd: error: ") and expected in lines[0], err
    assert not (tmp_path / "run" / "s" / "checkpoints").exists()


def test_unreadable_config_names_the_key(caches, tmp_path, capsys):
    data = config(caches["train"], tmp_path / "run", [student()])
    data["students"][0]["loss"] = {"mode": "bukcet"}
    code, _, err = cli(tmp_path, data, capsys=capsys)
    assert code == 2 and "students[0].loss.mode: 'bukcet' is not one of bucket, renorm, sampled" in err
    (tmp_path / "broken.yaml").write_text("cache: [\n")
    assert main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml could not be parsed" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(caches, tmp_path):
    good, bad = student("good", seed=1), student("bad", seed=2)
    bad["optimizer"] = {"lr": 1e30, "clip_grad_norm": None, "lr_schedule": "constant"}
    cfg = parse_config(config(caches["train"], tmp_path / "run", [good, bad], steps=6, checkpoint_every=1))
    with pytest.raises(LongkdError) as info:
        train(cfg, progress=False)
    message = str(info.value)
    assert message.startswith("student 'bad': ") and "at step 2" in message, message
    assert "step-0000001" in message
    for name in ("good", "bad"):
        root = tmp_path / "run" / name / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    # and an inf injected into a weight is caught the same way, before any update
    run = prepare(parse_config(config(caches["train"], tmp_path / "run2", [student()])))
    batch = next(iter(run.stream))
    with torch.no_grad():
        run.students[0].model.lm_head.weight[5, 0] = float("inf")
    from longkd.trainer.students import train_step

    before = weights(run.students[0].model)
    with pytest.raises(LongkdError, match="student 's': loss is nan at step 1"):
        train_step(run.students[0], [batch], total_steps=4, mode="bucket", temperature=1.0, amp=None)
    after = weights(run.students[0].model)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "lm_head.weight")


def test_nan_under_compile_with_a_pinned_cpu_capability_names_it(tmp_path, monkeypatch):
    from longkd.trainer.students import _nan_error

    student = SimpleNamespace(name="s", out_dir=tmp_path, cfg=SimpleNamespace(compile=True), device="cpu")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert "ATEN_CPU_CAPABILITY" not in str(_nan_error(student, 1, "loss is nan"))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    message = str(_nan_error(student, 1, "loss is nan"))
    assert "unset ATEN_CPU_CAPABILITY (now avx2) or set compile: false" in message
    student.cfg.compile = False
    assert "ATEN_CPU_CAPABILITY" not in str(_nan_error(student, 1, "loss is nan"))


def test_activation_checkpointing_and_bf16_autocast(caches, tmp_path):
    """Recomputing activations changes nothing on CPU; bf16 autocast trains close to fp32."""
    plain, ac = student("p", seed=6), student("p", seed=6)
    ac["activation_checkpointing"] = True
    runs = {}
    for tag, s, precision in (("fp32", plain, "fp32"), ("ac", ac, "fp32"), ("bf16", plain, "bf16")):
        cfg = config(caches["train"], tmp_path / tag, [s], steps=3, precision=precision)
        runs[tag] = train(parse_config(cfg), progress=False).students[0]
    model = runs["ac"].model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    w32, wac, w16 = (weights(runs[t].model) for t in ("fp32", "ac", "bf16"))
    for k in w32:
        torch.testing.assert_close(wac[k], w32[k], rtol=0, atol=1e-6)
        assert w16[k].dtype == torch.float32  # master weights stay fp32 under autocast
    assert runs["bf16"].last.kl == pytest.approx(runs["fp32"].last.kl, rel=0.05)
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # autocast really ran in bf16


def test_sampled_cache_trains_with_the_sampled_loss(teacher_dir, tmp_path):
    cache = make_cache(
        teacher_dir, write_data(tmp_path / "d.jsonl", 40, 2), tmp_path / "c", 8, "--sample-draws", "16"
    )
    s = student()
    s["loss"] = {}
    run = prepare(parse_config(config(cache, tmp_path / "run", [s], steps=3)))
    assert run.modes == {"s": "sampled"}  # the default for a sampled cache
    from longkd.trainer.loop import run_loop

    result = run_loop(run, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(m["kl"]) and m["kl"] > 0 for m in lines)
    assert result.students[0].step == 3


@pytest.mark.slow
# torch's own compile stack still calls its deprecated torch.jit.script_method internally.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_student_trains_like_eager(caches, tmp_path):
    """``compile: true`` changes how the decoder runs, not what it computes.

    One student (same init seed, cache and steps) is trained eagerly and with its decoder under
    ``torch.compile``. A phasewise schedule switches the rope after step 1, so the compiled
    decoder must also pick up the rebuilt rotary module (a recompile, not a stale graph).
    """
    from torch._dynamo.utils import counters

    def spec(compiled: bool) -> dict:
        s = student("c", seed=7, max_position_embeddings=16)
        s["schedule"] = {"preset": "phasewise", "windows": [16, 32], "until": [1, 2], "rope_type": "linear"}
        s["compile"] = compiled
        return s

    start = prepare(parse_config(config(caches["train"], tmp_path / "init", [spec(False)])))
    init = weights(start.students[0].model)
    runs = {}
    for tag, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()  # a fresh compile, and counters that count this run only
        counters.clear()
        cfg = config(caches["train"], tmp_path / tag, [spec(compiled)], steps=2)
        result = train(parse_config(cfg), progress=False)
        lines = [json.loads(x) for x in (tmp_path / tag / "c" / "metrics.jsonl").read_text().splitlines()]
        runs[tag] = (weights(result.students[0].model), lines, counters["stats"]["unique_graphs"])
    (eager, eager_lines, eager_graphs), (comp, comp_lines, comp_graphs) = runs["eager"], runs["compiled"]
    # the compiled run really ran dynamo graphs, and again after the rope switch
    assert eager_graphs == 0 and comp_graphs >= 2, (eager_graphs, comp_graphs)
    assert [m["window"] for m in comp_lines] == [m["window"] for m in eager_lines] == [16, 32]
    # Inductor fuses and reorders fp32 reductions, so results may differ at rounding level
    # (~1e-7 relative; measured: losses equal, weight gaps <= 6e-7). Step losses: rel 1e-5.
    for e, c in zip(eager_lines, comp_lines):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5) and c["kl"] == pytest.approx(e["kl"], rel=1e-5)
    # Weights: AdamW divides each gradient element by its own running size, so a rounding
    # difference can flip the step of an element whose gradient is itself at rounding level
    # (by up to 2 x lr), hence a norm bound rather than an elementwise one. The gap per tensor
    # must stay below 1e-3 of the tensor's whole update (measured ~5e-6); a stale rope or a
    # lost gradient moves every element by O(lr) and gives a ratio near 1.
    for k in eager:
        update, gap = (eager[k] - init[k]).norm(), (comp[k] - eager[k]).norm()
        assert update > 0, k
        assert gap <= 1e-3 * update, (k, float(gap), float(update))
