"""A synthetic world of facts, queries and copies, small enough for a CPU demo.

Long-context distillation needs a task whose answer lies far back in the context and a
model small enough to train in minutes. Here documents are filler text in which facts are
stated (``FACT k v``) and later asked for (``QUERY k v``: after ``QUERY k`` the next token
is ``v``), plus copy structure (a span of earlier text repeated after a ``COPY`` marker).
Answering a query is an induction step: find the earlier ``k`` and copy what followed it,
so retrieval accuracy as a function of the fact-to-query distance measures how far back a
model can use its context.

Everything is token ids over the word tokenizer of ``tools/tiny.py`` (id ``i`` is the word
``t{i}``), deterministic for a seed:

    from longkd.tools.toy import ToyWorld, make_probes, retrieval_accuracy, short_documents
    world = ToyWorld()
    docs = short_documents(world, 1000, max_length=64, seed=0)   # for a cache build
    probes = make_probes(world, [8, 32, 128, 500], per_distance=64, seed=1)
    retrieval_accuracy(model, probes)                             # {8: 0.98, 32: ...}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from longkd.errors import LongkdError
from longkd.tools.tiny import SPECIAL_TOKENS, build_word_tokenizer, ids_to_text

FACT_LEN = 3  # FACT k v
QUERY_LEN = 3  # QUERY k v
MIN_DISTANCE = FACT_LEN  # a query may start right after its fact


@dataclass(frozen=True)
class ToyWorld:
    """The vocabulary layout: which token ids are markers, keys, values and filler.

    Ids ``0-3`` are the tokenizer's specials (``<pad> <s> </s> <unk>``), then the markers
    ``FACT QUERY COPY``, then ``num_keys`` key ids, ``num_values`` value ids, and every
    remaining id is filler.

    It also fixes the shape of the documents (see :func:`long_document`): how dense facts
    and copies are, which decides how fast a tiny model learns retrieval (docs/toy.md).

    Args:
        vocab_size: tokenizer and model vocabulary.
        num_keys: distinct keys; a document states each key at most once.
        num_values: distinct values; chance level of retrieval is ``1 / num_values``.
        facts_every: a long document holds one fact per this many tokens.
        copy_prob: chance that a stretch of filler copies an earlier one (see ``_fill``).
        copy_length: inclusive range of a copied span's length in long documents.
        run_length: inclusive range of a fresh filler run's length in long documents.

    Raises:
        LongkdError: fewer than 8 filler ids would remain.
    """

    vocab_size: int = 512
    num_keys: int = 32
    num_values: int = 64
    facts_every: int = 16
    copy_prob: float = 0.7
    copy_length: tuple[int, int] = (8, 48)
    run_length: tuple[int, int] = (8, 32)

    def __post_init__(self):
        # JSON round trips (to_dict -> json -> ToyWorld(**d)) turn the ranges into lists.
        object.__setattr__(self, "copy_length", tuple(self.copy_length))
        object.__setattr__(self, "run_length", tuple(self.run_length))
        if self.num_keys < 2 or self.num_values < 2:
            raise LongkdError(f"toy world needs at least 2 keys and 2 values, got {self.num_keys} and "
                              f"{self.num_values}")
        if self.num_filler < 8:
            raise LongkdError(
                f"toy world vocab_size {self.vocab_size} leaves {self.num_filler} filler ids for "
                f"{self.num_keys} keys and {self.num_values} values; raise vocab_size or use fewer keys"
            )

    @property
    def fact_id(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def query_id(self) -> int:
        return len(SPECIAL_TOKENS) + 1

    @property
    def copy_id(self) -> int:
        return len(SPECIAL_TOKENS) + 2

    @property
    def key_ids(self) -> np.ndarray:
        start = len(SPECIAL_TOKENS) + 3
        return np.arange(start, start + self.num_keys)

    @property
    def value_ids(self) -> np.ndarray:
        start = len(SPECIAL_TOKENS) + 3 + self.num_keys
        return np.arange(start, start + self.num_values)

    @property
    def filler_ids(self) -> np.ndarray:
        return np.arange(len(SPECIAL_TOKENS) + 3 + self.num_keys + self.num_values, self.vocab_size)

    @property
    def num_filler(self) -> int:
        return self.vocab_size - len(SPECIAL_TOKENS) - 3 - self.num_keys - self.num_values

    @property
    def chance(self) -> float:
        """Retrieval accuracy of a model that guesses a value uniformly."""
        return 1.0 / self.num_values

    def tokenizer(self):
        """The word tokenizer for this vocabulary (``tools/tiny.py``)."""
        return build_word_tokenizer(self.vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Fact:
    """A fact and its query in one document: ``FACT key value`` at ``fact_pos`` and
    ``QUERY key value`` at ``query_pos`` (positions of the marker tokens)."""

    key: int
    value: int
    fact_pos: int
    query_pos: int

    @property
    def distance(self) -> int:
        """Tokens from the fact's marker to the query's marker (= from key to key)."""
        return self.query_pos - self.fact_pos

    @property
    def answer_pos(self) -> int:
        """Position of the queried value: predicted from the logits at ``answer_pos - 1``."""
        return self.query_pos + 2


@dataclass(frozen=True)
class Copy:
    """``length`` tokens at ``src`` repeated at ``dst + 1``, after a ``COPY`` marker at ``dst``."""

    src: int
    dst: int
    length: int


@dataclass
class ToyDocument:
    """One generated document.

    Attributes:
        input_ids: int64[L] token ids.
        facts: the facts stated and queried in it.
        copies: its repeated spans.
    """

    input_ids: np.ndarray
    facts: list[Fact] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def text(self) -> str:
        """The document as words of the toy tokenizer."""
        return ids_to_text(self.input_ids)


def _fill(
    world: ToyWorld,
    ids: np.ndarray,
    fixed: np.ndarray,
    rng: np.random.Generator,
    copy_prob: float,
    copy_length: tuple[int, int],
    run_length: tuple[int, int],
) -> list[Copy]:
    """Fill the positions not ``fixed`` left to right with filler runs and copies of them.

    Each step writes either a fresh run of random filler (``run_length`` tokens) or, with
    probability ``copy_prob`` when an earlier run is long enough, ``COPY`` followed by a
    sub-span of an earlier fresh run (``copy_length`` tokens). Only fresh runs are copied,
    so a copied span's continuation is never ambiguous. Dense copies are what lets a tiny
    model form induction heads (and so retrieval) in a few hundred steps (docs/toy.md).

    Returns:
        The copies written, in order.
    """
    length = len(ids)
    lo, hi = copy_length
    runs: list[tuple[int, int]] = []  # (start, length) of fresh runs of at least ``lo`` tokens
    copies: list[Copy] = []
    pos = 0
    fixed_at = np.flatnonzero(fixed)
    while pos < length:
        if fixed[pos]:
            pos += 1
            continue
        nxt = fixed_at[np.searchsorted(fixed_at, pos)] if fixed_at.size and fixed_at[-1] > pos else length
        room = int(nxt - pos)
        if room > lo and runs and rng.random() < copy_prob:
            start, run = runs[int(rng.integers(len(runs)))]
            n = int(rng.integers(lo, min(hi, run, room - 1) + 1))
            a = start + int(rng.integers(0, run - n + 1))
            ids[pos] = world.copy_id
            ids[pos + 1 : pos + 1 + n] = ids[a : a + n]
            copies.append(Copy(a, pos, n))
            pos += n + 1
        else:
            n = min(int(rng.integers(run_length[0], run_length[1] + 1)), room)
            ids[pos : pos + n] = rng.choice(world.filler_ids, size=n)
            if n >= lo:
                runs.append((pos, n))
            pos += n
    return copies


def make_document(
    world: ToyWorld,
    length: int,
    rng: np.random.Generator,
    *,
    num_facts: int,
    max_distance: int,
    min_distance: int = MIN_DISTANCE,
    copy_prob: float = 0.7,
    copy_length: tuple[int, int] = (4, 24),
    run_length: tuple[int, int] = (4, 16),
    attempts: int = 50,
) -> ToyDocument:
    """Generate one document: facts and their queries, with filler and copies around them.

    Each fact gets a distinct key and a random value; its distance is drawn uniformly from
    ``[min_distance, max_distance]`` and its position uniformly where it fits. A placement
    that collides with an earlier fact is redrawn up to ``attempts`` times and dropped after
    that, so a crowded document may hold fewer facts than asked (``doc.facts`` lists those
    placed). The gaps are then filled with filler runs and ``COPY`` spans (see ``_fill``).

    Args:
        world: the vocabulary layout.
        length: L, tokens in the document.
        rng: the random source (the document is a function of its state).
        num_facts: facts to place (at most ``world.num_keys``).
        max_distance: largest fact-to-query distance (clipped to what fits in ``length``).
        min_distance: smallest distance (at least 3, so fact and query do not overlap).
        copy_prob: chance that a gap-filling step copies an earlier run.
        copy_length: inclusive range of a copied span's length.
        run_length: inclusive range of a fresh filler run's length.
        attempts: placement retries per fact.

    Returns:
        The document, ``input_ids`` int64[L].

    Raises:
        LongkdError: ``length`` too short for a fact and its query, or too many facts.
    """
    min_distance = max(min_distance, MIN_DISTANCE)
    max_distance = min(max_distance, length - QUERY_LEN)
    if max_distance < min_distance:
        raise LongkdError(
            f"toy document of length {length} cannot hold a fact and a query {min_distance}.."
            f"{max_distance} tokens apart; use a longer document or a smaller min_distance"
        )
    if num_facts > world.num_keys:
        raise LongkdError(f"toy document asks for {num_facts} facts but the world has {world.num_keys} keys")
    ids = np.zeros(length, dtype=np.int64)
    fixed = np.zeros(length, dtype=bool)
    facts: list[Fact] = []
    for key in rng.choice(world.key_ids, size=num_facts, replace=False):
        for _ in range(attempts):
            d = int(rng.integers(min_distance, max_distance + 1))
            p = int(rng.integers(0, length - QUERY_LEN - d + 1))
            q = p + d
            if not fixed[p : p + FACT_LEN].any() and not fixed[q : q + QUERY_LEN].any():
                value = int(rng.choice(world.value_ids))
                ids[p : p + FACT_LEN] = (world.fact_id, key, value)
                ids[q : q + QUERY_LEN] = (world.query_id, key, value)
                fixed[p : p + FACT_LEN] = True
                fixed[q : q + QUERY_LEN] = True
                facts.append(Fact(int(key), value, p, q))
                break
    copies = _fill(world, ids, fixed, rng, copy_prob, copy_length, run_length)
    facts.sort(key=lambda f: f.fact_pos)
    return ToyDocument(ids, facts, copies)


def long_document(world: ToyWorld, length: int, rng: np.random.Generator) -> ToyDocument:
    """A long document of exactly ``length`` tokens: one fact per ``world.facts_every`` tokens,
    queried at distances spread uniformly over ``[3, length - 3]``; between them filler runs
    and long copies of them (the world's ``copy_prob``, ``copy_length``, ``run_length``)."""
    return make_document(
        world,
        length,
        rng,
        num_facts=min(world.num_keys, max(1, length // world.facts_every)),
        max_distance=length,
        copy_prob=world.copy_prob,
        copy_length=world.copy_length,
        run_length=world.run_length,
    )


def short_document(world: ToyWorld, max_length: int, rng: np.random.Generator,
                   min_length: int | None = None) -> ToyDocument:
    """A short document of ``min_length..max_length`` tokens (default from ``max_length // 2``):
    ``length // facts_every / 2`` to ``length // facts_every`` facts (at least one) queried
    within it (so nearby, by construction), and filler runs and
    copies as in long documents, at most a quarter of the document long."""
    lo = max(2 * FACT_LEN + 2, min_length or max_length // 2)
    if max_length < lo:
        raise LongkdError(f"short toy documents need max_length >= {lo}, got {max_length}")
    length = int(rng.integers(lo, max_length + 1))
    n = min(world.num_keys, max(1, length // world.facts_every))
    return make_document(
        world,
        length,
        rng,
        num_facts=int(rng.integers(max(1, n // 2), n + 1)),
        max_distance=length,
        copy_prob=world.copy_prob,
        copy_length=(4, max(4, min(world.copy_length[1], length // 4))),
        run_length=(4, max(4, min(world.run_length[1], length // 4))),
    )


def long_documents(world: ToyWorld, n: int, length: int, seed: int = 0) -> list[ToyDocument]:
    """``n`` long documents of exactly ``length`` tokens, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    return [long_document(world, length, rng) for _ in range(n)]


def short_documents(world: ToyWorld, n: int, max_length: int, seed: int = 0,
                    min_length: int | None = None) -> list[ToyDocument]:
    """``n`` short documents of at most ``max_length`` tokens, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    return [short_document(world, max_length, rng, min_length) for _ in range(n)]


# ----------------------------------------------------------------------------- probes


@dataclass
class ProbeBucket:
    """Probes at one distance, all of one length T so they batch together.

    Attributes:
        distance: tokens from each probe's fact to its query.
        input_ids: Long[n, T]; each row ends with ``QUERY key`` (positions T-2, T-1).
        answers: Long[n], the value the model should predict after the last token.
    """

    distance: int
    input_ids: torch.Tensor
    answers: torch.Tensor


@dataclass
class ProbeSet:
    """Retrieval probes by fact-to-query distance (see :func:`make_probes`)."""

    world: ToyWorld
    buckets: dict[int, ProbeBucket]

    @property
    def distances(self) -> list[int]:
        return sorted(self.buckets)

    @property
    def max_length(self) -> int:
        return max(b.input_ids.shape[1] for b in self.buckets.values())


def make_probes(
    world: ToyWorld,
    distances: Sequence[int],
    per_distance: int = 64,
    *,
    length: int | None = None,
    lead: int = 16,
    distractor_every: int = 32,
    seed: int = 0,
) -> ProbeSet:
    """Documents where ``QUERY key`` comes exactly ``d`` tokens after ``FACT key value``.

    Each probe ends with the query's key, so the answer is the model's prediction after
    the last token. Before it: the target fact at ``T - 2 - d``, distractor facts (other keys,
    one per ``distractor_every`` tokens) anywhere else, and filler with copies around them,
    as in long documents.

    Args:
        world: the vocabulary layout.
        distances: fact-to-query distances d, each at least 3.
        per_distance: probes per distance.
        length: T for every probe; default ``d + 2 + lead`` per distance, so a short-context
            model can be probed at short distances within its context.
        lead: filler tokens before the fact when ``length`` is None.
        distractor_every: one distractor fact per this many tokens.
        seed: the probes are a function of the arguments.

    Returns:
        A ProbeSet with one bucket per distance.

    Raises:
        LongkdError: a distance below 3 or one that does not fit in ``length``.
    """
    rng = np.random.default_rng(seed)
    buckets: dict[int, ProbeBucket] = {}
    for d in sorted({int(x) for x in distances}):
        T = length if length is not None else d + 2 + lead
        if d < MIN_DISTANCE or d > T - 2:
            raise LongkdError(f"probe distance {d} must lie in [3, {T - 2}] for probes of length {T}")
        rows = np.empty((per_distance, T), dtype=np.int64)
        answers = np.empty(per_distance, dtype=np.int64)
        for i in range(per_distance):
            ids = np.zeros(T, dtype=np.int64)
            fixed = np.zeros(T, dtype=bool)
            keys = rng.permutation(world.key_ids)
            key, value = int(keys[0]), int(rng.choice(world.value_ids))
            p = T - 2 - d
            ids[p : p + FACT_LEN] = (world.fact_id, key, value)
            ids[T - 2 :] = (world.query_id, key)
            fixed[p : p + FACT_LEN] = True
            fixed[T - 2 :] = True
            # Distractors with other keys: a model must pick the right fact, not the last one.
            for other in keys[1 : 1 + T // distractor_every]:
                for _ in range(20):
                    s = int(rng.integers(0, T - 2 - FACT_LEN + 1))
                    if not fixed[s : s + FACT_LEN].any():
                        ids[s : s + FACT_LEN] = (world.fact_id, other, rng.choice(world.value_ids))
                        fixed[s : s + FACT_LEN] = True
                        break
            # Filler and copies as in long documents, so probes look like training text.
            _fill(world, ids, fixed, rng, world.copy_prob, world.copy_length, world.run_length)
            rows[i], answers[i] = ids, value
        buckets[d] = ProbeBucket(d, torch.from_numpy(rows), torch.from_numpy(answers))
    return ProbeSet(world, buckets)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def retrieval_accuracy(
    model,
    probes: ProbeSet,
    position_ids: torch.Tensor | None = None,
    batch_size: int = 64,
) -> dict[int, float]:
    """Greedy retrieval accuracy per distance: argmax over the full vocabulary after the
    probe's last token, compared with the fact's value.

    Args:
        model: a causal LM called as ``model(input_ids=Long[B, T], position_ids=Long[B, T] | None,
            logits_to_keep=1)`` returning ``.logits`` of shape [B, T', V] (only the last row is read).
        probes: from :func:`make_probes`.
        position_ids: Long[T_max] (or [1, T_max]) positions to use instead of ``0..T-1``, cut to each
            bucket's length T (e.g. an offset ``arange(T) + 1000``); None for the model's default.
        batch_size: probes per forward.

    Returns:
        ``{distance: accuracy in [0, 1]}`` in ascending distance.

    Raises:
        LongkdError: ``position_ids`` shorter than the longest probe.
    """
    if position_ids is not None:
        position_ids = torch.as_tensor(position_ids).reshape(-1).long()
        if position_ids.numel() < probes.max_length:
            raise LongkdError(
                f"position_ids has {position_ids.numel()} entries but the probes are {probes.max_length} "
                "tokens long; pass at least that many"
            )
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        out: dict[int, float] = {}
        for d in probes.distances:
            bucket = probes.buckets[d]
            n, T = bucket.input_ids.shape
            correct = 0
            for s in range(0, n, batch_size):
                ids = bucket.input_ids[s : s + batch_size].to(device)
                kwargs = {}
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids[:T].to(device).expand(ids.shape[0], T)
                logits = model(input_ids=ids, logits_to_keep=1, **kwargs).logits[:, -1]
                pred = logits.argmax(-1).cpu()
                correct += int((pred == bucket.answers[s : s + batch_size]).sum())
            out[d] = correct / n
        return out
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


# ----------------------------------------------------------------------------- datasets


def save_documents(docs: Iterable[ToyDocument | Sequence[int]], path: str | Path, *,
                   field: str = "text") -> Path:
    """Write documents for ``longkd cache build``.

    Args:
        docs: documents (or plain id sequences).
        path: ``*.jsonl`` for JSON lines; any other path becomes a ``datasets`` directory
            (``Dataset.save_to_disk``).
        field: ``"text"`` writes words of the toy tokenizer (``t5 t17 ...``); ``"input_ids"``
            writes the ids themselves as a list column.

    Returns:
        ``path`` as a Path.

    Raises:
        LongkdError: an unknown ``field``.
    """
    if field not in ("text", "input_ids"):
        raise LongkdError(f"save_documents field must be 'text' or 'input_ids', got {field!r}")
    rows = []
    for doc in docs:
        ids = doc.input_ids if isinstance(doc, ToyDocument) else np.asarray(doc)
        rows.append({field: ids_to_text(ids)} if field == "text" else {field: [int(i) for i in ids]})
    out = Path(path)
    if out.suffix == ".jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        to_dataset(rows).save_to_disk(str(out))
    return out


def to_dataset(docs: Iterable[ToyDocument | dict], field: str = "text"):
    """A ``datasets.Dataset`` with one column (``text`` words or ``input_ids`` lists)."""
    import datasets

    rows = []
    for doc in docs:
        if isinstance(doc, dict):
            rows.append(doc)
        elif field == "text":
            rows.append({"text": doc.text()})
        else:
            rows.append({field: [int(i) for i in doc.input_ids]})
    return datasets.Dataset.from_list(rows)
