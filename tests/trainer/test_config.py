"""The run config: defaults, one-line errors naming the key, overrides, YAML and TOML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longkd.errors import LongkdError
from longkd.trainer.config import apply_override, load_config, parse_config, read_config_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.yaml"


def minimal(**top):
    data = {
        "cache": "runs/cache",
        "out": "runs/train",
        "students": [
            {"name": "a", "init": {"arch": "llama", "hidden_size": 32}},
            {"name": "b", "init": "some/model/dir", "loss": {"mode": "renorm"}},
        ],
    }
    data.update(top)
    return data


def error_of(data) -> str:
    with pytest.raises(LongkdError) as info:
        parse_config(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_and_coercions():
    cfg = parse_config(minimal())
    assert cfg.cache == ["runs/cache"]  # a single cache becomes a list of one
    assert (cfg.seed, cfg.steps, cfg.batch_size, cfg.grad_accum) == (0, None, 8, 1)
    assert cfg.precision == "auto" and cfg.device == "auto" and cfg.keep_checkpoints == 3
    a, b = cfg.students
    assert a.loss.mode is None and a.loss.kd_weight == 1.0 and a.loss.ce_weight == 0.0
    assert b.loss.mode == "renorm"
    assert a.optimizer.betas == (0.9, 0.95) and a.optimizer.lr_schedule == "cosine"
    cfg = parse_config(
        minimal(students=[{"name": "x", "init": "d", "optimizer": {"lr": 1, "betas": [0.8, 0.9]}}])
    )
    opt = cfg.students[0].optimizer
    assert isinstance(opt.lr, float) and opt.lr == 1.0 and opt.betas == (0.8, 0.9)
    assert cfg.student("x").name == "x"


def test_bad_choice_names_the_key():
    data = minimal()
    data["students"][1]["loss"]["mode"] = "bukcet"
    assert error_of(data) == "students[1].loss.mode: 'bukcet' is not one of bucket, renorm, sampled"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(bach_size=4), "config: unknown key 'bach_size'"),
        (lambda d: d["students"][0].update(optimiser={}), "students[0]: unknown key 'optimiser'"),
        (
            lambda d: d["students"][1]["loss"].update(temprature=2),
            "students[1].loss: unknown key 'temprature'",
        ),
        (lambda d: d.update(batch_size="8"), "batch_size: expected an integer, got '8'"),
        (lambda d: d.update(batch_size=0), "batch_size: must be >= 1, got 0"),
        (lambda d: d.update(steps=True), "steps: expected"),
        (lambda d: d.update(precision="fp8"), "precision: 'fp8' is not one of auto, fp32, bf16"),
        (lambda d: d["students"][0].update(optimizer={"lr": -1}), "students[0].optimizer.lr: must be > 0.0"),
        (lambda d: d["students"][0].update(optimizer={"betas": [0.9]}), "students[0].optimizer.betas"),
        (lambda d: d["students"][0].update(optimizer={"betas": [0.9, 1.5]}), "students[0].optimizer.betas"),
        (
            lambda d: d["students"][0].update(optimizer={"lr_schedule": "step"}),
            "students[0].optimizer.lr_schedule",
        ),
        (lambda d: d["students"][0].update(loss={"impl": "triton"}), "students[0].loss.impl: 'triton'"),
        (lambda d: d["students"][0].update(loss={"kd_weight": 0}), "kd_weight and ce_weight are both 0"),
        (
            lambda d: d["students"][0].update(init={"arch": "gpt9"}),
            "students[0].init.arch: 'gpt9' is not one of",
        ),
        (lambda d: d["students"][1].update(name="a"), "students[1].name: 'a' is used twice"),
        (lambda d: d["students"][1].update(name="a/b"), "students[1].name: 'a/b' must be"),
        (lambda d: d["students"][0].pop("init"), "students[0]: missing required key 'init'"),
        (lambda d: d.pop("out"), "config: missing required key 'out'"),
        (lambda d: d.update(students=[]), "students: give at least one student"),
        (lambda d: d.update(loader={"prefetch_factor": 0}), "loader.prefetch_factor: must be >= 1"),
        (
            lambda d: d["students"][0].update(schedule="phasewise"),
            "students[0].schedule: expected dict or list",
        ),
    ],
)
def test_invalid_values_name_their_key(edit, expected):
    data = minimal()
    edit(data)
    assert expected in error_of(data)


def test_overrides_by_index_and_by_name():
    data = minimal()
    apply_override(data, "students.0.loss.mode=renorm")
    apply_override(data, "students[1].optimizer.lr=1e-3")
    apply_override(data, "students.b.loss.ce_weight=0.5")
    apply_override(data, "steps=12")
    apply_override(data, "loader.num_workers=2")
    cfg = parse_config(data)
    assert cfg.students[0].loss.mode == "renorm"
    assert cfg.students[1].optimizer.lr == 1e-3 and cfg.students[1].loss.ce_weight == 0.5
    assert cfg.steps == 12 and cfg.loader.num_workers == 2
    bad_overrides = [
        ("steps", "expected key.path=value"),
        ("students.c.seed=1", "no item named 'c'"),
        ("students.5.seed=1", "index 5 out of range"),
        ("out.x=1", "is not a mapping"),
    ]
    for bad, msg in bad_overrides:
        with pytest.raises(LongkdError, match=msg):
            apply_override(minimal(), bad)


def test_yaml_and_toml_files(tmp_path):
    data = minimal(steps=5)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    toml = """
cache = ["runs/cache"]
out = "runs/train"
steps = 5
[[students]]
name = "a"
init = "model"
[students.optimizer]
lr = 0.001
"""
    (tmp_path / "run.toml").write_text(toml)
    assert load_config(tmp_path / "run.yaml").steps == 5
    cfg = load_config(tmp_path / "run.toml", overrides=["students.a.optimizer.warmup_steps=3"])
    assert cfg.students[0].optimizer.lr == 0.001 and cfg.students[0].optimizer.warmup_steps == 3


def test_unreadable_files(tmp_path):
    with pytest.raises(LongkdError, match="config file .*missing.yaml not found"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("cache: [unclosed\n")
    with pytest.raises(LongkdError, match="bad.yaml could not be parsed"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LongkdError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.yaml")


def test_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert [s.name for s in cfg.students] == ["phasewise", "static"]
    assert cfg.students[0].schedule["preset"] == "phasewise"
    assert cfg.students[1].schedule["preset"] == "static"


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    text = "cache: c\nout: o\nstudents:\n  - {name: a, init: m, optimizer: {lr: 1e-3}}\n"
    (tmp_path / "run.yaml").write_text(text)
    assert load_config(tmp_path / "run.yaml").students[0].optimizer.lr == 1e-3
    data = minimal()
    data["students"][0]["optimizer"] = {"lr": "fast"}
    assert "students[0].optimizer.lr: expected a number, got 'fast'" in error_of(data)
