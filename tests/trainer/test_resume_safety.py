"""A run directory from someone else cannot run code, and --resume continues only the run it was.

- A crafted pickle (its payload creates a file) placed where run state lives is never
  unpickled: ``longkd train --resume`` answers one line and the file is not created. The
  same payload does create the file through ``torch.load(weights_only=False)``, which is what
  older versions called, so the test would catch a return to it.
- State files round-trip everything a run saves (optimizer and RNG states, reader state).
- A changed setting on ``--resume`` is refused naming it; a setting that does not change what
  is trained is accepted with a line; a checkpoint whose shapes do not fit is one line.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
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


class Payload:
    """Unpickling this creates the file ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = write_random_text(root / "train.jsonl", samples=40, vocab=VOCAB, lengths=(5, 40), seed=None)
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256)
    return build_cache(teacher, data, root / "cache", window=W, top_k=8, max_windows=8, batch_size=4)


def config(cache, out, **top) -> dict:
    student = {"name": "a", "init": {"arch": "llama", "hidden_size": 32, "num_heads": 2, "seed": 1}}
    data = {"cache": str(cache), "out": str(out), "steps": 2, "batch_size": 2, "students": [student]}
    data.update(top)
    return data


def run_cli(tmp_path: Path, data: dict, *flags: str) -> int:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return main(["train", str(path), "--no-progress", *flags])


def error_line(capsys) -> str:
    """The one line a refused command printed (and nothing like a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("longkd: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_torch_load(monkeypatch):
    """Nothing in a resume may reach torch.load, with any arguments."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on a run directory")

    monkeypatch.setattr(torch, "load", refuse)


def test_the_payload_runs_under_a_pickle_load(tmp_path):
    """The test's payload is live: torch.load(weights_only=False) runs it."""
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["old run state", "run state", "optimizer", "trainer state"])
def test_a_malicious_pickle_never_runs(cache, tmp_path, capsys, no_torch_load, where):
    out = tmp_path / "run"
    data = config(cache, out)
    train(parse_config(data), progress=False, stop_after=1)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "reader": Payload(marker)}, evil)
    step = out / "a" / "checkpoints" / ckpt.step_name(1)
    target = {
        "old run state": out / "run_state" / f"{ckpt.step_name(1)}.pt",
        "run state": out / "run_state" / f"{ckpt.step_name(1)}.state",
        "optimizer": step / ckpt.OPTIMIZER_FILE,
        "trainer state": step / ckpt.TRAINER_STATE_FILE,
    }[where]
    if where == "old run state":  # a run directory as older versions wrote it: pickles only
        (out / "run_state" / f"{ckpt.step_name(1)}.state").unlink()
    target.write_bytes(evil.read_bytes())
    assert run_cli(tmp_path, data, "--resume") == 2
    line = error_line(capsys)
    assert not marker.exists()
    if where == "old run state":
        assert "is a pickle written by an older longkd; pickles are never loaded" in line
        assert "start a new run with another --out" in line
    else:
        assert f"{target} is not a longkd state file" in line and "damaged" in line


def test_state_files_round_trip(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.95))
    optimizer.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "rng": {"cpu": torch.get_rng_state(), "cuda": None},
        "numbers": [float("inf"), float("-inf"), 0.5, -3, True, None, "x"],
        7: ("tuple", 1),
    }
    path = tmp_path / "x.state"
    ckpt.write_state(path, state)
    back = ckpt.read_state(path)
    assert ckpt.same_state(back["optimizer"], state["optimizer"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["python_rng"] == state["python_rng"]
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])
    assert ckpt.same_state(back["numpy_rng"], state["numpy_rng"])
    assert torch.equal(back["rng"]["cpu"], state["rng"]["cpu"]) and back[7] == ("tuple", 1)
    assert back["numbers"] == state["numbers"]
    with pytest.raises(TypeError):
        ckpt.write_state(path, {"object": object()})


def test_damaged_state_files_are_one_line(tmp_path):
    path = tmp_path / "x.state"
    ckpt.write_state(path, {"a": torch.ones(3)})
    good = path.read_bytes()
    for damaged in (good[:20], b"", b"\x00" * 64, good.replace(b"tensor", b"tenser")):
        path.write_bytes(damaged)
        with pytest.raises(LongkdError, match=r"is not a longkd state file .*damaged"):
            ckpt.read_state(path)


def test_changed_settings_on_resume(cache, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    base = config(cache, out, steps=3, checkpoint_every=1)
    train(parse_config(base), progress=False, stop_after=1)
    cases = [
        ({"batch_size": 3}, "--resume: batch_size was 2 at step 1 and is 3 now"),
        ({"students": [{**base["students"][0], "optimizer": {"lr": 1e-3}}]},
         "--resume: students.a.optimizer.lr was 0.0003 at step 1 and is 0.001 now"),
        ({"steps": 5}, "--resume: steps was 3 at step 1 and is 5 now"),
        ({"students": [{**base["students"][0], "init": {**base["students"][0]["init"], "hidden_size": 64}}]},
         "--resume: students.a.init.hidden_size was 32 at step 1 and is 64 now"),
    ]  # fmt: skip
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    for change, message in cases:
        assert run_cli(tmp_path, {**base, **change}, "--resume") == 2
        line = error_line(capsys)
        assert line.startswith(f"longkd: error: {message}; a resumed run continues the run it was"), line
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing  # nothing written
    # a setting that does not change what is trained: accepted, with a line
    with caplog.at_level(logging.WARNING, logger="longkd.trainer.loop"):
        assert run_cli(tmp_path, {**base, "log_every": 5}, "--resume") == 0
    assert "--resume: log_every changed from 10 to 5 (it does not change what is trained)" in caplog.text


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(cache, tmp_path, tiny_model_dir, capsys):
    """The student's init directory was replaced by a wider model between the kill and the resume."""
    import shutil

    init = tmp_path / "student"
    shutil.copytree(tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=32, num_heads=2, seed=3), init)
    out = tmp_path / "run"
    data = {**config(cache, out), "students": [{"name": "a", "init": str(init)}]}
    train(parse_config(data), progress=False, stop_after=1)
    shutil.rmtree(init)
    shutil.copytree(tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=64, num_heads=2, seed=3), init)
    assert run_cli(tmp_path, data, "--resume") == 2
    line = error_line(capsys)
    assert re.search(
        r"--resume: student 'a''s checkpoint at step 1 holds \S+\.weight of shape \[64, 32\], the model its "
        r"init builds has \[64, 64\]; restore the student's init or start a new run with another --out$",
        line,
    ), line
