"""Prompts and scoring of the text retrieval evals: passkey and RULER-style needles.

What a model reads in ``longkd eval --task passkey|needle`` and how its answer is scored, kept
apart from loading models and running the length x depth grid (:mod:`longkd.tools.evals`), so
the templates and scorers can be checked without a model:

- ``passkey``: the Mohtashami & Jaggi (2023) prompt: a pass key hidden in repeated filler,
  scored 100 when the key appears in the answer.
- ``needle``: RULER's NIAH tasks (Hsieh et al. 2024) with the repeated-sentence haystack:
  ``single``, ``multikey`` (distractor needles with other keys) and ``multivalue`` (several
  values for one key); keys and values as numbers, words or uuids; RULER's string-match
  score (fraction of the expected values found in the answer, x100).

Each prompt is a :class:`Probe` whose ``build(n)`` is its text with ``n`` filler sentences;
:func:`fit_prompt` picks the largest ``n`` that fits a token budget with the model's own
tokenizer (filler is added one sentence at a time).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from longkd.errors import LongkdError

NEEDLE_VARIANTS = ("single", "multikey", "multivalue")
NEEDLE_TYPES = ("number", "word", "uuid")

# The haystack of both tasks: Mohtashami & Jaggi's garbage block, which RULER reuses as its
# "noise" haystack. Added one sentence at a time so a prompt fits its length to ~5 tokens.
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"
RULER_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
RULER_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
RULER_QUESTION = (
    "What are all the special magic {kind} for {key} mentioned in the provided text? "
    "The special magic {kind} for {key} mentioned in the provided text are"
)
# Word keys are adjective-noun pairs and word values nouns (RULER draws them from wonderwords;
# a fixed list keeps prompts reproducible offline). None of these words occurs in the filler.
_ADJECTIVES = (
    "ancient", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "kind", "lively", "mighty", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy",
    "upset", "vast", "wooden", "young", "zealous", "bitter", "clever", "damp", "fierce", "grumpy",
)  # fmt: skip
_NOUNS = (
    "anchor", "basket", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "ladder", "magnet", "needle", "orchard", "pencil", "quarry", "rocket",
    "saddle", "tractor", "umbrella", "violin", "walrus", "xylophone", "yogurt", "zipper",
    "bookend", "cabinet", "lantern", "meadow", "napkin", "oyster", "pillow", "riddle", "spinach",
    "teapot", "tunnel", "velvet", "whistle", "blanket",
)  # fmt: skip
_KIND = {"number": "numbers", "word": "words", "uuid": "uuids"}


@dataclass
class NeedleConfig:
    """Settings of the RULER-style needle task.

    Attributes:
        variant: ``single``, ``multikey`` (``num_keys`` needles with different keys, one
            queried) or ``multivalue`` (``num_values`` needles with the queried key).
        key_type: what keys look like: ``word`` (adjective-noun), ``number`` or ``uuid``.
        value_type: what values look like: ``number`` (7 digits), ``word`` or ``uuid``.
        num_keys: needles in a multikey prompt, the queried one included.
        num_values: values of the queried key in a multivalue prompt.
    """

    variant: str = "single"
    key_type: str = "word"
    value_type: str = "number"
    num_keys: int = 4
    num_values: int = 4

    def __post_init__(self):
        if self.variant not in NEEDLE_VARIANTS:
            raise LongkdError(
                f"--needle-variant {self.variant!r} is unknown; use one of {', '.join(NEEDLE_VARIANTS)}"
            )
        for name, value in (("--key-type", self.key_type), ("--value-type", self.value_type)):
            if value not in NEEDLE_TYPES:
                raise LongkdError(f"{name} {value!r} is unknown; use one of {', '.join(NEEDLE_TYPES)}")
        if self.num_keys < 2 and self.variant == "multikey":
            raise LongkdError(f"--needle-keys must be at least 2 for multikey, got {self.num_keys}")
        if self.num_values < 2 and self.variant == "multivalue":
            raise LongkdError(f"--needle-values must be at least 2 for multivalue, got {self.num_values}")


@dataclass
class Probe:
    """One retrieval prompt: ``build(n)`` is its text with ``n`` filler sentences."""

    build: Callable[[int], str]
    answers: list[str]
    score: Callable[[str], float]


# --------------------------------------------------------------------------- scoring


def score_passkey(output: str, key: str) -> float:
    """100 when ``key`` appears in ``output`` as a whole number (``123`` is not in ``51234``), else 0."""
    return 100.0 if re.search(rf"(?<!\d){re.escape(key)}(?!\d)", output) else 0.0


def string_match_all(output: str, refs: Sequence[str]) -> float:
    """RULER's score: the percentage of ``refs`` found (case-insensitive substring) in ``output``."""
    pred = output.lower()
    return 100.0 * sum(ref.lower() in pred for ref in refs) / len(refs)


