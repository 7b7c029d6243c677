"""A synthetic world of facts, queries and repeats, small enough for a CPU demo.

Long-context distillation needs a task whose answer lies far back in the context and a
model small enough to train in minutes. Here documents are of two kinds:

- fact documents state facts (``FACT k v``) and later ask for them (``QUERY k v``: after
  ``QUERY k`` the next token is ``v``), with a little filler between them (multi-query
  associative recall);
- repeat documents are a random run of tokens repeated until the document ends.

Answering a query is an induction step: find the earlier ``k`` and copy what followed it,
so retrieval accuracy as a function of the fact-to-query distance measures how far back a
model can use its context. Repeat documents teach the same induction step densely (every
token after the first period is predictable), which is what lets a tiny model learn
retrieval in a few hundred steps instead of never (docs/toy.md).

Everything is token ids over the word tokenizer of ``tools/random_models.py`` (id ``i`` is the word
``t{i}``), deterministic for a seed:

    from longkd.tools.toy_world import ToyWorld, make_probes, retrieval_accuracy, short_documents
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
from longkd.tools.random_models import SPECIAL_TOKENS, build_word_tokenizer, ids_to_text

FACT_LEN = 3  # FACT k v
QUERY_LEN = 3  # QUERY k v
MIN_DISTANCE = FACT_LEN  # a query may start right after its fact
MARKERS = 2  # FACT, QUERY


@dataclass(frozen=True)
class ToyWorld:
    """The vocabulary layout and the shape of the documents.

    Ids ``0-3`` are the tokenizer's specials (``<pad> <s> </s> <unk>``), then the markers
    ``FACT QUERY``, then ``num_keys`` key ids, ``num_values`` value ids, and every remaining
    id is filler.

    Args:
        vocab_size: tokenizer and model vocabulary.
        num_keys: distinct keys; a document states each key at most once.
        num_values: distinct values; chance level of retrieval is ``1 / num_values``.
        filler_prob: in fact documents, the chance that the next item is one filler token
            rather than a fact or a query.
        repeat_share: the share of documents that are repeat documents.
        min_period: the shortest run a repeat document repeats.

    Raises:
        LongkdError: fewer than 8 filler ids would remain, or a share outside [0, 1).
    """

    vocab_size: int = 64
    num_keys: int = 16
    num_values: int = 16
    filler_prob: float = 0.2
    repeat_share: float = 0.5
    min_period: int = 4

    def __post_init__(self):
        if self.num_keys < 2 or self.num_values < 2:
            raise LongkdError(f"toy world needs at least 2 keys and 2 values, got {self.num_keys} and "
                              f"{self.num_values}")
        if self.num_filler < 8:
            raise LongkdError(
                f"toy world vocab_size {self.vocab_size} leaves {self.num_filler} filler ids for "
                f"{self.num_keys} keys and {self.num_values} values; raise vocab_size or use fewer keys"
            )
        for name in ("filler_prob", "repeat_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LongkdError(f"toy world {name} must lie in [0, 1), got {getattr(self, name)}")
        if self.min_period < 2:
            raise LongkdError(f"toy world min_period must be at least 2, got {self.min_period}")

    @property
    def fact_id(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def query_id(self) -> int:
        return len(SPECIAL_TOKENS) + 1

    @property
    def key_ids(self) -> np.ndarray:
        start = len(SPECIAL_TOKENS) + MARKERS
        return np.arange(start, start + self.num_keys)

    @property
    def value_ids(self) -> np.ndarray:
        start = len(SPECIAL_TOKENS) + MARKERS + self.num_keys
        return np.arange(start, start + self.num_values)

    @property
    def filler_ids(self) -> np.ndarray:
        return np.arange(len(SPECIAL_TOKENS) + MARKERS + self.num_keys + self.num_values, self.vocab_size)

    @property
    def content_ids(self) -> np.ndarray:
        """Keys, values and filler: what repeat documents are made of."""
        return np.arange(len(SPECIAL_TOKENS) + MARKERS, self.vocab_size)

    @property
    def num_filler(self) -> int:
        return self.vocab_size - len(SPECIAL_TOKENS) - MARKERS - self.num_keys - self.num_values

    @property
    def chance(self) -> float:
        """Retrieval accuracy of a model that guesses a value uniformly."""
        return 1.0 / self.num_values

    def tokenizer(self):
        """The word tokenizer for this vocabulary (``tools/random_models.py``)."""
        return build_word_tokenizer(self.vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Fact:
    """A fact and one query of it: ``FACT key value`` at ``fact_pos`` and ``QUERY key value``
    at ``query_pos`` (positions of the marker tokens). A fact queried twice gives two."""

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
    """Tokens ``dst .. dst + length - 1`` repeat ``src .. src + length - 1``; they are
    predictable by induction from ``dst + 1`` on (the first one follows a token seen once)."""

    src: int
    dst: int
    length: int


@dataclass
class ToyDocument:
    """One generated document.

    Attributes:
        input_ids: int64[L] token ids.
        facts: its queries with the facts they ask for, in query order.
        copies: its repeated spans (repeat documents).
    """

    input_ids: np.ndarray
    facts: list[Fact] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def text(self) -> str:
        """The document as words of the toy tokenizer."""
        return ids_to_text(self.input_ids)


class _FactWriter:
    """Appends facts, queries and filler to a token list (multi-query associative recall).

    Each item is one filler token (probability ``world.filler_prob``), a new fact for a key
    not yet stated, or a query of a key already stated (chosen uniformly, so in a long
    document distances spread over the whole length); facts and queries are equally likely
    while keys remain. ``exclude`` keys are never stated (a probe keeps its target key).
    """

    def __init__(self, world: ToyWorld, rng: np.random.Generator, exclude: Sequence[int] = ()):
        self.world, self.rng = world, rng
        self.ids: list[int] = []
        self.facts: list[Fact] = []
        self.stated: dict[int, tuple[int, int]] = {}  # key -> (fact position, value)
        excluded = {int(k) for k in exclude}
        self.unused = [int(k) for k in rng.permutation(world.key_ids) if int(k) not in excluded]

    def fact(self, key: int, value: int) -> None:
        self.stated[key] = (len(self.ids), value)
        self.ids += [self.world.fact_id, key, value]

    def write(self, length: int) -> None:
        """Append exactly ``length`` tokens."""
        w, rng = self.world, self.rng
        end = len(self.ids) + length
        while len(self.ids) < end:
            room = end - len(self.ids)
            if room < FACT_LEN or rng.random() < w.filler_prob or not (self.stated or self.unused):
                self.ids.append(int(rng.choice(w.filler_ids)))
            elif self.stated and (not self.unused or rng.random() < 0.5):
                keys = list(self.stated)
                key = keys[int(rng.integers(len(keys)))]
                pos, value = self.stated[key]
                self.facts.append(Fact(key, value, pos, len(self.ids)))
                self.ids += [w.query_id, key, value]
            else:
                self.fact(self.unused.pop(), int(rng.choice(w.value_ids)))


def fact_document(world: ToyWorld, length: int, rng: np.random.Generator) -> ToyDocument:
    """A fact document of exactly ``length`` tokens (see :class:`_FactWriter`)."""
    writer = _FactWriter(world, rng)
    writer.write(length)
    return ToyDocument(np.asarray(writer.ids, dtype=np.int64), writer.facts)


def repeat_document(world: ToyWorld, length: int, rng: np.random.Generator) -> ToyDocument:
    """A run of random content tokens (keys, values, filler), ``min_period .. length // 2``
    long, repeated until the document is ``length`` tokens long."""
    hi = max(world.min_period, length // 2)
    period = int(rng.integers(world.min_period, hi + 1))
    run = rng.choice(world.content_ids, size=period)
    ids = np.resize(run, length).astype(np.int64)
    copies = [Copy(0, period, length - period)] if length > period else []
    return ToyDocument(ids, copies=copies)


def document(world: ToyWorld, length: int, rng: np.random.Generator) -> ToyDocument:
    """A repeat document with probability ``world.repeat_share``, else a fact document."""
    if length < 2 * FACT_LEN:
        raise LongkdError(f"toy documents need at least {2 * FACT_LEN} tokens, got {length}")
    if rng.random() < world.repeat_share:
        return repeat_document(world, length, rng)
    return fact_document(world, length, rng)


def long_documents(world: ToyWorld, n: int, length: int, seed: int = 0) -> list[ToyDocument]:
    """``n`` documents of exactly ``length`` tokens, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    return [document(world, length, rng) for _ in range(n)]


