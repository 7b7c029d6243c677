"""Making and checking ``rope_parameters`` dicts, the one place a rope setting is put together.

Schedules (trainer/rope.py) describe *when* a rope changes; this module says *what* a rope
setting is: a flat dict in the layout transformers 5 keeps in ``config.rope_parameters``, built
from a type and a factor, checked against the student's architecture, and written into a config.

Rope dicts hold ``rope_type``, ``rope_theta`` and any ``partial_rotary_factor`` copied from the
base config, ``factor``, and ``original_max_position_embeddings`` = S (the context length the
student was trained for) for yarn / llama3 / longrope. Type-specific defaults (any key given by
the caller wins):

- ``llama3``: ``low_freq_factor`` 1.0, ``high_freq_factor`` 4.0 (Llama 3.1's values).
- ``longrope``: ``short_factor`` all 1.0 (no change within S); ``long_factor`` a geometric ramp
  over the d/2 rotary frequencies (d = rotated head dims) from 1.0 at the highest frequency to
  ``factor`` at the lowest, so fine positional detail is kept and the slow dimensions are
  interpolated by the full factor. Both lists have length d/2.
- ``yarn``: transformers' own defaults (beta_fast 32, beta_slow 1, attention factor from the
  factor).

The ``max_position_embeddings`` that goes with a rope dict (:func:`max_positions_for`) is
round(S * factor), the length the scaled rope is made for, except for ``default`` and
``dynamic``, where it stays S because dynamic NTK scales relative to ``max_position_embeddings``
at run time.

Every rope dict is checked with transformers' own ``validate_rope`` on a copy of the student's
config (its warnings count as errors here), so a type the student's architecture refuses (Phi-3
takes only default and longrope) fails before training starts. Configs with rope settings per
layer type (e.g. Gemma 2's sliding and full attention) take a flat dict for their global layers
only (:func:`set_rope_config`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from longkd.errors import LongkdError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")
# layer types whose attention never spans more than a local window: scaling them would only
# blur their positions, so nested (per layer type) rope settings leave them alone
_LOCAL_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def _rope_base(config) -> dict:
    """The student's flat rope dict (for nested configs: the full-attention entry)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise LongkdError(
            f"model type {getattr(config, 'model_type', '?')!r} has no rope_parameters; "
            "RoPE schedules need a rotary-embedding model"
        )
    nested = _nested_keys(config, params)
    if nested:
        key = "full_attention" if "full_attention" in nested else nested[-1]
        return dict(params[key] or {})
    return dict(params)


def _nested_keys(config, params: dict) -> list[str]:
    """The layer-type keys of a per-layer-type rope dict (all of them, also types no layer of
    this config uses), or [] for a flat dict."""
    if not hasattr(config, "nested_rope_parameter_keys") or not config.nested_rope_parameter_keys(params):
        return []
    return [key for key, value in params.items() if value is None or isinstance(value, dict)]


def _rotary_dim(config, base: dict) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * base.get("partial_rotary_factor", 1.0))


