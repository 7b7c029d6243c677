"""Settings of ``longkd cache build``: the options, the config file and their validation.

The same options come from three places (defaults, a YAML or TOML ``--config`` file, the
flags typed on the command line) and the benchmark tools call the builder without a command
line at all, so merging and checking them is one step of its own, ahead of any teacher or
dataset work: :func:`resolve_settings` returns a :class:`BuildSettings` that the builder
(cache/build.py) can trust, or raises one clear error naming the bad setting.
:meth:`BuildSettings.content_settings` is the subset recorded in ``build.json``, the record a
resumed build is compared against.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from longkd.cache import format as fmt
from longkd.cache.writer import parse_size
from longkd.errors import LongkdError

DEFAULT_TOP_K = 64
MAX_DRAWS = 65535  # counts are uint16


@dataclass
class BuildSettings:
    """Every option of ``longkd cache build`` (the CLI flags, dashes as underscores)."""

    teacher: str | None = None
    data: str | None = None
    out: str | None = None
    window: int | None = None
    text_field: str = "text"
    input_ids_field: str | None = None
    split: str = "train"
    streaming: bool = False
    shuffle: bool = False
    max_sample_tokens: int | None = None
    overflow: str = "split"
    position_mode: str = "continuous"
    no_eos: bool = False
    tail: str = "drop"
    top_k: int | None = None
    sample_draws: int | None = None
    min_mass: float | None = None
    min_prob: float | None = None
    temperature: float = 1.0
    batch_size: int = 1
    chunk_size: int = 1024
    dtype: str = "float32"
    device: str | None = None
    tensor_parallel: int = 1
    device_map: str | None = None
    shard_size: str | int = "256MB"
    logprob_dtype: str = "float32"
    encoding: str = "compact"
    compression_level: int | None = None
    seed: int = 0
    max_windows: int | None = None
    trust_remote_code: bool = False
    allow_extrapolation: bool = False
    rank: int = field(default=0, metadata={"internal": True})
    world: int = field(default=1, metadata={"internal": True})

    @property
    def selection(self) -> dict:
        """The manifest's ``selection``: sampled, adaptive (top-k with ``--min-mass`` and/or
        ``--min-prob``; the rule not given is null) or top-k."""
        if self.sample_draws is not None:
            return {"mode": "sampled", "draws": int(self.sample_draws)}
        k = int(self.top_k if self.top_k is not None else DEFAULT_TOP_K)
        if self.min_mass is not None or self.min_prob is not None:
            return {"mode": "adaptive", "k": k, "min_mass": self.min_mass, "min_prob": self.min_prob}
        return {"mode": "topk", "k": k}

    def content_settings(self) -> dict:
        """The settings that determine the cache's bytes (recorded in build.json)."""
        return {
            "teacher": self.teacher,
            "data": self.data,
            "text_field": None if self.input_ids_field else self.text_field,
            "input_ids_field": self.input_ids_field,
            "split": self.split,
            "streaming": self.streaming,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "window": self.window,
            "max_sample_tokens": self.max_sample_tokens,
            "overflow": self.overflow,
            "position_mode": self.position_mode,
            "add_eos": not self.no_eos,
            "tail": self.tail,
            "selection": self.selection,
            "temperature": float(self.temperature),
            # Sampled draws depend on the chunking (one multinomial call per chunk).
            "chunk_size": self.chunk_size,
            "dtype": self.dtype,
            "logprob_dtype": self.logprob_dtype,
            "encoding": self.encoding,
            "compression_level": self.compression_level,
            "shard_size": parse_size(self.shard_size),
            "max_windows": self.max_windows,
            # The rank is per process, not per cache: every rank shares one build.json.
            "world": self.world,
            # A group's merged shards round differently, and draw another (equally distributed) stream.
            "tensor_parallel": self.tensor_parallel,
        }


CHOICES = {
    "overflow": ("split", "truncate"),
    "position_mode": ("continuous", "reset"),
    "tail": ("drop", "pad"),
    "dtype": ("float32", "bfloat16", "float16"),
    "logprob_dtype": fmt.LOGPROB_DTYPES,
    "encoding": tuple(fmt.ENCODING_PRESETS),
}
_FIELDS = {f.name: f for f in dataclasses.fields(BuildSettings) if not f.metadata.get("internal")}
_INT_FIELDS = {"window", "max_sample_tokens", "top_k", "sample_draws", "batch_size", "chunk_size",
               "compression_level", "seed", "max_windows", "tensor_parallel"}  # fmt: skip
