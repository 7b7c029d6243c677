"""Checkpoints that are either complete or absent, exact resume from them, and no code from disk.

Layout of a run directory (``out``)::

    out/
      config.json                    the validated run config (readable; not read back)
      run_state/step-0000100.state   the shared reader state, host RNGs and the run's settings:
                                     written LAST, it commits a step
      run_state/latest               "step-0000100"
      <student>/checkpoints/step-0000100/
          config.json, model.safetensors   save_pretrained: the config carries the rope in force
          tokenizer files                  when the student has a tokenizer
          optimizer.state                  AdamW state
          trainer_state.state              step, tokens, phase, the student's RNG states, reader state
          trainer_state.json               the same counters, readable
      <student>/checkpoints/latest

A ``.state`` file is a safetensors file: its tensors, plus the structure around them (dicts,
lists, numbers, strings) as JSON in the safetensors header (:func:`write_state`). Loading one
runs no code, whoever made the file, unlike a pickle (``torch.load`` of an arbitrary file can
execute anything). Run directories of older longkd versions held pickles (``*.pt``); they are
refused with one line and never opened.

Every checkpoint is written into a ``.tmp-step-...`` directory and renamed into place, and
every ``latest`` pointer and run state file is replaced atomically, so a run killed at any
instant leaves only whole checkpoints. A step counts as committed once ``run_state`` holds it;
``--resume`` takes the newest step that the run state and every student have, which is the
last step the whole run finished saving. Old checkpoints are pruned only after a newer step is
committed (:func:`prune`), so a kill between a student's checkpoint and the run state always
leaves a committed step to resume from, whatever ``keep_checkpoints`` is. Temporaries of a
killed run are removed when the next run starts (:func:`remove_temporaries`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longkd import fileio
from longkd.errors import LongkdError, one_line
from longkd.fileio import atomic_dir, atomic_file, write_point, write_text_atomic

_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_STEP_FILE = re.compile(r"^step-(\d{7,})\.state$")
LATEST = "latest"
STATE_SUFFIX = ".state"
OPTIMIZER_FILE = "optimizer.state"
TRAINER_STATE_FILE = "trainer_state.state"
# What older versions wrote with torch.save (pickles): recognised only to be refused.
_PICKLED = ("optimizer.pt", "trainer_state.pt")
_STATE_FORMAT = "longkd-state/1"
_MAX_DEPTH = 64  # nesting of a state's structure; ours is under 10


def step_name(step: int) -> str:
    """``step-0000042`` for step 42 (sorts by name up to 10^7 steps, still parses beyond)."""
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------- state files


def _encode(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """``obj`` as JSON-able data; its tensors move to ``tensors`` under fresh keys."""
    if depth > _MAX_DEPTH:
        raise ValueError("state nested too deeply")
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # own storage: safetensors refuses shared
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a numpy array of dtype {obj.dtype}")
        return {"ndarray": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, depth)
    if isinstance(obj, list):
        return [_encode(v, tensors, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors, depth + 1) for v in obj]}
    if isinstance(obj, dict):
        return {
            "dict": [[_encode(k, tensors, depth + 1), _encode(v, tensors, depth + 1)] for k, v in obj.items()]
        }
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(data: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """The inverse of :func:`_encode`; ValueError for anything it would not have written."""
    if depth > _MAX_DEPTH:
        raise ValueError("structure nested too deeply")
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [_decode(v, tensors, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) not in (1, 3):
        raise ValueError(f"unexpected {type(data).__name__} in the structure")
    if set(data) == {"tensor"}:
        if data["tensor"] not in tensors:
            raise ValueError(f"tensor {data['tensor']!r} is missing")
        return tensors[data["tensor"]]
    if set(data) == {"float"} and data["float"] in ("inf", "-inf", "nan"):
        return float(data["float"])
    if set(data) == {"tuple"} and isinstance(data["tuple"], list):
        return tuple(_decode(v, tensors, depth + 1) for v in data["tuple"])
    if set(data) == {"dict"} and isinstance(data["dict"], list):
        out = {}
        for item in data["dict"]:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str | int | None):
                raise ValueError("malformed mapping entry")
            out[item[0]] = _decode(item[1], tensors, depth + 1)
        return out
    if set(data) == {"ndarray", "shape", "data"}:
        dtype = np.dtype(str(data["ndarray"]))
        if dtype.kind not in "biuf" or not isinstance(data["data"], list):
            raise ValueError(f"array of dtype {dtype} not allowed")
        return np.array(data["data"], dtype=dtype).reshape([int(n) for n in data["shape"]])
    raise ValueError(f"unknown entry {sorted(data)!r}")


def state_bytes(state: Any) -> bytes:
    """``state`` (nested dicts, lists, tuples, tensors, numpy arrays, scalars) as a safetensors file."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, tensors))
    return save(tensors, metadata={"format": _STATE_FORMAT, "structure": structure})


