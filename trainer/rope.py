"""RoPE scaling schedules, and rebuilding a student's rotary embedding when a phase starts.

A schedule is a list of :class:`Phase`: each runs until a step (or token) count, trains on a
window of ``window`` tokens, and uses one set of rope parameters. The training loop asks
:func:`active_phase` which phase a step is in and, when it changes, calls :func:`apply_phase`
(or :func:`apply_rope` directly), which writes the new settings into ``model.config`` and
rebuilds every rotary embedding module through the model's own rotary class, so transformers'
rope initialisation (``ROPE_INIT_FUNCTIONS``) computes the frequencies: nothing here writes a
frequency formula. The config saved with a checkpoint then carries the rope in force, and the
checkpoint reloads with ``AutoModelForCausalLM`` and runs at the scaled length.

    from longkd.trainer.rope import build_schedule, active_phase, apply_phase, initial_rope
    schedule = build_schedule({"preset": "phasewise", "windows": [1024, 4096, 16384],
                               "until": [1000, 2000, 3000]}, base_config=model.config)
    start = initial_rope(model.config)          # before the first apply
    i = active_phase(schedule, step, tokens_seen)
    apply_phase(model, schedule[i], start)      # when i changes

Presets (``spec`` a dict with ``"preset"``), S = ``original_window`` (default the base
config's ``max_position_embeddings``), phase i has window w_i:

- ``phasewise``: factor_i = max(1, w_i / S); a phase with factor 1 keeps the student's initial
  rope (``rope_parameters=None``), so every stage uses the rotary spectrum fully.
- ``static``: the last phase's factor max(1, w_last / S) from step 0, in every phase (the
  windows still grow as listed).
- ``none``: windows as listed, the rope never changes (every ``rope_parameters`` is None).

Each scaled phase's rope dict comes from :func:`~longkd.trainer.rope_params.make_rope_parameters`
(trainer/rope_params.py: the dict layout, the type-specific defaults for llama3 / longrope /
yarn, and the check against the student's architecture with transformers' own
``validate_rope``, which :func:`build_schedule` and :func:`apply_rope` run before anything
changes).

``Phase.max_position_embeddings`` is the value written to the config with the phase's rope:
round(S * factor) (with ``phasewise`` the phase window), or S for ``dynamic``
(:func:`~longkd.trainer.rope_params.max_positions_for`). ``None`` (with ``rope_parameters``
None) means the student's initial value.

A user-written schedule is a list of dicts ``{"until": N, "window": W, "rope": {...} | None,
"lr": x | None, "name": str (optional), "until_unit": "steps" | "tokens" (optional)}``; ``rope``
holds ``rope_type`` (or ``type``) plus any rope keys, completed the same way (S from its
``original_max_position_embeddings`` or the base config).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

from longkd.errors import LongkdError
from longkd.trainer.rope_params import (
    ROPE_TYPES,
    make_rope_parameters,
    max_positions_for,
    set_rope_config,
    validate_rope_parameters,
)

PRESETS = ("none", "static", "phasewise")
UNITS = ("steps", "tokens")


@dataclass
class Phase:
    """One stage of a schedule.

    Attributes:
        name: label for logs and checkpoints.
        until: exclusive end of the phase, in ``until_unit``.
        until_unit: ``"steps"`` (optimizer steps) or ``"tokens"`` (tokens seen).
        window: training window W of the phase (a prefix of the cache window).
        rope_parameters: the ``config.rope_parameters`` to use, or None for the student's
            initial rope.
        lr: learning rate of the phase, or None for the run's default.
        max_position_embeddings: ``config.max_position_embeddings`` to set with the rope, or
            None (with ``rope_parameters`` None) for the initial value.
    """

    name: str
    until: int
    until_unit: str
    window: int
    rope_parameters: dict | None
    lr: float | None = None
    max_position_embeddings: int | None = None


# ----------------------------------------------------------------------------- schedules


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise LongkdError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def build_schedule(spec, *, base_config, total_steps: int | None = None) -> list[Phase]:
    """Phases from a preset dict or a user-written list (see the module docstring).

    Args:
        spec: ``{"preset": ..., "windows": [...], "until": [...], ...}`` or a list of phase dicts.
        base_config: the student's config (rope theta, partial rotary factor, head size,
            ``max_position_embeddings`` as the default S).
        total_steps: the run's length in steps; fills a missing ``until`` of the last phase.

    Returns:
        The phases, in order.

    Raises:
        LongkdError: an unknown preset or rope type, windows that shrink, ``until`` values that
            do not increase, a missing ``until``, or rope parameters the student cannot take.
    """
    if isinstance(spec, dict):
        phases = _preset(spec, base_config, total_steps)
    elif isinstance(spec, list | tuple):
        phases = _user_phases(spec, base_config, total_steps)
    else:
        raise LongkdError(
            f"rope schedule must be a preset dict or a list of phases, got {type(spec).__name__}"
        )
    _check_order(phases)
    for phase in phases:
        if phase.rope_parameters is not None:
            validate_rope_parameters(base_config, phase.rope_parameters, phase.max_position_embeddings)
    return phases


def _untils(until, n: int, total_steps: int | None, unit: str) -> list[int]:
    until = list(until if isinstance(until, list | tuple) else [until]) if until is not None else []
    if len(until) == n - 1:
        if total_steps is None or unit != "steps":
            raise LongkdError(
                f"schedule: give {n} 'until' values (one per window), or total_steps for the last phase"
            )
        until.append(total_steps)
    if len(until) != n:
        raise LongkdError(f"schedule: {n} windows but {len(until)} 'until' values; give one per window")
    return [_int(u, "schedule 'until'") for u in until]


def _preset(spec: dict, base_config, total_steps: int | None) -> list[Phase]:
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset not in PRESETS:
        raise LongkdError(f"unknown rope preset {preset!r}; choose one of {', '.join(PRESETS)}")
    windows = spec.pop("windows", None)
    if not isinstance(windows, list | tuple) or not windows:
        raise LongkdError("schedule: 'windows' must be a non-empty list of window sizes")
    windows = [_int(w, "schedule window") for w in windows]
    unit = spec.pop("until_unit", "steps")
    if unit not in UNITS:
        raise LongkdError(f"schedule: until_unit must be 'steps' or 'tokens', got {unit!r}")
    until = _untils(spec.pop("until", None), len(windows), total_steps, unit)
    rope_type = spec.pop("rope_type", "yarn")
    if rope_type not in ROPE_TYPES:
        raise LongkdError(f"unknown rope type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
    original = _int(spec.pop("original_window", base_config.max_position_embeddings), "original_window")
    lrs = spec.pop("lr", None)
    lrs = list(lrs) if isinstance(lrs, list | tuple) else [lrs] * len(windows)
    if len(lrs) != len(windows):
        raise LongkdError(f"schedule: {len(windows)} windows but {len(lrs)} 'lr' values")
    extra = spec  # any other key is a rope parameter passed through
    phases = []
    for i, (window, end, lr) in enumerate(zip(windows, until, lrs)):
        if preset == "phasewise":
            factor = max(1.0, window / original)
        elif preset == "static":
            factor = max(1.0, windows[-1] / original)
        else:
            factor = 1.0
        params = None
        if factor > 1.0:
            params = make_rope_parameters(
                rope_type, factor, base_config=base_config, original=original, extra=extra
            )
        phases.append(
            Phase(
                name=f"phase{i + 1}-w{window}",
                until=end,
                until_unit=unit,
                window=window,
                rope_parameters=params,
                lr=None if lr is None else float(lr),
                max_position_embeddings=None if params is None else max_positions_for(params, original),
            )
        )
    return phases


def _user_phases(spec, base_config, total_steps: int | None) -> list[Phase]:
    if not spec:
        raise LongkdError("schedule: the phase list is empty")
    allowed = {"until", "window", "rope", "lr", "name", "until_unit"}
    phases = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict):
            raise LongkdError(f"schedule phase {i + 1} must be a mapping, got {type(item).__name__}")
        unknown = set(item) - allowed
        if unknown:
            raise LongkdError(
                f"schedule phase {i + 1}: unknown keys {sorted(unknown)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        unit = item.get("until_unit", "steps")
        if unit not in UNITS:
            raise LongkdError(f"schedule phase {i + 1}: until_unit must be 'steps' or 'tokens', got {unit!r}")
        until = item.get("until")
        if until is None and i == len(spec) - 1 and unit == "steps" and total_steps is not None:
            until = total_steps
        if until is None:
            raise LongkdError(f"schedule phase {i + 1} needs 'until'")
        window = _int(item.get("window"), f"schedule phase {i + 1} window")
        rope = item.get("rope")
        params, max_pos = None, None
        if rope is not None:
            if not isinstance(rope, dict):
                raise LongkdError(
                    f"schedule phase {i + 1}: 'rope' must be a mapping, got {type(rope).__name__}"
                )
            rope = dict(rope)
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            original = _int(
                rope.get("original_max_position_embeddings", base_config.max_position_embeddings),
                f"schedule phase {i + 1} original_max_position_embeddings",
            )
            factor = rope.get("factor", 1.0)
            params = make_rope_parameters(
                rope_type, factor, base_config=base_config, original=original, extra=rope
            )
            max_pos = max_positions_for(params, original)
        lr = item.get("lr")
        phases.append(
            Phase(
                name=str(item.get("name", f"phase{i + 1}-w{window}")),
                until=_int(until, f"schedule phase {i + 1} 'until'"),
                until_unit=unit,
                window=window,
                rope_parameters=params,
                lr=None if lr is None else float(lr),
                max_position_embeddings=max_pos,
            )
        )
    return phases


def _check_order(phases: list[Phase]) -> None:
    units = {p.until_unit for p in phases}
    if len(units) > 1:
        raise LongkdError("schedule: all phases must count 'until' in the same unit (steps or tokens)")
    for prev, cur in zip(phases, phases[1:]):
        if cur.window < prev.window:
            raise LongkdError(
                f"schedule: windows must not decrease, but {cur.name} has {cur.window} after {prev.window}"
            )
        if cur.until <= prev.until:
            raise LongkdError(
                f"schedule: 'until' must increase, but {cur.name} ends at {cur.until} after {prev.until}"
            )


def check_schedule_against_cache(schedule: list[Phase], cache_window: int) -> None:
    """Every phase trains on a prefix of the cache's windows, so none may be longer.

    Raises:
        LongkdError: a phase window beyond ``cache_window``.
    """
    for phase in schedule:
        if phase.window > cache_window:
            raise LongkdError(
                f"schedule phase {phase.name} wants window {phase.window} but the cache window is "
                f"{cache_window}; use a cache built with --window >= {phase.window} or a shorter phase"
            )


def active_phase(schedule: list[Phase], step: int, tokens_seen: int) -> int:
    """Index of the phase in force: the first whose ``until`` lies beyond the counter.

    Args:
        schedule: the phases.
        step: optimizer steps taken so far (0 before the first).
        tokens_seen: tokens trained on so far.

    Returns:
        The phase index; past the last ``until`` the last phase stays in force.
    """
    for i, phase in enumerate(schedule):
        counter = step if phase.until_unit == "steps" else tokens_seen
        if counter < phase.until:
            return i
    return len(schedule) - 1


# ----------------------------------------------------------------------------- applying


def initial_rope(config) -> tuple[dict, int]:
    """``(rope_parameters, max_position_embeddings)`` of a config, copied: what a phase with
    ``rope_parameters=None`` restores. Take it before the first :func:`apply_phase`."""
    return copy.deepcopy(dict(config.rope_parameters)), int(config.max_position_embeddings)


def apply_phase(model, phase: Phase, initial: tuple[dict, int]) -> None:
    """:func:`apply_rope` with the phase's settings, or ``initial`` when the phase has none."""
    if phase.rope_parameters is None:
        apply_rope(model, initial[0], initial[1])
    else:
        apply_rope(model, phase.rope_parameters, phase.max_position_embeddings)


