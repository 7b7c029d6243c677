"""Pack tokenized samples into fixed windows of W tokens (the `concat` policy).

The finding longkd rests on is that a student gains long context from *short* samples packed
into a long window, distilled from a long-context teacher. This module is that packing step,
the one place it happens: samples (token ids, already tokenized) are concatenated in order,
each followed by an EOS id, and cut into windows of exactly W tokens. A sample that does not
fit in the rest of a window continues at the start of the next one. Every window records where
its segments (samples, sample chunks, continuations) start, so positions can restart per
sample (`reset`) or run across the window (`continuous`, the default); `position_ids_for` is
the one place positions are derived from those starts, for the producer and the readers.

Packing is a pure function of the sample sequence and the config; shuffling sample order, if
asked for, happens before (cache/data.py). Tokens are moved with numpy slices, so the cost is
per sample and per window, not per token.

    packer = Packer(PackingConfig(window=4096, eos_id=tok.eos_token_id))
    for w in packer.pack(samples):   # samples: iterable of token-id sequences
        ...                           # w.input_ids int32[W], w.segment_starts int32[S]
    print(packer.stats.summary())
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from longkd.errors import LongkdError

OVERFLOW_MODES = ("split", "truncate")
POSITION_MODES = ("continuous", "reset")
TAIL_MODES = ("drop", "pad")
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class PackingConfig:
    """How samples become windows.

    Attributes:
        window: W, tokens per window (at least 2: a window must hold an input and a target).
        max_sample_tokens: cap on a sample's own tokens (EOS not counted); None = no cap.
        overflow: what happens to a sample over the cap: ``split`` into chunks of at most
            ``max_sample_tokens`` (each chunk its own segment) or ``truncate`` it (the rest is
            counted as dropped).
        position_mode: ``continuous`` (0..W-1 across the window) or ``reset`` (restart at 0 at
            every segment start). Packing itself does not depend on it; it is validated here
            because it travels with the packing settings.
        add_eos: append ``eos_id`` after each sample (after its last chunk when split, after
            the kept part when truncated), when ``eos_id`` is not None.
        tail: the final partial window is dropped (``drop``, its tokens counted as dropped)
            or filled up with ``pad_id`` (``pad``; its ``length`` is then < W).
        pad_id: the id written into the padding of a padded last window.
        eos_id: the separator id (usually ``tokenizer.eos_token_id``); None = no separator.

    Raises:
        LongkdError: a value out of range or an unknown mode.
    """

    window: int
    max_sample_tokens: int | None = None
    overflow: str = "split"
    position_mode: str = "continuous"
    add_eos: bool = True
    tail: str = "drop"
    pad_id: int = 0
    eos_id: int | None = None

    def __post_init__(self):
        if not _is_int(self.window) or self.window < 2:
            raise LongkdError(f"packing window must be an integer >= 2, got {self.window!r}")
        if self.window > _INT32_MAX:
            raise LongkdError(f"packing window {self.window} does not fit in int32; use a smaller window")
        if self.max_sample_tokens is not None and (
            not _is_int(self.max_sample_tokens) or self.max_sample_tokens < 1
        ):
            raise LongkdError(
                f"max_sample_tokens must be a positive integer or None, got {self.max_sample_tokens!r}"
            )
        _check_choice("overflow", self.overflow, OVERFLOW_MODES)
        _check_choice("position_mode", self.position_mode, POSITION_MODES)
        _check_choice("tail", self.tail, TAIL_MODES)
        if not isinstance(self.add_eos, bool):
            raise LongkdError(f"add_eos must be true or false, got {self.add_eos!r}")
        for name in ("pad_id", "eos_id"):
            value = getattr(self, name)
            if value is None and name == "eos_id":
                continue
            if not _is_int(value) or not 0 <= value <= _INT32_MAX:
                raise LongkdError(f"{name} must be a non-negative int32 token id, got {value!r}")

    @property
    def uses_eos(self) -> bool:
        """True when an EOS id is appended after every sample."""
        return self.add_eos and self.eos_id is not None


@dataclass
class PackedWindow:
    """One packed window.

    Attributes:
        window_id: index of the window in packing order, from 0.
        input_ids: int32[W]; positions >= ``length`` hold ``pad_id``.
        length: real tokens L (L = W except a padded last window).
        segment_starts: int32[S]; offsets where a segment starts: begins with 0, strictly
            increasing, every entry < ``length``.
    """

    window_id: int
    input_ids: np.ndarray
    length: int
    segment_starts: np.ndarray


@dataclass
class PackingStats:
    """Counters of one packing run (manifest ``packing.stats``).

    While packing is under way (or when the consumer stops early), tokens still waiting in the
    current partial window are neither packed nor dropped. After a full run
    ``packed_tokens + dropped_tokens == sample_tokens + eos_tokens``.

    Attributes:
        samples: samples read, empty ones included.
        empty_samples: samples with no tokens (skipped, no EOS added).
        sample_tokens: tokens of the samples as read (before truncation, EOS not counted).
        eos_tokens: EOS ids appended.
        packed_tokens: real tokens in emitted windows (EOS included, padding excluded).
        dropped_tokens: tokens cut by truncation plus the tokens of a dropped tail.
        pad_tokens: padding in a padded last window.
        split_samples: samples over ``max_sample_tokens`` split into chunks.
        truncated_samples: samples over ``max_sample_tokens`` truncated.
        windows: windows emitted.
        window: W, for the efficiency.
    """

    samples: int = 0
    empty_samples: int = 0
    sample_tokens: int = 0
    eos_tokens: int = 0
    packed_tokens: int = 0
    dropped_tokens: int = 0
    pad_tokens: int = 0
    split_samples: int = 0
    truncated_samples: int = 0
    windows: int = 0
    window: int = field(default=0, repr=False)

    @property
    def efficiency(self) -> float:
        """Real tokens over window capacity: ``packed / (windows * W)`` (0.0 with no window)."""
        capacity = self.windows * self.window
        return self.packed_tokens / capacity if capacity else 0.0

    def to_dict(self) -> dict:
        """The manifest's ``packing.stats`` object (JSON-ready)."""
        out = asdict(self)
        out.pop("window")
        out["efficiency"] = self.efficiency
        return out

    def summary(self) -> str:
        """One human-readable line describing the run."""
        return (
            f"packing: {self.samples:,} samples ({self.empty_samples:,} empty, {self.split_samples:,} split, "
            f"{self.truncated_samples:,} truncated), {self.sample_tokens:,} sample tokens + "
            f"{self.eos_tokens:,} eos -> {self.windows:,} windows of {self.window:,}: "
            f"{self.packed_tokens:,} packed, {self.dropped_tokens:,} dropped, {self.pad_tokens:,} pad, "
            f"efficiency {100.0 * self.efficiency:.2f}%"
        )