def short_documents(world: ToyWorld, n: int, max_length: int, seed: int = 0,
                    min_length: int | None = None) -> list[ToyDocument]:
    """``n`` documents of ``min_length .. max_length`` tokens (default from ``max_length // 2``),
    deterministic for ``seed``."""
    lo = max(2 * FACT_LEN, min_length or max_length // 2)
    if max_length < lo:
        raise LongkdError(f"short toy documents need max_length >= {lo}, got {max_length}")
    rng = np.random.default_rng(seed)
    return [document(world, int(rng.integers(lo, max_length + 1)), rng) for _ in range(n)]


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
    seed: int = 0,
) -> ProbeSet:
    """Fact documents where ``QUERY key`` comes exactly ``d`` tokens after ``FACT key value``.

    Each probe ends with the query's key, so the answer is the model's prediction after the
    last token. Around the target fact the probe reads like a training fact document: other
    facts (distractors, never the target key), queries of them and filler.

    Args:
        world: the vocabulary layout.
        distances: fact-to-query distances d, each at least 3.
        per_distance: probes per distance.
        length: T for every probe; default ``d + 2 + lead`` per distance, so a short-context
            model can be probed at short distances within its context.
        lead: tokens before the target fact when ``length`` is None.
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
            key, value = int(rng.choice(world.key_ids)), int(rng.choice(world.value_ids))
            writer = _FactWriter(world, rng, exclude=[key])
            writer.write(T - 2 - d)  # before the fact
            writer.ids += [world.fact_id, key, value]
            writer.write(d - FACT_LEN)  # between the fact and its query
            writer.ids += [world.query_id, key]
            rows[i], answers[i] = writer.ids, value
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