def rotary_modules(model) -> list[tuple[Any, str, Any]]:
    """``(parent, attribute, module)`` for every rotary embedding module in ``model``.

    A rotary module is one whose class name ends in ``RotaryEmbedding`` and that holds a
    config (every transformers 5 rotary class does); models with several (one per layer type
    or per layer) yield them all.
    """
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config"):
                found.append((parent, name, child))
    return found


def apply_rope(model, rope_parameters: dict, max_position_embeddings: int) -> None:
    """Put ``rope_parameters`` in force: update the config, rebuild the rotary modules.

    Sets ``config.rope_parameters`` and ``config.max_position_embeddings`` on the model's
    config (and on the config each rotary module holds, when that is a sub-config), then
    replaces every rotary module by a fresh instance of its own class built from the updated
    config, on the old module's device and dtype. The frequencies (``inv_freq``) and
    ``attention_scaling`` therefore come from transformers' rope initialisation.

    Args:
        model: a transformers causal LM.
        rope_parameters: a flat rope dict (a per-layer-type config gets it for its global layers)
            or one nested by layer type.
        max_position_embeddings: the value to store in the config.

    Raises:
        LongkdError: the parameters are invalid for this model, or it has no rotary module.
    """
    modules = rotary_modules(model)
    if not modules:
        raise LongkdError(f"{type(model).__name__} has no rotary embedding module to rescale")
    configs = {id(model.config): model.config}
    for _, _, module in modules:
        configs.setdefault(id(module.config), module.config)
    for cfg in configs.values():
        if getattr(cfg, "rope_parameters", None) is not None:
            validate_rope_parameters(cfg, rope_parameters, max_position_embeddings)
    for cfg in configs.values():
        if getattr(cfg, "rope_parameters", None) is not None:
            set_rope_config(cfg, rope_parameters, max_position_embeddings)
            cfg.standardize_rope_params()
    for parent, name, module in modules:
        cls = type(module)
        kwargs = {}
        if "device" in inspect.signature(cls.__init__).parameters:
            kwargs["device"] = _device_of(module)
        fresh = cls(module.config, **kwargs)
        buffers = list(module.buffers())
        if buffers:
            fresh.to(device=buffers[0].device, dtype=buffers[0].dtype)
        fresh.train(module.training)
        setattr(parent, name, fresh)


def _device_of(module):
    for buffer in module.buffers():
        return buffer.device
    return None


def describe(phase: Phase) -> str:
    """One line for logs: ``phase2-w4096: window 4096, yarn x4 until 2000 steps``."""
    rope = phase.rope_parameters
    if rope is None:
        kind = "initial rope"
    elif rope.get("rope_type") == "default":
        kind = f"default rope theta {rope.get('rope_theta')}"
    else:
        kind = f"{rope['rope_type']} x{_fmt(rope.get('factor', 1.0))}"
    return f"{phase.name}: window {phase.window}, {kind} until {phase.until} {phase.until_unit}"


def _fmt(x: float) -> str:
    return str(int(x)) if math.isclose(x, round(x)) else f"{x:g}"