def write_state(path: Path, state: Any) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`state_bytes`)."""
    data = state_bytes(state)
    with atomic_file(path, "wb") as f:
        f.write(data)


def read_state(path: Path) -> Any:
    """Read a file written by :func:`write_state`; nothing in it is executed.

    Raises:
        LongkdError: a missing file or one that is not a longkd state file, naming it.
    """
    from safetensors import safe_open

    damaged = (
        "the run directory is damaged; resume from an earlier copy or start a new run with another --out"
    )
    if not path.is_file():
        raise LongkdError(f"{path} is missing; {damaged}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r} is not {_STATE_FORMAT}")
        return _decode(json.loads(meta.get("structure", "null")), tensors)
    except Exception as err:  # noqa: BLE001 (safetensors and json raise their own types; all mean damage)
        raise LongkdError(f"{path} is not a longkd state file ({one_line(err, 120)}); {damaged}") from err


def _refuse_pickles(paths: list[Path]) -> None:
    """One line for a run directory of an older longkd (pickled state), which is never opened."""
    for path in paths:
        if path.exists():
            raise LongkdError(
                f"--resume: {path} is a pickle written by an older longkd; pickles are never loaded "
                "(they can run code), so this run cannot be resumed: start a new run with another "
                "--out (its checkpoints' model.safetensors still load as models)"
            )


# ----------------------------------------------------------------------------- steps


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


def write_step_dir(root: Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Write one checkpoint directory atomically and point ``latest`` at it.

    Args:
        root: the checkpoints folder (created if needed).
        step: the step the checkpoint holds.
        fill: writes the checkpoint's files into the directory it is given (a temporary one).

    Returns:
        The final directory ``root/step-XXXXXXX``.
    """
    final = root / step_name(step)
    with atomic_dir(final) as tmp:  # a re-run of the same step after a resume replaces it whole
        fill(tmp)
    write_text_atomic(root / LATEST, final.name + "\n")
    return final


def save_run_state(out: Path, step: int, reader_state: Any, students: list[str], settings: dict) -> Path:
    """Commit ``step``: the shared reader state, host RNGs and the run's settings, written after
    every student's checkpoint.

    Args:
        out: the run directory.
        step: the step every student has just saved.
        reader_state: the stream's ``state_dict()``.
        students: the students' names.
        settings: what the run is (trainer/loop.py ``run_settings``), compared on ``--resume``.

    Returns:
        The run state file.
    """
    import random

    root = out / "run_state"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step_name(step)}{STATE_SUFFIX}"
    state = {
        "step": step,
        "students": list(students),
        "reader": reader_state,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "settings": settings,
    }
    write_state(final, state)
    write_text_atomic(root / LATEST, step_name(step) + "\n")
    return final


def prune(out: Path, names: list[str], keep: int) -> None:
    """Keep the newest ``keep`` committed steps: delete older run states and every student
    checkpoint that is not one of them (called after a commit, never before)."""
    committed = run_state_steps(out)
    kept = set(committed[-keep:])
    for step in committed:
        if step not in kept:
            path = out / "run_state" / f"{step_name(step)}{STATE_SUFFIX}"
            path.unlink(missing_ok=True)
            write_point("removed", path)
    for name in names:
        root = out / name / "checkpoints"
        for step in checkpoint_steps(root):
            if step not in kept:
                shutil.rmtree(root / step_name(step), ignore_errors=True)
                write_point("removed", root / step_name(step))


def discard_after(out: Path, names: list[str], step: int) -> None:
    """Before a resumed run goes on from ``step``: delete what later, uncommitted saves left and
    point every ``latest`` back at ``step``."""
    for later in run_state_steps(out):
        if later > step:
            path = out / "run_state" / f"{step_name(later)}{STATE_SUFFIX}"
            path.unlink(missing_ok=True)
            write_point("removed", path)
    write_text_atomic(out / "run_state" / LATEST, step_name(step) + "\n")
    for name in names:
        root = out / name / "checkpoints"
        for later in checkpoint_steps(root):
            if later > step:
                shutil.rmtree(root / step_name(later), ignore_errors=True)
                write_point("removed", root / step_name(later))
        write_text_atomic(root / LATEST, step_name(step) + "\n")


def discard_uncommitted(out: Path, names: list[str]) -> None:
    """Before a fresh run in a directory where nothing was committed: delete the student
    checkpoints a killed first save left."""
    for name in names:
        root = out / name / "checkpoints"
        for step in checkpoint_steps(root):
            shutil.rmtree(root / step_name(step), ignore_errors=True)
            write_point("removed", root / step_name(step))
        (root / LATEST).unlink(missing_ok=True)


def remove_temporaries(out: Path, names: list[str]) -> list[str]:
    """Remove the temporary files and directories killed runs left in the run directory.

    ``run_state/`` and ``<student>/checkpoints/`` are longkd's own, so every ``.tmp-`` entry
    there goes; in ``out/`` and ``out/<student>/`` only temporaries of longkd's files.

    Returns:
        The paths removed, relative to ``out``.
    """
    ours = {"config.json", "metrics.jsonl"}.__contains__
    removed = [f"run_state/{n}" for n in fileio.remove_temporaries(out / "run_state")]
    removed += fileio.remove_temporaries(out, lambda n: fileio.is_temp_of(n, ours))
    for name in names:
        removed += [
            f"{name}/{n}" for n in fileio.remove_temporaries(out / name, lambda n: fileio.is_temp_of(n, ours))
        ]
        removed += [f"{name}/checkpoints/{n}" for n in fileio.remove_temporaries(out / name / "checkpoints")]
    return removed