def make_rope_parameters(
    rope_type: str, factor: float, *, base_config, original: int, extra: dict | None = None
) -> dict:
    """A complete rope dict for ``base_config`` scaled by ``factor`` over ``original`` positions.

    Args:
        rope_type: one of :data:`ROPE_TYPES`.
        factor: the scaling factor (>= 1; ignored for ``default``).
        base_config: the student's config; its ``rope_theta`` and ``partial_rotary_factor``
            are kept.
        original: S, the context length the student was trained for.
        extra: keys that override or add to the result (e.g. ``beta_fast``, ``rope_theta``).

    Returns:
        A flat dict in transformers 5's ``rope_parameters`` layout.

    Raises:
        LongkdError: unknown rope type.
    """
    if rope_type not in ROPE_TYPES:
        raise LongkdError(f"unknown rope type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
    base = _rope_base(base_config)
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": base.get("rope_theta", 10000.0)}
    if "partial_rotary_factor" in base:
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    if rope_type != "default":
        params["factor"] = float(factor)
    if rope_type in _NEEDS_ORIGINAL:
        params["original_max_position_embeddings"] = int(original)
    if rope_type == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    extra = dict(extra or {})
    if rope_type == "longrope":
        half = _rotary_dim(base_config, {**params, **extra}) // 2
        params["short_factor"] = [1.0] * half
        f = float(extra.get("factor", factor))
        params["long_factor"] = [f ** (i / (half - 1)) if half > 1 else f for i in range(half)]
    params.update(extra)
    params["rope_type"] = rope_type
    return params


def max_positions_for(params: dict, original: int) -> int:
    """The ``max_position_embeddings`` to store with ``params`` (see the module docstring).

    Args:
        params: a flat rope dict with ``rope_type`` (and ``factor`` when scaled).
        original: S, the context length the student was trained for.

    Returns:
        round(S * factor), or S for ``default`` and ``dynamic``.
    """
    if params["rope_type"] in ("default", "dynamic"):
        return int(original)
    return int(round(original * float(params.get("factor", 1.0))))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def validate_rope_parameters(config, rope_parameters: dict, max_position_embeddings: int) -> None:
    """Check a rope dict against a model config with transformers' own ``validate_rope``.

    The check runs on a deep copy of ``config`` with ``rope_parameters`` and
    ``max_position_embeddings`` set; transformers' validation warnings (unknown keys, a factor
    below 1, factor lists of the wrong length) are raised like its errors.

    Raises:
        LongkdError: the parameters are invalid or the architecture does not take them.
    """
    nested = _nested_keys(config, rope_parameters)
    entries = [rope_parameters[k] for k in nested if rope_parameters[k]] if nested else [rope_parameters]
    for entry in entries:
        rope_type = entry.get("rope_type", entry.get("type"))
        if rope_type not in ROPE_TYPES:
            raise LongkdError(f"unknown rope type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
        factor = entry.get("factor")
        if rope_type != "default" and (not isinstance(factor, int | float) or factor < 1):
            raise LongkdError(f"rope factor must be >= 1 for rope type {rope_type!r}, got {factor!r}")
    cfg = copy.deepcopy(config)
    set_rope_config(cfg, rope_parameters, max_position_embeddings)
    names = ("transformers.modeling_rope_utils", type(cfg).__module__)
    loggers = [logging.getLogger(n) for n in names]
    handler = _Collect()
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)  # collect even when transformers' verbosity is lower
    try:
        cfg.standardize_rope_params()
        cfg.validate_rope()
    except (KeyError, ValueError, TypeError) as err:
        msg = str(err).strip("\"'").splitlines()[0]
        raise LongkdError(f"rope {rope_type!r} is not valid for {cfg.model_type}: {msg}") from err
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
    if handler.messages:
        raise LongkdError(f"rope {rope_type!r} is not valid for {cfg.model_type}: {handler.messages[0]}")


def set_rope_config(config, rope_parameters: dict, max_position_embeddings: int) -> None:
    """Write a rope dict and its length into ``config`` (in place; no validation).

    A flat dict given to a per-layer-type config scales the global layers only: local layer
    types (sliding / chunked attention) and unused entries keep their settings.

    Args:
        config: a transformers model config with ``rope_parameters``.
        rope_parameters: a flat rope dict, or one nested by layer type.
        max_position_embeddings: the value for ``config.max_position_embeddings``.
    """
    params = copy.deepcopy(rope_parameters)
    current = getattr(config, "rope_parameters", None) or {}
    nested = _nested_keys(config, current)
    if nested and not _nested_keys(config, params):
        # a flat dict for a per-layer-type config scales the global layers only
        params = {
            key: copy.deepcopy(current[key] if key in _LOCAL_LAYER_TYPES or current[key] is None else params)
            for key in nested
        }
    config.rope_parameters = params
    config.max_position_embeddings = int(max_position_embeddings)
    flat = params if not nested else params.get("full_attention", {})
    # Phi-3 keeps the pre-training length outside rope_parameters and lets it win over the
    # dict's value during standardisation, so both have to agree
    if "original_max_position_embeddings" in flat and hasattr(config, "original_max_position_embeddings"):
        config.original_max_position_embeddings = int(flat["original_max_position_embeddings"])
