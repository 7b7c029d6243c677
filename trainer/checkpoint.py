"""Checkpoints that are either complete or absent, and exact resume from them.

Layout of a run directory (``out``)::

    out/
      config.json                  the validated run config
      run_state/step-0000100.pt    the shared reader state + host RNGs: written LAST, it commits a step
      run_state/latest             "step-0000100"
      <student>/checkpoints/step-0000100/
          config.json, model.safetensors   save_pretrained: the config carries the rope in force
          tokenizer files                  when the student has a tokenizer
          optimizer.pt                     AdamW state
          trainer_state.pt                 step, tokens, phase, the student's RNG states, reader state
          trainer_state.json               the same counters, readable
      <student>/checkpoints/latest

Every checkpoint is written into a ``.tmp-step-...`` directory and renamed into place, and
every ``latest`` pointer is replaced atomically, so a run killed at any instant leaves only
whole checkpoints. A step counts as committed once ``run_state`` holds it; ``--resume`` takes
the newest step that the run state and every student have, which is the last step the whole
run finished saving.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longkd.errors import LongkdError
from longkd.fileio import atomic_dir, atomic_file, write_text_atomic

_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_STEP_FILE = re.compile(r"^step-(\d{7,})\.pt$")
LATEST = "latest"


def step_name(step: int) -> str:
    """``step-0000042`` for step 42 (sorts by name up to 10^7 steps, still parses beyond)."""
    return f"step-{step:07d}"


def checkpoint_steps(root: Path) -> list[int]:
    """Steps with a complete checkpoint directory under ``root`` (ascending)."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def run_state_steps(out: Path) -> list[int]:
    """Steps committed in ``out/run_state`` (ascending)."""
    root = out / "run_state"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_FILE.match(p.name)))


def write_step_dir(root: Path, step: int, fill: Callable[[Path], None], keep: int) -> Path:
    """Write one checkpoint directory atomically, point ``latest`` at it, prune old ones.

    Args:
        root: the checkpoints folder (created if needed).
        step: the step the checkpoint holds.
        fill: writes the checkpoint's files into the directory it is given (a temporary one).
        keep: how many newest checkpoints to keep.

    Returns:
        The final directory ``root/step-XXXXXXX``.
    """
    final = root / step_name(step)
    with atomic_dir(final) as tmp:  # a re-run of the same step after a resume replaces it whole
        fill(tmp)
    write_text_atomic(root / LATEST, final.name + "\n")
    for old in checkpoint_steps(root)[:-keep]:
        shutil.rmtree(root / step_name(old), ignore_errors=True)
    return final


def save_run_state(out: Path, step: int, reader_state: Any, students: list[str], keep: int) -> Path:
    """Commit ``step``: the shared reader state and host RNGs, written after every student's checkpoint."""
    root = out / "run_state"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step_name(step)}.pt"
    state = {
        "step": step,
        "students": list(students),
        "reader": reader_state,
        "python_rng": __import__("random").getstate(),
        "numpy_rng": np.random.get_state(),
    }
    with atomic_file(final, "wb") as f:
        torch.save(state, f)
    write_text_atomic(root / LATEST, final.stem + "\n")
    for old in run_state_steps(out)[:-keep]:
        (root / f"{step_name(old)}.pt").unlink(missing_ok=True)
    return final


def load_run_state(out: Path, step: int) -> dict:
    """The run state saved for ``step`` (see :func:`save_run_state`)."""
    # our own file, holding python / numpy RNG tuples: not loadable with weights_only
    return torch.load(out / "run_state" / f"{step_name(step)}.pt", weights_only=False)


def resume_step(out: Path, names: list[str]) -> int:
    """The newest step that the run state and every student's checkpoints all hold.

    Raises:
        LongkdError: nothing to resume from, naming the run directory.
    """
    committed = set(run_state_steps(out))
    if not committed:
        raise LongkdError(f"--resume: no checkpoint in {out}/run_state; start the run without --resume")
    for name in names:
        have = set(checkpoint_steps(out / name / "checkpoints"))
        if not have:
            raise LongkdError(
                f"--resume: student {name!r} has no checkpoint under {out / name / 'checkpoints'}; "
                "was it added to the config after the run started?"
            )
        committed &= have
    if not committed:
        raise LongkdError(f"--resume: no step in {out} has a checkpoint for every student")
    return max(committed)


def save_student_checkpoint(
    root: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    counters: dict,
    rng: dict,
    reader_state: Any,
    keep: int,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write one student's checkpoint (see the module docstring for the files).

    Args:
        root: ``out/<student>/checkpoints``.
        step: optimizer steps taken.
        model: the (uncompiled) transformers model; its config holds the rope in force.
        tokenizer: saved beside the model when not None.
        optimizer: its ``state_dict`` goes to optimizer.pt.
        counters: JSON-able counters (step, tokens, phase, ...).
        rng: the student's RNG states (tensors).
        reader_state: the shared stream's state after this step.
        keep: newest checkpoints to keep.
        model_state, optimizer_state: full state dicts to write instead of the model's and the
            optimizer's own (a sharded FSDP student gathers them first: trainer/distributed.py).

    Returns:
        The checkpoint directory.
    """

    def fill(d: Path) -> None:
        model.save_pretrained(d, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, d / "optimizer.pt")
        torch.save({"counters": counters, "rng": rng, "reader": reader_state}, d / "trainer_state.pt")
        (d / "trainer_state.json").write_text(json.dumps(counters, indent=2) + "\n")

    return write_step_dir(root, step, fill, keep)


def load_student_checkpoint(path: Path) -> tuple[dict, dict, dict, Any]:
    """``(model_state, optimizer_state, counters_and_rng, reader_state)`` of a student checkpoint.

    Raises:
        LongkdError: a missing file in the checkpoint.
    """
    from safetensors.torch import load_file

    weights = sorted(path.glob("*.safetensors"))
    if not weights or not (path / "optimizer.pt").is_file() or not (path / "trainer_state.pt").is_file():
        raise LongkdError(
            f"checkpoint {path} is incomplete (model, optimizer.pt or trainer_state.pt missing)"
        )
    model_state: dict = {}
    for w in weights:
        model_state.update(load_file(str(w)))
    optim = torch.load(path / "optimizer.pt", weights_only=False)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    return model_state, optim, state, state["reader"]


def same_state(a: Any, b: Any) -> bool:
    """Deep equality for reader states (dicts, lists, tensors, numpy arrays, scalars)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` so a resumed run's metrics.jsonl reads as one run's."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    write_text_atomic(path, "".join(k + "\n" for k in kept))
