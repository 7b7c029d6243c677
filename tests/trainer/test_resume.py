"""Checkpoints and --resume: a run stopped (or SIGKILLed) and resumed ends bitwise equal to an
uninterrupted one on CPU, and half-written or uncommitted checkpoints are never resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from longkd.cli import main
from longkd.errors import LongkdError
from longkd.trainer import checkpoint as ckpt
from longkd.trainer.config import parse_config
from longkd.trainer.loop import train
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_random_text(root / "train.jsonl", samples=80, vocab=VOCAB, lengths=(5, 40), seed=0)
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256)
    flags = {"window": W, "top_k": 8, "max_windows": 24, "batch_size": 8}
    return build_cache(teacher, data, root / "cache", **flags)


def run_config(cache, out, **top):
    # student a: dropout (its RNG must be restored), a phase switch after the resume point,
    # per-phase LR; student b: plain, with CE. Grad accumulation and a stream that wraps
    # its 24 windows (6 steps x 2 x 3 windows = 36) exercise the reader state.
    a = {
        "name": "a",
        "init": {
            "arch": "llama",
            "hidden_size": 32,
            "num_heads": 2,
            "seed": 1,
            "attention_dropout": 0.1,
            "max_position_embeddings": 16,
        },
        "schedule": {"preset": "phasewise", "windows": [16, 32], "until": [4, 6], "rope_type": "yarn"},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2, "per_phase": True},
    }
    b = {
        "name": "b",
        "init": {"arch": "qwen2", "hidden_size": 32, "num_heads": 2, "seed": 2},
        "loss": {"ce_weight": 0.5},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.1},
    }
    data = {
        "cache": str(cache),
        "out": str(out),
        "steps": 6,
        "batch_size": 3,
        "grad_accum": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 2,
        "students": [a, b],
    }
    data.update(top)
    return data


def final_state(out: Path, name: str, step: int):
    path = out / name / "checkpoints" / ckpt.step_name(step)
    model, optim, state, reader = ckpt.load_student_checkpoint(path)
    return model, optim, state


def assert_same_run(x: Path, y: Path, step: int):
    for name in ("a", "b"):
        mx, ox, sx = final_state(x, name, step)
        my, oy, sy = final_state(y, name, step)
        assert mx.keys() == my.keys()
        for k in mx:
            assert torch.equal(mx[k], my[k]), (name, k)
        assert ckpt.same_state(ox["state"], oy["state"])
        assert torch.equal(sx["rng"]["cpu"], sy["rng"]["cpu"])
        cx = {k: v for k, v in sx["counters"].items() if k != "time"}
        cy = {k: v for k, v in sy["counters"].items() if k != "time"}
        assert cx == cy
        mets = []
        for root in (x, y):
            lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            mets.append([{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines])
        assert mets[0] == mets[1] and [m["step"] for m in mets[0]] == list(range(1, step + 1))


def test_stop_and_resume_equals_uninterrupted(cache, tmp_path):
    full = tmp_path / "full"
    train(parse_config(run_config(cache, full)), progress=False)
    part = tmp_path / "part"
    stopped = train(parse_config(run_config(cache, part)), progress=False, stop_after=3)
    assert stopped.steps == 3
    assert ckpt.run_state_steps(part) == [2, 3]  # checkpoint_every=2, and one where it stopped
    resumed = train(parse_config(run_config(cache, part)), resume=True, progress=False)
    assert resumed.steps == 6
    assert_same_run(full, part, 6)
    # keep_checkpoints=2: only the two newest remain, and the pointer names the newest
    assert ckpt.checkpoint_steps(part / "a" / "checkpoints") == [4, 6]
    assert (part / "a" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    cfg = json.loads((part / "a" / "checkpoints" / "step-0000006" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn"


def test_uncommitted_and_partial_checkpoints_are_ignored(cache, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(parse_config(run_config(cache, full, steps=4)), progress=False)
    train(parse_config(run_config(cache, part, steps=4)), progress=False, stop_after=2)
    # a kill while step 4 was being saved: student a finished, b left a temp dir, the run
    # state was never committed
    a_root = part / "a" / "checkpoints"
    (a_root / "step-0000004").mkdir()
    (a_root / "step-0000004" / "junk").write_text("x")
    (part / "b" / "checkpoints" / ".tmp-step-0000004").mkdir()
    assert ckpt.resume_step(part, ["a", "b"]) == 2
    train(parse_config(run_config(cache, part, steps=4)), resume=True, progress=False)
    assert not (a_root / "step-0000004" / "junk").exists()
    assert_same_run(full, part, 4)


def test_resume_errors(cache, tmp_path):
    with pytest.raises(LongkdError, match="nothing was committed in .*start the run without --resume"):
        train(parse_config(run_config(cache, tmp_path / "empty")), resume=True, progress=False)
    out = tmp_path / "run"
    train(parse_config(run_config(cache, out, steps=4)), progress=False, stop_after=2)
    data = run_config(cache, out, steps=4)
    data["students"].append({"name": "c", "init": {"arch": "llama", "hidden_size": 32, "num_heads": 2}})
    with pytest.raises(LongkdError, match="student 'c' has no checkpoint"):
        train(parse_config(data), resume=True, progress=False)
    with pytest.raises(LongkdError, match="--resume: seed was 0 at step 2 and is 5 now"):
        train(parse_config(run_config(cache, out, steps=4, seed=5)), resume=True, progress=False)


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(cache, tmp_path):
    """The real command, killed with SIGKILL after its third committed checkpoint."""
    steps = 24
    full = tmp_path / "full"
    train(
        parse_config(run_config(cache, full, steps=steps, checkpoint_every=1, keep_checkpoints=3)),
        progress=False,
    )
    out = tmp_path / "killed"
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(run_config(cache, out, steps=steps, checkpoint_every=1, keep_checkpoints=3))
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "longkd", "train", str(path), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    try:
        while len(ckpt.run_state_steps(out)) < 3 or max(ckpt.run_state_steps(out)) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(ckpt.run_state_steps(out))
    assert killed_at < steps, "the run finished before the kill; make it longer"
    assert main(["train", str(path), "--resume", "--no-progress"]) == 0
    assert_same_run(full, out, steps)
