"""The column encodings of a format-3 cache: how each list column of a window becomes stored
bytes and comes back as the flat numpy array a plain column gives.

cache/format.py declares the encodings (``COLUMN_ENCODINGS``) and which columns each applies
to; cache/encodings.py holds the numpy bit-level encoders. This module is the seam between
them and cache/rows.py: :class:`ColumnCodecs` knows one cache's encoding of every column and
turns a window's flat arrays into Arrow values (``encode``) and back (``decode``), so
:func:`rows.read_columns` returns the same arrays, with the same dtypes, whatever the
encoding, and nothing above rows.py knows how a column is stored.

An encoding sees only its own column and a :class:`WindowContext` (W, V, the window's
length and each row's entry count), never the selection mode: the entry counts come from
``row_splits`` where a mode has one and are K per row otherwise. ``sorted-gaps`` and
``dictionary`` store each row's entries sorted by id, so the writer puts every entry column
(``ids`` and its companions, format.ENTRY_COLUMNS) in that order first
(:meth:`ColumnCodecs.order_entries`).

Decoding turns every failure (a blob cut short, a wrong section, a value out of range) into
:class:`CorruptColumn` naming the column; a flipped bit that keeps values in range changes the
decoded values and so the row's checksum, which covers decoded values.

    codecs = ColumnCodecs.of(manifest)
    arrays = codecs.encode(values, length)            # {column: one-row pa.Array}
    values = codecs.decode(batch, row, length)        # {column: flat numpy array}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.cache import encodings as enc
from longkd.cache import format as fmt
from longkd.errors import LongkdError

# What decoding damaged bytes with numpy can raise besides LongkdError.
_DECODE_ERRORS = (LongkdError, ValueError, IndexError, OverflowError, MemoryError, TypeError)
# The dtype each list column decodes to (the plain column's value type).
_DTYPES = {
    fmt.INPUT_IDS: np.int32,
    fmt.SEGMENT_STARTS: np.int32,
    fmt.IDS: np.int32,
    fmt.LOGPROBS: np.float32,
    fmt.COUNTS: np.uint16,
    fmt.ROW_SPLITS: np.int32,
    fmt.TARGET_LOGPROB: np.float32,
}


LOGPROB_STEPS = 68  # grid log-probs: 1/136 nat of rounding leaves room for the tail's shift
LOGPROB_MAX_ERROR = 1 / 128  # what snap_to_grid holds every decoded log-prob to
COARSE_FACTOR = 8  # grid-shift: below p = 1e-4, a grid 8 times coarser (up to 1/17 nat of rounding)


def coarse_zone(steps: int = LOGPROB_STEPS, factor: int | None = None) -> tuple[int, int]:
    """``(F, factor)``: the ``grid-shift`` coarse zone longkd writes. ``F`` leaves room for
    :func:`snap_to_grid`'s offsets (``factor / 2`` grid steps and one of rounding) below
    ``log(1e-4)``, so every entry of probability at least 1e-4 stays on the fine grid."""
    factor = COARSE_FACTOR if factor is None else factor
    if factor == 1:
        return 0, 1
    return math.ceil(-math.log(enc.COARSE_BELOW_P) * steps + factor / 2 + 1), factor


class CorruptColumn(Exception):
    """A stored column that does not decode; the message names the column and what is wrong."""


@dataclass(frozen=True)
class WindowContext:
    """What encoding and decoding one window's column may use besides its bytes.

    Attributes:
        window: W.
        vocab: V, the teacher's embedding size.
        length: the window's real tokens L.
        entry_counts: int64[W], entries per row of the entry columns (None before
            ``row_splits`` is decoded).
    """

    window: int
    vocab: int
    length: int
    entry_counts: np.ndarray | None = None


@dataclass(frozen=True)
class Encoding:
    """One column encoding: ``encode(values, context) -> bytes``, ``decode(blob, context) ->
    values`` (flat, in the plain column's dtype)."""

    name: str
    encode: Callable[[np.ndarray, WindowContext], bytes]
    decode: Callable[[np.ndarray, WindowContext], np.ndarray]


def snap_to_grid(
    logprobs: np.ndarray,
    counts: np.ndarray,
    steps: int = LOGPROB_STEPS,
    max_error: float = LOGPROB_MAX_ERROR,
    candidates: int = 64,
    shift_steps: int | None = None,
    coarse: tuple[int, int] = (0, 1),
) -> tuple[np.ndarray, np.ndarray]:
    """Grid values for rows whose decoder shifts them to reproduce the tail (:func:`renormalise`).

    Rounding each log-prob to its nearest grid point errs by at most ``1 / (2 * steps)``, but
    the decoder's shift then adds the row's mass-weighted rounding error, up to as much again
    (a row whose mass sits in one entry moves every other entry by that entry's error). So
    each row is rounded after an offset ``u``: every entry takes the grid point nearest to
    ``x + u``, and the decoder's shift ``s(u)`` brings it back. The row's decoded error is
    smallest where its mass-weighted rounding error is 0, i.e. where ``u = -s(u)``; such a
    ``u`` exists in every row (the weighted error is a sawtooth in ``u`` whose jumps all go up
    and whose mean over one grid step is 0). From ``u = 0``, two Newton steps ``u <- -s(u)`` find it in
    most rows; a row still above ``max_error`` then tries ``candidates`` offsets spread over
    one grid step and keeps the first within ``max_error``, or the best. On a grid of
    ``steps`` = 68 the rounding alone errs by at most 1/136 nat, which leaves the shift room
    to stay within 1/128.

    With a coarse zone ``(F, m)`` (``grid-shift``), grid integers beyond ``F`` take the
    nearest point of ``F + m * j`` instead; only entries of probability at least 1e-4 are
    held to ``max_error`` (the zone's own rounding is up to ``m / (2 * steps)``, and the
    shift moves the others as much as these), the sawtooth's period is ``m``
    grid steps, so the offsets spread over ``m`` steps (and each takes a Newton step), and
    ``|u|`` stays within ``m / (2 * steps)``, which keeps an entry out of the zone when its
    probability is at least ``exp(-(F - m / 2 - 1) / steps)``.

    Args:
        logprobs: float[n] the rows' log-probs (``counts[r]`` for row r), -inf allowed.
        counts: int[R] entries per row.
        steps: grid steps per nat.
        max_error: the decoded error a row is accepted at.
        candidates: the most offsets a row tries after the Newton steps.
        shift_steps: when given, the decoder's shift is :func:`quantised_shifts` at this many
            steps per nat (``grid-shift``), and the decoded error is measured with it.
        coarse: ``(F, m)``, the coarse zone (``(0, 1)``: none).

    Returns:
        ``values`` float64[n], each exactly ``-a / steps`` for an integer ``a >= 0`` (-inf
        kept), and ``tail`` float64[R], ``1 - sum(exp(x))`` of the unrounded rows.
    """
    x = np.asarray(logprobs, np.float64).reshape(-1)
    counts = np.asarray(counts, np.int64)
    tail = np.ones(len(counts), np.float64)
    nonempty = counts > 0
    if not x.size:
        return x, tail
    tail[nonempty] = 1.0 - np.add.reduceat(np.exp(x), enc.row_starts(counts)[nonempty])
    span = coarse[1]  # grid steps the offsets spread over
    offsets = [
        (j + 1) // 2 * (1 if j % 2 else -1) * span / (candidates * steps) for j in range(1, candidates)
    ]
    newton_after_offset = span > 1
    chosen_a = np.zeros_like(x)
    # The rows still searched, as a compact sub-problem: rows within max_error leave it (their
    # best grid integers written to chosen_a), so each offset costs only the rows still left.
    entry_index = np.arange(x.size)
    sub_x, sub_counts, sub_tail = x, counts, tail
    best_a, best_err = np.zeros_like(x), np.full(len(counts), np.inf)
    u, shift = np.zeros(len(counts)), np.zeros(len(counts))
    # u = 0, two Newton steps, then each offset (and, with a coarse zone, a Newton step after it)
    schedule = ["start", "newton", "newton"]
    for offset in offsets:
        schedule += [offset, "newton"] if newton_after_offset else [offset]
    for step in schedule:
        if step == "newton":
            u = np.clip(-shift, -span / (2 * steps), span / (2 * steps)) if span > 1 else -shift
        elif step != "start":
            u[:] = step
        sub_rows = np.repeat(np.arange(len(sub_counts)), sub_counts)
        a, err, shift = _snapped_rows(sub_x, sub_rows, sub_counts, sub_tail, u, steps, shift_steps, coarse)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a = np.where(better[sub_rows], a, best_a)
        done = best_err <= max_error
        if done.any():
            leaving = done[sub_rows]
            chosen_a[entry_index[leaving]] = best_a[leaving]
            stay, staying = ~done, ~leaving
            if not stay.any():
                break
            sub_x, sub_counts, sub_tail = sub_x[staying], sub_counts[stay], sub_tail[stay]
            best_a, entry_index, best_err = best_a[staying], entry_index[staying], best_err[stay]
            u, shift = u[stay], shift[stay]
    else:  # rows that no offset brought within max_error keep their best
        chosen_a[entry_index] = best_a
    return np.where(np.isfinite(x), -chosen_a / steps, -np.inf), tail


def _snapped_rows(x, rows, counts, tail, u, steps, shift_steps=None, coarse=(0, 1)):
    """Rows rounded after offsets ``u`` (one per row): their grid integers, each row's largest
    decoded error (with a coarse zone: of its entries of probability at least 1e-4) and the
    decoder's shift (float64[rows])."""
    finite = np.isfinite(x)
    y = -np.where(finite, x + u[rows], 0.0) * steps
    a = np.maximum(np.rint(y), 0.0)
    held = finite  # the entries held to max_error
    if coarse[1] > 1:
        zone, factor = coarse
        held = finite & (x >= math.log(enc.COARSE_BELOW_P))
        a = np.where(a > zone, zone + factor * np.rint((y - zone) / factor), a)
    values = np.where(finite, -a / steps, -np.inf).astype(np.float32)
    if shift_steps is None:
        decoded = renormalise(values, tail.astype(np.float32), counts)
    else:
        shifts = quantised_shifts(values, tail, counts, shift_steps)  # the exact tail: not stored
        decoded = enc.apply_shifts(values, shifts, counts, shift_steps)
    with np.errstate(invalid="ignore"):  # -inf - -inf at -inf entries, masked out
        err = np.where(held, np.abs(decoded.astype(np.float64) - x), 0.0)
        shift = np.where(finite, decoded.astype(np.float64) - values, np.nan)
        live = counts > 0
        starts = enc.row_starts(counts)[live]
        row_err = np.zeros(len(counts))
        row_err[live] = np.maximum.reduceat(err, starts)
        row_shift = np.zeros(len(counts))
        row_shift[live] = np.fmax.reduceat(shift, starts)
    return a, row_err, np.nan_to_num(row_shift)


def grid_logprobs(layout: str, coarse_factor: int | None = None) -> Encoding:
    """The log-prob encoding storing ``layout`` (``grid-max``, ``grid-min`` or
    ``grid-shift``): values from :func:`snap_to_grid`, each row shifted back to its exact tail
    on decoding (``grid-shift``: by the stored shift, which brings it back to within
    ``2 ** -15`` of the tail's mass; its coarse zone by ``coarse_factor``, default
    COARSE_FACTOR, what ``longkd cache build`` writes)."""
    shifting = layout == "grid-shift"
    shift_steps = enc.DEFAULT_SHIFT_STEPS if shifting else None

    def encode(values: np.ndarray, ctx: WindowContext) -> bytes:
        counts = ctx.entry_counts
        coarse = coarse_zone(factor=coarse_factor) if shifting else (0, 1)
        snapped, tail = snap_to_grid(values, counts, LOGPROB_STEPS, shift_steps=shift_steps, coarse=coarse)
        if not shifting:
            return enc.encode_logprobs(snapped, counts, layout, LOGPROB_STEPS, "bytes", tail)
        shifts = quantised_shifts(snapped.astype(np.float32), tail, counts, shift_steps)
        return enc.encode_logprobs(
            snapped, counts, layout, LOGPROB_STEPS, "bytes", tail, shifts, shift_steps, *coarse
        )

    def decode(blob: np.ndarray, ctx: WindowContext) -> np.ndarray:
        logprobs, tail = enc.decode_logprobs(blob, ctx.entry_counts, layout=layout)
        return logprobs if tail is None else renormalise(logprobs, tail, ctx.entry_counts)

    return Encoding(layout, encode, decode)


def renormalise(logprobs: np.ndarray, tail: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Shift each row's grid log-probs by one constant so that ``1 - sum(exp(row))`` equals
    the row's stored tail (as far as float32 allows): the bucket loss then sees the exact
    mass outside the stored entries.

    Args:
        logprobs: float32[n] decoded grid log-probs, ``counts[r]`` for row r.
        tail: float32[R] the stored tails (``1 - sum(exp(x))`` of the unrounded row).
        counts: int[R] entries per row.

    Returns:
        float32[n]: row r shifted by :func:`tail_shifts` (as float32); rows without a finite
        entry are unchanged. The shift is at most the largest rounding error of the row's
        entries (1/128 nat on the default grid).
    """
    if logprobs.size == 0:
        return logprobs
    counts = np.asarray(counts, np.int64)
    return enc.shift_rows(logprobs, tail_shifts(logprobs, tail, counts).astype(np.float32), counts)


def tail_shifts(logprobs: np.ndarray, tail: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64[R]: ``log(min(1 - tail[r], 1)) - log(sum(exp(row r)))``, what moves row r of
    ``logprobs`` (float32[n]) to the covered mass ``1 - tail[r]`` (float[R]: the stored
    float32 tail for ``grid-min``, the exact float64 one for ``grid-shift``); 0 for rows
    without a finite entry. The sum is float64 of float32 ``exp``: part of what the stored
    bytes mean (checksums cover the values it gives), so it stays as it is."""
    mass = enc.row_masses(logprobs, np.asarray(counts, np.int64))
    want = np.minimum(1.0 - tail.astype(np.float64), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((mass > 0) & (want > 0), np.log(want) - np.log(mass), 0.0)


def quantised_shifts(
    logprobs: np.ndarray, tail: np.ndarray, counts: np.ndarray, shift_steps: int
) -> np.ndarray:
    """int64[R]: :func:`tail_shifts` rounded to steps of ``1 / shift_steps`` nat (half to
    even), what ``grid-shift`` stores in place of the tail."""
    return np.rint(tail_shifts(logprobs, tail, counts) * shift_steps).astype(np.int64)


def _decode_entry_counts(blob: np.ndarray, ctx: WindowContext) -> np.ndarray:
    counts = enc.decode_uints(blob, ctx.window, "row_splits")
    splits = np.zeros(ctx.window + 1, np.int64)
    np.cumsum(counts, out=splits[1:])
    if splits[-1] >= 2**31:
        raise LongkdError(f"corrupt row_splits encoding: {splits[-1]} entries do not fit a window")
    return splits


ENCODINGS = {
    e.name: e
    for e in (
        Encoding(
            "sorted-gaps",
            lambda v, c: enc.encode_ids(v, c.entry_counts, c.vocab, packing="bytes")[0],
            lambda b, c: enc.decode_ids(b, c.entry_counts, c.vocab),
        ),
        Encoding(
            "dictionary",
            lambda v, c: enc.encode_dictionary_ids(v, c.entry_counts, c.vocab)[0],
            lambda b, c: enc.decode_dictionary_ids(b, c.entry_counts, c.vocab),
        ),
        grid_logprobs("grid-max"),
        grid_logprobs("grid-min"),
        grid_logprobs("grid-shift"),
        Encoding(
            "grid",
            lambda v, c: enc.encode_target_logprob(v, packing="bits"),
            lambda b, c: enc.decode_target_logprob(b, c.window),
        ),
        Encoding(
            "ints",
            lambda v, c: enc.encode_uints(v, "bytes"),
            lambda b, c: enc.decode_uints(b, c.window, "input_ids", limit=c.vocab),
        ),
        Encoding(
            "gaps",
            lambda v, c: enc.encode_segment_starts(v, c.length),
            lambda b, c: enc.decode_segment_starts(b, c.length),
        ),
        Encoding(
            "minus-one",
            lambda v, c: enc.encode_uints(v, "bytes", offset=1),
            lambda b, c: enc.decode_uints(b, int(c.entry_counts.sum()), "counts", offset=1, limit=2**16),
        ),
        Encoding(
            "entry-counts",
            lambda v, c: enc.encode_uints(np.diff(np.asarray(v, np.int64)), "bits"),
            _decode_entry_counts,
        ),
    )
}
if set(ENCODINGS) != set(fmt.COLUMN_ENCODINGS) - {fmt.PLAIN}:  # the declaration and this module agree
    raise AssertionError("cache/format.py COLUMN_ENCODINGS and cache/column_codecs.py differ")


class ColumnCodecs:
    """One cache's encoding of every list column, and what decoding its windows needs.

    Args:
        selection_mode: the cache's selection mode.
        size: its selection size (K entries per row for top-k).
        window: W.
        vocab: V, the teacher's embedding size.
        encodings: the manifest's ``encoding.columns`` (None or empty: all plain).

    Attributes:
        names: every list column of the mode -> its encoding name, in schema order.
        plain: whether every column is plain (a version 1 or 2 cache, or a plain build).
        entry_order: ``"rank"`` (entries as the producer ordered them: log-probs descending for
            top-k) or ``"id"`` (``sorted-gaps``, ``dictionary``: each row's entries by
            ascending id).

    Raises:
        LongkdError: an encoding that is unknown or does not apply to its column.
    """

    def __init__(
        self, selection_mode: str, size: int, window: int, vocab: int, encodings: dict | None = None
    ):
        self.mode, self.size, self.window, self.vocab = selection_mode, int(size), int(window), int(vocab)
        self.names = fmt.column_encodings(selection_mode, encodings)
        self.plain = all(name == fmt.PLAIN for name in self.names.values())
        self.entry_order = "id" if self.names[fmt.IDS] in fmt.ID_ORDER_ENCODINGS else "rank"
        self._ragged = fmt.ROW_SPLITS in self.names

    @classmethod
    def of(cls, manifest: dict) -> ColumnCodecs:
        """The codecs of the cache a validated manifest describes."""
        selection = manifest["selection"]
        size_key = fmt.selection_format(selection["mode"]).size_key
        return cls(
            selection["mode"],
            selection[size_key],
            manifest["window"],
            manifest["vocab"]["embedding_size"],
            manifest["encoding"].get("columns"),
        )

    def manifest_entry(self) -> dict:
        """The manifest's ``encoding.columns``: every list column with its encoding."""
        return dict(self.names)

    def _fixed_counts(self) -> np.ndarray:
        return np.full(self.window, self.size, np.int64)

    def order_entries(self, values: dict[str, np.ndarray], row_splits: np.ndarray | None) -> dict:
        """Put the entry columns in the stored order (``sorted-gaps``, ``dictionary``: each row
        by ascending id).

        Args:
            values: flat arrays by column name, as the selection mode produced them.
            row_splits: int[W + 1] for a ragged mode, None for top-k.

        Returns:
            ``values`` with every entry column (format.ENTRY_COLUMNS) permuted alike.
        """
        if self.entry_order == "rank":
            return values
        ids = np.asarray(values[fmt.IDS]).astype(np.int64)
        counts = self._fixed_counts() if row_splits is None else np.diff(np.asarray(row_splits, np.int64))
        rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        order = np.argsort(rows * self.vocab + ids, kind="stable")
        return {
            name: (np.asarray(v)[order] if name in fmt.ENTRY_COLUMNS else v) for name, v in values.items()
        }

    def encode(self, values: dict[str, np.ndarray], length: int) -> dict[str, pa.Array]:
        """The non-plain columns of one window as one-element ``binary`` arrays.

        Args:
            values: every list column's flat array (plain dtypes), entry columns already in
                :meth:`order_entries` order.
            length: the window's real tokens L.

        Returns:
            ``{column: pa.Array}`` for the columns not stored plain.

        Raises:
            LongkdError: values an encoding cannot hold (NaN log-probs, ids beyond V...).
        """
        counts = (
            np.diff(np.asarray(values[fmt.ROW_SPLITS], np.int64)) if self._ragged else self._fixed_counts()
        )
        ctx = WindowContext(self.window, self.vocab, int(length), counts)
        out = {}
        for column, name in self.names.items():
            if name != fmt.PLAIN:
                try:
                    blob = ENCODINGS[name].encode(np.asarray(values[column]), ctx)
                except LongkdError as err:
                    raise LongkdError(f"cannot store {column} as {name}: {err}") from None
                out[column] = pa.array([blob], type=pa.binary())
        return out

    def decode(
        self, batch: pa.RecordBatch, row: int, length: int, columns: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """The list columns of row ``row`` of a validated record batch, as flat arrays in the
        plain columns' dtypes (``ids`` int32, ``logprobs`` float32, ``counts`` uint16, ...).

        Args:
            batch: the record batch.
            row: the row's index in it.
            length: the row's ``length``.
            columns: the columns wanted (default: all); entry columns of a ragged mode also
                decode ``row_splits``.

        Raises:
            CorruptColumn: a column that does not decode, naming it.
        """
        # top-k rows hold K entries each; a ragged mode's counts come from row_splits, below
        fixed = None if self._ragged else self._fixed_counts()
        ctx = WindowContext(self.window, self.vocab, int(length), fixed)
        out: dict[str, np.ndarray] = {}
        wanted = tuple(self.names) if columns is None else columns
        order = [name for name in self.names if name in wanted]
        if self._ragged and any(name in fmt.ENTRY_COLUMNS for name in order):
            order = [fmt.ROW_SPLITS] + [name for name in order if name != fmt.ROW_SPLITS]
        for column in order:
            name = self.names[column]
            if name == fmt.PLAIN:
                out[column] = batch.column(column)[row].values.to_numpy(zero_copy_only=False)
            else:
                blob = np.frombuffer(batch.column(column)[row].as_buffer(), np.uint8)
                try:
                    out[column] = ENCODINGS[name].decode(blob, ctx).astype(_DTYPES[column], copy=False)
                except _DECODE_ERRORS as err:
                    raise CorruptColumn(f"{column} ({name}): {_reason(err)}") from None
            if column == fmt.ROW_SPLITS:
                splits = out[column].astype(np.int64)
                if splits.shape[0] != self.window + 1 or splits[0] != 0 or np.any(np.diff(splits) < 0):
                    raise CorruptColumn("row_splits must hold W+1 offsets from 0, never decreasing")
                ctx = WindowContext(self.window, self.vocab, int(length), np.diff(splits))
        return {column: out[column] for column in self.names if column in wanted}


def _reason(err: Exception) -> str:
    """An encoding error's message without the advice that wraps it (the reader adds its own)."""
    text = str(err).split("; rebuild the cache", 1)[0]
    return text if isinstance(err, LongkdError) else f"{type(err).__name__}: {text}"