def committed_step(out: Path, names: list[str]) -> int | None:
    """The newest step that the run state and every student's checkpoints all hold, or None
    when nothing was committed yet.

    Raises:
        LongkdError: a run directory of an older longkd (pickled state), or a student without
            a checkpoint at any committed step, naming it.
    """
    _refuse_pickles(sorted((out / "run_state").glob("step-*.pt")))
    committed = set(run_state_steps(out))
    if not committed:
        return None
    for name in names:
        root = out / name / "checkpoints"
        _refuse_pickles([root / step_name(s) / f for s in checkpoint_steps(root) for f in _PICKLED])
        have = set(checkpoint_steps(root))
        if not have:
            raise LongkdError(
                f"--resume: student {name!r} has no checkpoint under {root}; "
                "was it added to the config after the run started?"
            )
        committed &= have
    if not committed:
        raise LongkdError(f"--resume: no step in {out} has a checkpoint for every student")
    return max(committed)


def resume_step(out: Path, names: list[str]) -> int:
    """The newest committed step (see :func:`committed_step`).

    Raises:
        LongkdError: nothing to resume from, naming the run directory; or as
            :func:`committed_step`.
    """
    step = committed_step(out, names)
    if step is None:
        raise LongkdError(
            f"--resume: nothing was committed in {out}/run_state yet; start the run without --resume"
        )
    return step


def load_run_state(out: Path, step: int) -> dict:
    """The run state saved for ``step`` (see :func:`save_run_state`).

    Raises:
        LongkdError: a missing or damaged file, or one without the expected entries.
    """
    path = out / "run_state" / f"{step_name(step)}{STATE_SUFFIX}"
    state = read_state(path)
    if not isinstance(state, dict) or not {"step", "reader", "python_rng", "numpy_rng", "settings"} <= set(
        state
    ):
        raise LongkdError(f"{path} lacks the run state's entries; the run directory is damaged")
    return state


# ----------------------------------------------------------------------------- students


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
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write one student's checkpoint (see the module docstring for the files).

    Args:
        root: ``out/<student>/checkpoints``.
        step: optimizer steps taken.
        model: the (uncompiled) transformers model; its config holds the rope in force.
        tokenizer: saved beside the model when not None.
        optimizer: its ``state_dict`` goes to optimizer.state.
        counters: JSON-able counters (step, tokens, phase, ...).
        rng: the student's RNG states (tensors).
        reader_state: the shared stream's state after this step.
        model_state, optimizer_state: full state dicts to write instead of the model's and the
            optimizer's own (a sharded FSDP student gathers them first: trainer/distributed.py).

    Returns:
        The checkpoint directory.
    """

    def fill(d: Path) -> None:
        model.save_pretrained(d, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        optim = optimizer.state_dict() if optimizer_state is None else optimizer_state
        (d / OPTIMIZER_FILE).write_bytes(state_bytes(optim))
        state = {"counters": counters, "rng": rng, "reader": reader_state}
        (d / TRAINER_STATE_FILE).write_bytes(state_bytes(state))
        (d / "trainer_state.json").write_text(json.dumps(counters, indent=2) + "\n")

    return write_step_dir(root, step, fill)


def load_student_checkpoint(path: Path) -> tuple[dict, dict, dict, Any]:
    """``(model_state, optimizer_state, counters_and_rng, reader_state)`` of a student checkpoint.

    Raises:
        LongkdError: a missing or damaged file in the checkpoint, or one of an older longkd.
    """
    from safetensors.torch import load_file

    _refuse_pickles([path / f for f in _PICKLED])
    weights = sorted(path.glob("model*.safetensors"))
    if not weights or not (path / OPTIMIZER_FILE).is_file() or not (path / TRAINER_STATE_FILE).is_file():
        raise LongkdError(
            f"checkpoint {path} is incomplete (model, {OPTIMIZER_FILE} or {TRAINER_STATE_FILE} missing)"
        )
    model_state: dict = {}
    for w in weights:
        try:
            model_state.update(load_file(str(w)))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own types)
            raise LongkdError(f"{w} is not a readable safetensors file ({one_line(err, 120)})") from err
    optim = read_state(path / OPTIMIZER_FILE)
    state = read_state(path / TRAINER_STATE_FILE)
    if (
        not isinstance(optim, dict)
        or not isinstance(state, dict)
        or not {"counters", "rng", "reader"} <= set(state)
    ):
        raise LongkdError(f"checkpoint {path} holds states without the expected entries; it is damaged")
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
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by the kill
    write_text_atomic(path, "".join(k + "\n" for k in kept))