class Packer:
    """Concatenate samples into W-token windows.

    Args:
        config: the packing settings.

    Attributes:
        config: the settings.
        stats: counters of the latest :meth:`pack` call, updated as windows are produced.
    """

    def __init__(self, config: PackingConfig):
        if not isinstance(config, PackingConfig):
            raise TypeError(f"Packer needs a PackingConfig, got {type(config).__name__}")
        self.config = config
        self.stats = PackingStats(window=config.window)

    def pack(self, samples: Iterable[Sequence[int]]) -> Iterator[PackedWindow]:
        """Pack ``samples`` lazily; a window is yielded as soon as it is full.

        Samples are pulled one at a time, so a consumer that stops early has consumed only
        the samples up to its last window (plus the one that filled it).

        Args:
            samples: token-id sequences (lists, tuples, 1-D integer arrays), in packing order.

        Returns:
            An iterator of :class:`PackedWindow`, window ids 0, 1, 2, ...

        Raises:
            LongkdError: (while iterating) a sample that is not a 1-D sequence of
                non-negative int32 token ids.
        """
        # Reset here, not inside the generator, so `stats` is fresh as soon as pack() returns.
        self.stats = PackingStats(window=self.config.window)
        return self._pack(samples, self.stats)

    def _pack(self, samples: Iterable[Sequence[int]], stats: PackingStats) -> Iterator[PackedWindow]:
        cfg = self.config
        W = cfg.window
        cap = cfg.max_sample_tokens
        eos = np.array([cfg.eos_id], dtype=np.int32) if cfg.uses_eos else None
        buf = np.empty(W, dtype=np.int32)
        fill = 0
        starts: list[int] = []

        for index, sample in enumerate(samples):
            tokens = _as_tokens(sample, index)
            n = len(tokens)
            stats.samples += 1
            stats.sample_tokens += n
            if n == 0:
                stats.empty_samples += 1
                continue
            pieces = [tokens]
            if cap is not None and n > cap:
                if cfg.overflow == "split":
                    stats.split_samples += 1
                    pieces = [tokens[i : i + cap] for i in range(0, n, cap)]
                else:
                    stats.truncated_samples += 1
                    stats.dropped_tokens += n - cap
                    pieces = [tokens[:cap]]
            if eos is not None:
                stats.eos_tokens += 1
                pieces[-1] = np.concatenate([pieces[-1], eos])

            for piece in pieces:
                # Each piece opens a segment where it starts; its continuation in the next
                # window is covered by that window's own start 0.
                if fill > 0:
                    starts.append(fill)
                pos, m = 0, len(piece)
                while pos < m:
                    take = min(W - fill, m - pos)
                    buf[fill : fill + take] = piece[pos : pos + take]
                    fill += take
                    pos += take
                    if fill == W:
                        yield self._emit(buf.copy(), W, starts, stats)
                        fill, starts = 0, []

        if fill > 0:
            if cfg.tail == "pad":
                out = np.full(W, cfg.pad_id, dtype=np.int32)
                out[:fill] = buf[:fill]
                stats.pad_tokens += W - fill
                yield self._emit(out, fill, starts, stats)
            else:
                stats.dropped_tokens += fill

    @staticmethod
    def _emit(ids: np.ndarray, length: int, starts: list[int], stats: PackingStats) -> PackedWindow:
        window = PackedWindow(
            window_id=stats.windows,
            input_ids=ids,
            length=int(length),
            segment_starts=np.array([0, *starts], dtype=np.int32),
        )
        stats.windows += 1
        stats.packed_tokens += length
        return window


