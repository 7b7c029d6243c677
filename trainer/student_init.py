"""A student's starting point: its model (a directory, a hub name or a fresh tiny model) and tokenizer.

What the ``init`` and ``tokenizer`` keys of a student's config (trainer/config.py) turn into
before training starts: an fp32 transformers causal LM in train mode, and the tokenizer the
trainer compares against the cache's (or None when the student has none).

    from longkd.trainer.student_init import build_model, load_tokenizer
    model = build_model({"arch": "llama", "hidden_size": 64, "seed": 0}, vocab_size=128)
"""

from __future__ import annotations

import difflib
import inspect

import torch

from longkd.errors import LongkdError, one_line
from longkd.models import build_tiny_model, tiny_config
from longkd.trainer.config import StudentConfig


def build_model(init, *, vocab_size: int | None):
    """A transformers causal LM in fp32 from a model directory / hub name or a fresh-model mapping.

    Args:
        init: a path or name for ``AutoModelForCausalLM.from_pretrained``, or
            ``{"arch": ..., "seed": 0, **tiny_config keywords}`` for a fresh longkd/models.py model.
        vocab_size: default ``vocab_size`` of a fresh model (the cache's embedding size).

    Returns:
        The model (fp32, train mode).

    Raises:
        LongkdError: a model directory that does not load.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(init, dict):
        kwargs = dict(init)
        arch, seed = kwargs.pop("arch"), kwargs.pop("seed", 0)
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        try:
            config = tiny_config(arch, **kwargs)
        except (TypeError, ValueError) as err:
            raise LongkdError(f"student init mapping {init!r} is not a valid model config: {err}") from err
        # torch.manual_seed inside build_tiny_model is harmless: students get private RNGs later
        model = build_tiny_model(config, seed)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise LongkdError(f"student model {init!r} could not be loaded: {one_line(err)}") from err
    return model.float().train()


# Keys every transformers config takes into its rope_parameters, though its class does not declare them.
_ROPE_KEYS = {"rope_theta", "rope_scaling", "partial_rotary_factor"}


def init_keys(arch: str) -> set[str]:
    """The keys a fresh-model ``init`` mapping may hold for ``arch``: ``arch`` and ``seed``,
    longkd/models.py ``tiny_config``'s own keywords, the fields of the architecture's
    transformers config class and the rope keys every config accepts."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(arch))
    fields = set(inspect.signature(config_class.__init__).parameters) - {"self", "args", "kwargs"}
    fields |= set(getattr(config_class, "attribute_map", {}))
    return fields | _TINY_KEYS | _ROPE_KEYS | {"arch", "seed"}


_TINY_KEYS = set(inspect.signature(tiny_config).parameters) - {"arch", "overrides"}


def check_init_keys(arch: str, keys, where: str = "init") -> None:
    """Refuse an unknown key in a fresh-model ``init`` mapping (a typo would train a default model).

    Args:
        arch: the mapping's ``arch`` (one of longkd/models.py ``ARCHITECTURES``).
        keys: the mapping's keys.
        where: the mapping's place in the config, for the message.

    Raises:
        LongkdError: naming the key, the closest valid one and which keys are valid.
    """
    valid = init_keys(arch)
    for key in keys:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), sorted(valid), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LongkdError(
            f"{where}.{key}: unknown key for a fresh {arch} model; {hint}valid keys are arch, seed, "
            f"{', '.join(sorted(_TINY_KEYS))} and the fields of transformers' {arch} config"
        )


def load_tokenizer(cfg: StudentConfig):
    """The student's tokenizer: ``cfg.tokenizer``, else the one in its init directory, else None."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (cfg.init if isinstance(cfg.init, str) else None)
    if source is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        if cfg.tokenizer:  # asked for explicitly: failing is the user's problem to hear about
            raise LongkdError(
                f"student {cfg.name!r}: tokenizer {cfg.tokenizer!r} could not be loaded: {err}"
            ) from err
        return None