_BOOL_FIELDS = {"streaming", "shuffle", "no_eos", "trust_remote_code", "allow_extrapolation"}
_FLOAT_FIELDS = {"temperature", "min_mass", "min_prob"}
# The options that make up the selection: flags typed on the command line replace the file's.
_SELECTION_FIELDS = ("top_k", "sample_draws", "min_mass", "min_prob")


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML or TOML file of build settings (keys as the flags, dashes or underscores).

    Raises:
        LongkdError: unreadable file, not a mapping, or an unknown key (named).
    """
    p = Path(path)
    if not p.is_file():
        raise LongkdError(f"config file {p} not found")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(p.read_text())
        else:
            import yaml

            raw = yaml.safe_load(p.read_text()) or {}
    except Exception as err:  # noqa: BLE001 (any parse error is the user's file)
        raise LongkdError(f"config file {p} could not be parsed: {err}") from err
    if not isinstance(raw, dict):
        raise LongkdError(f"config file {p} must be a mapping of build settings")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise LongkdError(
                f"config file {p}: unknown key {key!r}; valid keys are the `longkd cache build` flags"
            )
        out[name] = value
    return out


def resolve_settings(explicit: dict, config: dict | None = None) -> BuildSettings:
    """Merge defaults < config file < explicit flags and validate the result.

    Args:
        explicit: settings given on the command line (only those the user typed).
        config: settings from ``--config``.

    Raises:
        LongkdError: a missing required setting, a bad value or conflicting selections.
    """
    config = dict(config or {})
    if any(name in explicit for name in _SELECTION_FIELDS):
        # Selection flags on the command line replace whatever selection the file had.
        for name in _SELECTION_FIELDS:
            config.pop(name, None)
    merged = {**config, **explicit}
    for name, value in merged.items():
        merged[name] = _check_type(name, value)
    settings = BuildSettings(**merged)
    for name in ("teacher", "data", "out", "window"):
        if getattr(settings, name) is None:
            raise LongkdError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    for name, choices in CHOICES.items():
        if getattr(settings, name) not in choices:
            raise LongkdError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
    if settings.top_k is not None and settings.sample_draws is not None:
        raise LongkdError("--top-k and --sample-draws are mutually exclusive; choose one selection")
    if settings.sample_draws is not None and (settings.min_mass is not None or settings.min_prob is not None):
        raise LongkdError(
            "--min-mass and --min-prob cut top-k rows; they do not go with --sample-draws (use --top-k)"
        )
    if settings.min_mass is not None and not 0 < settings.min_mass <= 1:
        raise LongkdError(f"--min-mass must lie in (0, 1] (for example 0.999), got {settings.min_mass}")
    if settings.min_prob is not None and not 0 < settings.min_prob < 1:
        raise LongkdError(f"--min-prob must lie in (0, 1) (for example 1e-4), got {settings.min_prob}")
    for name in (
        "window",
        "top_k",
        "sample_draws",
        "batch_size",
        "chunk_size",
        "max_windows",
        "max_sample_tokens",
        "tensor_parallel",
    ):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise LongkdError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if settings.sample_draws is not None and settings.sample_draws > MAX_DRAWS:
        raise LongkdError(
            f"--sample-draws {settings.sample_draws} exceeds {MAX_DRAWS} (counts are stored as uint16)"
        )
    if settings.encoding != "plain" and settings.logprob_dtype != "float32":
        raise LongkdError(
            f"--logprob-dtype {settings.logprob_dtype} applies to --encoding plain; --encoding "
            f"{settings.encoding} stores log-probs on its own grid (leave --logprob-dtype out)"
        )
    if settings.device_map not in (None, "auto"):
        raise LongkdError(f"--device-map must be auto, got {settings.device_map!r}")
    if settings.device_map is not None and settings.tensor_parallel > 1:
        raise LongkdError("--device-map auto and --tensor-parallel exclude each other; choose one")
    if settings.device_map is not None and settings.device not in (None, "auto"):
        raise LongkdError("--device-map auto places the teacher itself; leave out --device")
    if not settings.temperature > 0:
        raise LongkdError(f"--temperature must be positive, got {settings.temperature}")
    parse_size(settings.shard_size)
    return settings


def _check_type(name: str, value):
    flag = f"--{name.replace('_', '-')}"
    if value is None:
        return None
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise LongkdError(f"{flag} must be true or false, got {value!r}")
        return value
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LongkdError(f"{flag} must be an integer, got {value!r}")
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LongkdError(f"{flag} must be a number, got {value!r}")
        return float(value)
    if name == "shard_size":
        return value if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return str(value)