def position_ids_for(window: int, segment_starts, mode: str) -> np.ndarray:
    """Position ids of a window's tokens.

    Args:
        window: W.
        segment_starts: int[S] offsets of the segments (begins with 0, strictly increasing,
            each < W).
        mode: ``continuous`` (position t is t) or ``reset`` (position restarts at 0 at every
            segment start; padding after the last segment continues its count).

    Returns:
        int64[W] positions.

    Raises:
        LongkdError: an unknown mode or malformed segment starts.
    """
    _check_choice("position_mode", mode, POSITION_MODES)
    positions = np.arange(window, dtype=np.int64)
    if mode == "continuous":
        return positions
    starts = np.asarray(segment_starts, dtype=np.int64).reshape(-1)
    if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= window:
        raise LongkdError(
            f"segment_starts must begin with 0, increase strictly and stay below the window {window}; "
            f"got {starts[:8].tolist()}{'...' if starts.size > 8 else ''}"
        )
    # base[t] = the start of the segment holding t: mark each start, carry it forward.
    base = np.zeros(window, dtype=np.int64)
    base[starts] = starts
    np.maximum.accumulate(base, out=base)
    return positions - base


def _as_tokens(sample, index: int) -> np.ndarray:
    """A sample as int32[n]; LongkdError when it is not a 1-D sequence of token ids."""
    arr = np.asarray(sample)
    if arr.size == 0:
        return np.empty(0, dtype=np.int32)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise LongkdError(
            f"sample {index} is not a 1-D sequence of integer token ids "
            f"(got dtype {arr.dtype}, shape {arr.shape}); pass token ids, not text or nested lists"
        )
    if arr.min() < 0 or arr.max() > _INT32_MAX:
        raise LongkdError(
            f"sample {index} holds token ids outside [0, {_INT32_MAX}] (min {arr.min()}, max {arr.max()})"
        )
    return arr.astype(np.int32, copy=False)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LongkdError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
