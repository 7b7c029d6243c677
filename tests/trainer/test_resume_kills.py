"""A training run killed at any write point of its checkpoint writer resumes to the weights of
an uninterrupted run, with ``keep_checkpoints: 1`` (the tightest case: one step kept).

The write points are enumerated from a real run (tests/faults.py), not listed by hand, so a
new write in trainer/checkpoint.py or trainer/loop.py is covered as soon as it exists. Each
kill is a real SIGKILL of a forked child at that point; the resume runs here and must end
bitwise equal (CPU) to the uninterrupted run, with no temporary file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from longkd.errors import LongkdError
from longkd.trainer import checkpoint as ckpt
from longkd.trainer.config import parse_config
from longkd.trainer.loop import train
from tests.faults import kill_at, leftovers, write_points
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32
STEPS = 3


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """fsync guards against power cuts; a killed process loses nothing the kernel holds, and
    skipping it halves the time of these runs."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A cache, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("kills")
    data = write_random_text(root / "train.jsonl", samples=60, vocab=VOCAB, lengths=(5, 40), seed=None)
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256)
    cache = build_cache(teacher, data, root / "cache", window=W, top_k=8, max_windows=12, batch_size=4)
    reference = root / "reference"
    train(parse_config(config(cache, reference)), progress=False)
    return cache, reference


def config(cache, out) -> dict:
    """Two students (one with dropout and a phase switch), a checkpoint every step, one kept."""
    a = {
        "name": "a",
        "init": {"arch": "llama", "hidden_size": 32, "num_heads": 2, "seed": 1, "attention_dropout": 0.1},
        "schedule": {"preset": "phasewise", "windows": [16, 32], "until": [2, 3], "rope_type": "linear"},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
    }
    b = {"name": "b", "init": {"arch": "qwen2", "hidden_size": 32, "num_heads": 2, "seed": 2}}
    return {
        "cache": str(cache), "out": str(out), "steps": STEPS, "batch_size": 3, "checkpoint_every": 1,
        "keep_checkpoints": 1, "students": [a, b],
    }  # fmt: skip


def run(cache, out, resume=False):
    return lambda: train(parse_config(config(cache, out)), resume=resume, progress=False)


def assert_same_as(reference: Path, out: Path) -> None:
    """The final checkpoints (weights, AdamW state, RNG, counters) and the metrics are equal."""
    for name in ("a", "b"):
        assert ckpt.checkpoint_steps(out / name / "checkpoints") == [STEPS]
        path = ckpt.step_name(STEPS)
        got = ckpt.load_student_checkpoint(out / name / "checkpoints" / path)
        want = ckpt.load_student_checkpoint(reference / name / "checkpoints" / path)
        assert got[0].keys() == want[0].keys()
        assert all(torch.equal(got[0][k], want[0][k]) for k in got[0]), name
        assert ckpt.same_state(got[1], want[1]), name
        assert torch.equal(got[2]["rng"]["cpu"], want[2]["rng"]["cpu"])

        assert metrics(out / name) == metrics(reference / name)
    assert ckpt.run_state_steps(out) == [STEPS]
    assert leftovers(out) == []


def metrics(student_dir: Path) -> list[dict]:
    lines = (student_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]


def test_every_write_point_of_a_checkpoint_resumes(setup, tmp_path):
    cache, reference = setup
    points = write_points(run(cache, tmp_path / "record"), tmp_path / "record")
    # the save of step 2: both students' checkpoints, the run state, and the pruning of step 1
    start = [i for i, p in enumerate(points) if p.path.endswith("step-0000002")][0]
    end = [i for i, p in enumerate(points) if p.path.endswith("step-0000003")][0]
    chosen = points[start:end]
    labels = {p.label for p in chosen}
    assert {"dir-filled", "dir-swapped", "file-written", "removed"} <= labels, labels
    assert any(p.path.endswith(f"run_state/{ckpt.step_name(2)}.state") for p in chosen)
    for point in chosen:
        out = tmp_path / f"killed-{point.index}"
        kill_at(run(cache, out), point, out)
        committed = ckpt.committed_step(out, ["a", "b"])
        assert committed in (1, 2), point
        run(cache, out, resume=True)()
        assert_same_as(reference, out)


def test_every_write_point_of_a_resume_resumes(setup, tmp_path):
    """The resume's own writes (pointers reset, metrics cut, config.json, temporaries removed)."""
    cache, reference = setup
    out = tmp_path / "base"
    # a run killed between student a's step-2 checkpoint and the run state: uncommitted work to undo
    points = write_points(run(cache, tmp_path / "record"), tmp_path / "record")
    b_step_2 = "b/checkpoints/step-0000002"
    between = next(p for p in points if p.label == "dir-swapped" and p.path.endswith(b_step_2))
    kill_at(run(cache, out), between, out)
    assert ckpt.checkpoint_steps(out / "a" / "checkpoints") == [1, 2] and ckpt.run_state_steps(out) == [1]
    snapshot = tmp_path / "snapshot"
    shutil.copytree(out, snapshot)
    record = tmp_path / "record-resume"
    shutil.copytree(snapshot, record)
    points = write_points(run(cache, record, resume=True), record)
    first_save = next(i for i, p in enumerate(points) if p.label == "dir-filled")
    assert first_save >= 3, points[:first_save]
    for point in points[:first_save]:
        killed = tmp_path / f"resume-killed-{point.index}"
        shutil.copytree(snapshot, killed)
        kill_at(run(cache, killed, resume=True), point, killed)
        run(cache, killed, resume=True)()
        assert_same_as(reference, killed)


def test_a_kill_before_the_first_commit_restarts(setup, tmp_path):
    """Killed between the first student checkpoint and the first run state: --resume says to
    start afresh, and the fresh start (same command without --resume) is accepted."""
    cache, reference = setup
    points = write_points(run(cache, tmp_path / "record"), tmp_path / "record")
    point = next(p for p in points if p.label == "dir-swapped")
    out = tmp_path / "killed"
    kill_at(run(cache, out), point, out)
    assert ckpt.checkpoint_steps(out / "a" / "checkpoints") == [1] and not ckpt.run_state_steps(out)
    with pytest.raises(LongkdError, match="nothing was committed .* start the run without --resume"):
        run(cache, out, resume=True)()
    run(cache, out)()
    assert_same_as(reference, out)