# --------------------------------------------------------------------------- prompts


def _filler(n: int) -> list[str]:
    return [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n)]


def _insert(n: int, needles: Sequence[tuple[float, str]]) -> str:
    """``n`` filler sentences with each needle inserted at ``round(depth * n)`` sentences in."""
    pieces = _filler(n)
    # Insert from the deepest so earlier indices stay valid; stable for equal indices.
    slots = sorted(((round(d * n), i, text) for i, (d, text) in enumerate(needles)), reverse=True)
    for slot, _, text in slots:
        pieces.insert(slot, text)
    return " ".join(pieces)


def passkey_probe(depth: float, rng: random.Random) -> Probe:
    """The Mohtashami & Jaggi passkey prompt with a key in [1, 50000] at ``depth`` (0-1)."""
    key = str(rng.randint(1, 50000))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."

    def build(n: int) -> str:
        return "\n".join([PASSKEY_INTRO, _insert(n, [(depth, info)]), PASSKEY_QUESTION])

    return Probe(build, [key], lambda out: score_passkey(out, key))


def _draw(kind: str, rng: random.Random, used: set[str], *, as_key: bool) -> str:
    for _ in range(1000):
        if kind == "number":
            text = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "uuid":
            text = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif as_key:
            text = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        else:
            text = rng.choice(_NOUNS)
        if text not in used:
            used.add(text)
            return text
    raise LongkdError(f"cannot draw enough distinct {kind} needles; use fewer keys or values")


def needle_probe(depth: float, rng: random.Random, cfg: NeedleConfig) -> Probe:
    """A RULER NIAH prompt whose (first) queried needle sits at ``depth`` (0-1).

    Distractor needles (multikey) and the further values of the queried key (multivalue) go at
    depths drawn from ``rng``.
    """
    used: set[str] = set()
    kind = _KIND[cfg.value_type]
    key = _draw(cfg.key_type, rng, used, as_key=True)
    n_values = cfg.num_values if cfg.variant == "multivalue" else 1
    values = [_draw(cfg.value_type, rng, used, as_key=False) for _ in range(n_values)]
    needles = [(depth, RULER_NEEDLE.format(kind=kind, key=key, value=v)) for v in values[:1]]
    needles += [(rng.random(), RULER_NEEDLE.format(kind=kind, key=key, value=v)) for v in values[1:]]
    if cfg.variant == "multikey":
        for _ in range(cfg.num_keys - 1):
            other_key = _draw(cfg.key_type, rng, used, as_key=True)
            other_value = _draw(cfg.value_type, rng, used, as_key=False)
            needles.append((rng.random(), RULER_NEEDLE.format(kind=kind, key=other_key, value=other_value)))
    intro = RULER_INTRO.format(kind=kind)
    question = RULER_QUESTION.format(kind=kind, key=key)

    def build(n: int) -> str:
        return "\n".join([intro, _insert(n, needles), question])

    return Probe(build, values, lambda out: string_match_all(out, values))


def fit_prompt(tokenizer, build: Callable[[int], str], length: int) -> tuple[list[int], int]:
    """Token ids of ``build(n)`` for the largest ``n`` whose prompt has at most ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer (special tokens such as BOS are added and counted).
        build: the prompt text with ``n`` filler sentences; longer for larger ``n``.
        length: the token budget.

    Returns:
        ``(ids, n)``: the ids (``len(ids) <= length``) and the number of filler sentences.

    Raises:
        LongkdError: even the prompt without filler exceeds ``length``.
    """

    def count(n: int) -> list[int]:
        return tokenizer(build(n), add_special_tokens=True).input_ids

    base = count(0)
    if len(base) > length:
        raise LongkdError(
            f"length {length} is too short for this prompt (it needs {len(base)} tokens without filler); "
            "use larger --lengths"
        )
    probe = 16
    per = max((len(count(probe)) - len(base)) / probe, 1e-3)  # tokens per filler sentence
    # lo always fits, hi (once known) never does. Tokenization is monotone in n but not exactly
    # linear, so guess from the tokens-per-sentence rate, then close the bracket.
    lo, best, hi = 0, base, None
    n = max(int((length - len(base)) / per), 1)
    while hi is None or hi - lo > 1:
        ids = count(n)
        if len(ids) <= length:
            lo, best = n, ids
            n = n + max(int((length - len(ids)) / per), 1)
        else:
            hi = n
            n = n - max(int((len(ids) - length) / per), 1)
        if hi is not None:
            n = min(max(n, lo + 1), hi - 1)
            if hi - lo > 2 and n in (lo + 1, hi - 1):
                n = (lo + hi) // 2  # a guess stuck at an edge: bisect instead
    return best, lo
