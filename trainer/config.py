"""The run config of ``longkd train``: one cache, many students, each with its own schedule.

A run config is a YAML or TOML file (see examples/train.yaml). It is read into the
dataclasses below, which hold the defaults; validation happens here, before any model is
built, so a typo fails in a second with one line naming the key
(``students[1].loss.mode: 'bukcet' is not one of bucket, renorm, sampled``). Unknown keys are
rejected by name rather than ignored, because a silently ignored ``lr`` is a wasted run.

    from longkd.trainer.config import load_config
    cfg = load_config("examples/train.yaml", overrides=["steps=200", "students.0.optimizer.lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longkd.errors import LongkdError, one_line
from longkd.kernels.loss_modes import MODE_NAMES as LOSS_MODES

LOSS_IMPLS = ("auto", "reference", "cupy")
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class LoaderConfig:
    """How the one shared window stream reads the cache (trainer/stream.py)."""

    num_workers: int = 0
    shuffle: bool = True
    shuffle_buffer: int = field(default=1024, metadata={"min": 1})
    pin_memory: bool = False
    prefetch_factor: int = field(default=2, metadata={"min": 1})


@dataclass
class LossConfig:
    """The per-student loss: ``kd_weight * sparse_kl + ce_weight * cross_entropy``.

    ``mode`` None picks ``sampled`` for a sampled cache and ``bucket`` for a top-k cache;
    ``temperature`` None uses the cache's temperature (the one its log-probs were taken at);
    another one re-tempers the teacher's stored entries (modes renorm and sampled; bucket is
    refused there, kernels/temperature.py). ``t2_scaling`` multiplies the KL by T^2, which
    keeps its gradient comparable across temperatures (a no-op at T = 1; docs/loss.md).
    ``fused`` computes both terms through the LM head in token chunks, never building the
    [N, V] logits (false: materialise them); ``chunk_size`` is the rows per chunk (None: as
    many as keep a chunk within 2^25 logits, kernels/reference.py ``chunk_rows``).
    """

    mode: str | None = field(default=None, metadata=_choices(*LOSS_MODES))
    temperature: float | None = field(default=None, metadata={"min_exclusive": 0.0})
    t2_scaling: bool = True
    kd_weight: float = field(default=1.0, metadata={"min": 0.0})
    ce_weight: float = field(default=0.0, metadata={"min": 0.0})
    skip_first_tokens: int = field(default=0, metadata={"min": 0})
    impl: str = field(default="auto", metadata=_choices(*LOSS_IMPLS))
    chunk_size: int | None = field(default=None, metadata={"min": 1})
    fused: bool = True


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine (or constant) decay, globally or restarted per phase."""

    lr: float = field(default=3e-4, metadata={"min_exclusive": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field(default=1e-8, metadata={"min_exclusive": 0.0})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    lr_schedule: str = field(default="cosine", metadata=_choices(*LR_SCHEDULES))
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    per_phase: bool = False
    clip_grad_norm: float | None = field(default=1.0, metadata={"min_exclusive": 0.0})


@dataclass
class StudentConfig:
    """One student.

    ``init`` is a Hugging Face model directory (or hub name), or a mapping describing a fresh
    model: ``{arch: llama|qwen2|gemma2|phi3, seed: 0, <any longkd/models.py tiny_config keyword
    or field of the architecture's transformers config>}`` (``vocab_size`` defaults to the
    cache's embedding size; any other key is refused by name). ``schedule`` is a rope schedule
    (trainer/rope.py: a preset mapping or a list of phases); None trains on the full cache
    window with the student's own rope. ``seed`` seeds the student's private RNG (dropout);
    None uses the run's seed.
    """

    name: str
    init: str | dict
    tokenizer: str | None = None
    schedule: dict | list | None = None
    seed: int | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class RunConfig:
    """A whole run: one cache (or several with the same window and vocabulary), many students."""

    cache: list[str]
    out: str
    students: list[StudentConfig]
    seed: int = 0
    steps: int | None = field(default=None, metadata={"min": 1})
    batch_size: int = field(default=8, metadata={"min": 1})
    grad_accum: int = field(default=1, metadata={"min": 1})
    log_every: int = field(default=10, metadata={"min": 1})
    checkpoint_every: int | None = field(default=None, metadata={"min": 1})
    keep_checkpoints: int = field(default=3, metadata={"min": 1})
    device: str = "auto"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # under torchrun: replicated (ddp) or sharded (fsdp) students; ignored in one process
    distributed: str = field(default="ddp", metadata=_choices("ddp", "fsdp"))

    def student(self, name: str) -> StudentConfig:
        """The student called ``name`` (KeyError if none)."""
        for s in self.students:
            if s.name == name:
                return s
        raise KeyError(name)


# ----------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str) -> Any:
    """``value`` checked (and lightly coerced: int -> float, list -> tuple) against type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except LongkdError as err:
                errors.append(err)
        names = " or ".join(_type_name(typing.get_origin(a) or a) for a in args if a is not type(None))
        raise LongkdError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | dict) and inner is not Any:
            value = [value]  # `cache: DIR` means a list of one
        if not isinstance(value, list | tuple):
            raise LongkdError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if inner is Any:
            return list(value)
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        inner = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(inner):
            raise LongkdError(f"{where}: expected a list of {len(inner)} numbers, got {value!r}")
        return tuple(_convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, inner)))
    if tp is bool:
        if not isinstance(value, bool):
            raise LongkdError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LongkdError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string; take any string float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LongkdError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise LongkdError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise LongkdError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is list:
        if not isinstance(value, list):
            raise LongkdError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return list(value)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _check_range(value, meta: dict, where: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise LongkdError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise LongkdError(f"{where}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise LongkdError(f"{where}: must be <= {meta['max']}, got {value!r}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise LongkdError(f"{where}: must be > {meta['min_exclusive']}, got {value!r}")


def _build(cls, data: Any, where: str):
    """An instance of dataclass ``cls`` from mapping ``data``; ``where`` prefixes error messages."""
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LongkdError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in data if str(k).replace("-", "_") not in fields]
    if unknown:
        raise LongkdError(
            f"{label}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        sub = f"{where}.{name}" if where else name
        converted = _convert(value, hints[name], sub)
        _check_range(converted, fields[name].metadata, sub)
        kwargs[name] = converted
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise LongkdError(f"{label}: missing required key {missing[0]!r}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- semantics


def _check_student(s: StudentConfig, where: str) -> None:
    if not _NAME.match(s.name):
        raise LongkdError(
            f"{where}.name: {s.name!r} must be letters, digits, '.', '_' or '-' (it names the output folder)"
        )
    if isinstance(s.init, dict):
        from longkd.models import ARCHITECTURES

        arch = s.init.get("arch")
        if arch not in ARCHITECTURES:
            raise LongkdError(f"{where}.init.arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
        seed = s.init.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LongkdError(f"{where}.init.seed: expected an integer, got {seed!r}")
        from longkd.trainer.student_init import check_init_keys  # here: it imports this module

        check_init_keys(arch, s.init, f"{where}.init")
    elif not s.init:
        raise LongkdError(f"{where}.init: give a model directory or a mapping with 'arch'")
    if s.loss.kd_weight == 0 and s.loss.ce_weight == 0:
        raise LongkdError(f"{where}.loss: kd_weight and ce_weight are both 0; nothing would be trained")
    b1, b2 = s.optimizer.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise LongkdError(f"{where}.optimizer.betas: each must lie in [0, 1), got {list(s.optimizer.betas)}")


def parse_config(data: Any) -> RunConfig:
    """Validate a config mapping (as read from YAML/TOML) into a :class:`RunConfig`.

    Raises:
        LongkdError: a wrong type, value or unknown key, naming its path (``students[1].loss.mode``).
    """
    cfg = _build(RunConfig, data, "")
    if not cfg.cache:
        raise LongkdError("cache: give at least one cache directory")
    if not cfg.students:
        raise LongkdError("students: give at least one student")
    seen = set()
    for i, s in enumerate(cfg.students):
        _check_student(s, f"students[{i}]")
        if s.name in seen:
            raise LongkdError(f"students[{i}].name: {s.name!r} is used twice; names must be unique")
        seen.add(s.name)
    return cfg


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML (.yaml/.yml/.json) or TOML (.toml) file.

    Raises:
        LongkdError: the file is missing, does not parse, or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise LongkdError(f"config file {p} not found")
    try:
        text = p.read_text()
        if p.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 (any parse error is the user's file)
        raise LongkdError(f"config file {p} could not be parsed: {one_line(err)}") from err
    if not isinstance(raw, dict):
        raise LongkdError(f"config file {p} must hold a mapping (cache, out, students, ...)")
    return raw


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` assignment to a raw config mapping, in place.

    The path is dotted; list items are selected by index (``students.0.loss.mode`` or
    ``students[0].loss.mode``) or, for students, by name (``students.fast.optimizer.lr``).
    The value is parsed as YAML (``1e-3`` a number, ``true`` a bool, ``[1, 2]`` a list).

    Raises:
        LongkdError: no ``=``, or a path that does not lead into the config.
    """
    import yaml

    if "=" not in assignment:
        raise LongkdError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in re.split(r"\.|\[|\]", key.strip()) if p]
    if not parts:
        raise LongkdError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise LongkdError(f"--set {assignment!r}: value does not parse: {err}") from err
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise LongkdError(f"--set {assignment!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(node) <= index < len(node):
            raise LongkdError(f"--set {where}: index {index} out of range (the list has {len(node)} items)")
        return index
    for j, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return j
    raise LongkdError(f"--set {where}: no item named {part!r}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config file.

    Args:
        path: a YAML or TOML file.
        overrides: ``key.path=value`` assignments applied before validation.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        LongkdError: unreadable file, bad override, or an invalid key or value (named).
    """
    data = read_config_file(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data)


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain data (for ``out/config.json`` beside the run)."""
    return dataclasses.asdict(cfg)
