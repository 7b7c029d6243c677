"""How a window is stored as one row of a shard, and read back: the one row codec.

A shard is an Arrow IPC file holding one window per row (docs/format.md). The writer turns a
window into a record batch with :func:`window_record_batch`; everything that reads shards
(the reader, verify, the trainer's vocabulary check, inspect's size measurement) opens them
with :func:`open_shard` or :class:`ShardFile`, takes one window's columns as numpy arrays
with :func:`read_columns` and, where it needs the dense [W, K] view a loss uses,
:func:`dense_rows`.

What differs between selection modes (how their columns are filled, their invariants, their
dense view) is one :class:`SelectionRows` subclass per mode, next to the declaration of its
columns in cache/format.py's ``SELECTIONS``; no other code that writes or reads shards
branches on the mode.

    from longkd.cache.rows import ShardFile, dense_rows, read_columns
    from longkd.cache.storage import Location
    shard = ShardFile(Location("runs/cache"), "shards/shard-00000-000000.arrow")
    batch, r = shard.locate(0)
    columns = read_columns(batch, r, "topk")        # flat arrays, as stored
    ids, logprobs, counts = dense_rows(columns, 4096, {"mode": "topk", "k": 64})   # [W, K]
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.cache import format as fmt
from longkd.cache.storage import Location
from longkd.errors import LongkdError


class BadShard(Exception):
    """A shard's bytes break the format; the message says what, without naming the shard."""


class UnreadableShard(LongkdError):
    """A shard file that cannot be opened as Arrow IPC.

    Attributes:
        reason: the underlying ``OSError`` or ``pyarrow.ArrowException``.
    """

    def __init__(self, location: Location, path: str, reason: Exception):
        super().__init__(f"cannot read shard {path} of {location.uri}: {reason}; run `longkd cache verify`")
        self.reason = reason


def open_shard(location: Location, path: str) -> pa.ipc.RecordBatchFileReader:
    """Open the shard ``path`` of the cache at ``location`` (random access, nothing read yet).

    Raises:
        UnreadableShard: the file is missing or not an Arrow IPC file.
    """
    try:
        return pa.ipc.open_file(location.open_input(path))
    except (OSError, pa.ArrowException) as err:
        raise UnreadableShard(location, path, err) from err


class ShardFile:
    """An open shard and the record batch holding each of its rows.

    Args:
        location: the cache directory.
        path: the shard's path inside it.
        rows: the rows the manifest lists for the shard. When the file has exactly that many
            record batches, row r is batch r (longkd writes one batch per window), known
            without reading any batch (on an object store that would fetch the whole shard).
            None, or another batch count: every batch's rows are counted.

    Raises:
        UnreadableShard: the file cannot be opened.
    """

    def __init__(self, location: Location, path: str, rows: int | None = None):
        self.file = open_shard(location, path)
        batches = self.file.num_record_batches
        if rows is not None and batches == rows:
            self._starts = list(range(batches))
        else:
            self._starts, total = [], 0
            for b in range(batches):
                self._starts.append(total)
                total += self.file.get_batch(b).num_rows

    def locate(self, row: int) -> tuple[pa.RecordBatch, int]:
        """The record batch holding row ``row`` of the shard, and the row's index in it."""
        b = bisect.bisect_right(self._starts, row) - 1
        return self.file.get_batch(b), row - self._starts[b]


def check_schema(schema: pa.Schema, selection_mode: str, logprob_dtype: str) -> None:
    """Check a shard's schema against the format's for its cache (metadata not compared).

    Raises:
        BadShard: the schema differs, naming the expected format and showing the found one.
    """
    if not schema.equals(fmt.shard_schema(selection_mode, logprob_dtype), check_metadata=False):
        raise BadShard(
            f"schema differs from format v{fmt.FORMAT_VERSION} {selection_mode}/{logprob_dtype}: {schema}"
        )


def max_stored_id(location: Location, path: str) -> int:
    """The largest teacher id in the ``ids`` column of the shard ``path`` (-1 when it stores none).

    Raises:
        UnreadableShard: the file cannot be opened.
    """
    import pyarrow.compute as pc

    best = -1
    table = open_shard(location, path).read_all().select([fmt.IDS])
    for chunk in table.column(0).chunks:
        values = pc.list_flatten(chunk)
        if len(values):
            best = max(best, int(pc.max(values).as_py()))
    return best


# ----------------------------------------------------------------------------- one window


@dataclass
class WindowColumns:
    """One stored window, each list column as the flat numpy array it is stored as.

    Arrays may be read-only views of the record batch; copy before writing to them.

    Attributes:
        window_id: global window index.
        length: real tokens L.
        input_ids: int32[W].
        segment_starts: int32[S].
        ids: int32: [W * K] for top-k, [M] for sampled caches.
        target_logprob: float32[W].
        mode_columns: the selection mode's own columns by name (cache/format.py's
            ``SELECTIONS``): top-k ``logprobs`` [W * K] in the cache's log-prob encoding;
            sampled ``counts`` uint16[M] and ``row_splits`` int32[W + 1].
    """

    window_id: int
    length: int
    input_ids: np.ndarray
    segment_starts: np.ndarray
    ids: np.ndarray
    target_logprob: np.ndarray
    mode_columns: dict[str, np.ndarray]


def read_columns(batch: pa.RecordBatch, row: int, selection_mode: str) -> WindowColumns:
    """The columns of row ``row`` of ``batch``, a record batch of a ``selection_mode`` shard."""

    def values(name: str) -> np.ndarray:
        return batch.column(name)[row].values.to_numpy(zero_copy_only=False)

    return WindowColumns(
        window_id=int(batch.column(fmt.WINDOW_ID)[row].as_py()),
        length=int(batch.column(fmt.LENGTH)[row].as_py()),
        input_ids=values(fmt.INPUT_IDS),
        segment_starts=values(fmt.SEGMENT_STARTS),
        ids=values(fmt.IDS),
        target_logprob=values(fmt.TARGET_LOGPROB),
        mode_columns={name: values(name) for name, _ in fmt.SELECTIONS[selection_mode].columns},
    )


def dense_rows(
    columns: WindowColumns, window: int, selection: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The dense view of a window's stored rows, what a loss and ``longkd cache inspect`` use.

    Args:
        columns: from :func:`read_columns`.
        window: W.
        selection: the manifest's ``selection`` (``{"mode": "topk", "k": K}`` or
            ``{"mode": "sampled", "draws": N}``).

    Returns:
        ``ids`` int32[W, K], ``logprobs`` float32[W, K] (log-probs over the full vocabulary;
        sampled: log(counts / draws)) and ``counts`` uint16[W, K] for sampled caches, None for
        top-k. Sampled caches: K is the window's largest row, padding has id -1, log-prob
        -inf and count 0.
    """
    rows = selection_rows(selection["mode"])
    return rows.dense(columns, window, int(selection[rows.format.size_key]))


def expand_sampled(
    ids: np.ndarray, counts: np.ndarray, row_splits: np.ndarray, draws: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense [W, Kmax] arrays from the ragged sampled encoding.

    Args:
        ids: int32[M] unique ids per row, concatenated.
        counts: uint16[M] draws that hit each id.
        row_splits: int32[W+1], row t owns entries [row_splits[t], row_splits[t+1]).
        draws: N, the number of draws per row.

    Returns:
        ids int32[W, Kmax] (-1 padding), logprobs float32[W, Kmax] (log(counts / draws), -inf
        padding), counts uint16[W, Kmax] (0 padding); Kmax is the largest row's entry count.
    """
    splits = np.asarray(row_splits, dtype=np.int64)
    per_row = np.diff(splits)
    w = per_row.shape[0]
    kmax = int(per_row.max()) if w else 0
    rows = np.repeat(np.arange(w), per_row)
    cols = np.arange(splits[-1] - splits[0]) - np.repeat(splits[:-1] - splits[0], per_row)
    out_ids = np.full((w, kmax), -1, dtype=np.int32)
    out_counts = np.zeros((w, kmax), dtype=np.uint16)
    out_ids[rows, cols] = ids
    out_counts[rows, cols] = counts
    with np.errstate(divide="ignore"):
        out_logprobs = np.log(out_counts.astype(np.float64) / float(draws)).astype(np.float32)
    return out_ids, out_logprobs, out_counts


def _list_array(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """A one-element list array holding ``values`` (flattened)."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=type_)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], type=pa.int32()), flat)


def window_record_batch(window, rows, selection_mode: str, logprob_dtype: str = "float32") -> pa.RecordBatch:
    """One window as a one-row record batch of its shard schema (see docs/format.md).

    Args:
        window: a ``PackedWindow`` (``window_id``, ``input_ids`` int32[W], ``length``,
            ``segment_starts`` int32[S]).
        rows: the teacher's ``TeacherRows`` for it: top-k ``ids`` int32[W, K] and ``logprobs``
            float32[W, K], or sampled ``ids`` int32[M], ``counts`` uint16[M], ``row_splits``
            int32[W+1]; and ``target_logprob`` float32[W].
        selection_mode: the cache's selection mode.
        logprob_dtype: the cache's log-prob encoding.

    Returns:
        The record batch, of schema ``format.shard_schema(selection_mode, logprob_dtype)``.

    Raises:
        LongkdError: an unknown selection mode or log-prob encoding.
        ValueError: shapes that disagree with the window (a bug upstream, not a user error).
    """
    schema = fmt.shard_schema(selection_mode, logprob_dtype)
    input_ids = np.asarray(window.input_ids, dtype=np.int32)
    w = input_ids.shape[0]
    length = int(window.length)
    target = np.array(rows.target_logprob, dtype=np.float32, copy=True).reshape(-1)
    if target.shape[0] != w:
        raise ValueError(
            f"window {window.window_id}: target_logprob has {target.shape[0]} rows, expected {w}"
        )
    # Rows whose next token is padding or beyond the window have no target (format rule).
    target[max(length - 1, 0) :] = np.nan
    columns = {
        fmt.WINDOW_ID: pa.array([int(window.window_id)], type=pa.int64()),
        fmt.LENGTH: pa.array([length], type=pa.int32()),
        fmt.INPUT_IDS: _list_array(input_ids, pa.int32()),
        fmt.SEGMENT_STARTS: _list_array(np.asarray(window.segment_starts, dtype=np.int32), pa.int32()),
    }
    selection = selection_rows(selection_mode)
    columns.update(selection.encode(window.window_id, w, rows, fmt.LOGPROB_ENCODINGS[logprob_dtype]))
    columns[fmt.TARGET_LOGPROB] = _list_array(target, pa.float32())
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


# ----------------------------------------------------------------------------- selection modes


class SelectionRows:
    """One selection mode's rows: how its columns are filled, checked and densified.

    Attributes:
        format: the mode's declaration in cache/format.py (its columns and size key).
    """

    format: fmt.SelectionFormat

    def encode(self, window_id: int, w: int, rows, logprobs: fmt.LogprobEncoding) -> dict[str, pa.Array]:
        """The ``ids`` column and the mode's own columns of one window, as one-row list arrays.

        Args:
            window_id: the window's id (for messages).
            w: W.
            rows: the teacher's ``TeacherRows`` for the window.
            logprobs: the cache's log-prob encoding.

        Raises:
            ValueError: shapes that disagree with the window (a bug upstream).
        """
        raise NotImplementedError

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        """Check the format's invariants of the mode's stored rows.

        Args:
            columns: the window, from :func:`read_columns`; its ``ids`` already checked to lie
                in ``[0, vocab)``.
            w: W.
            size: the manifest's selection size (K or N).
            vocab: V, the teacher's embedding size.
            logprobs: the cache's log-prob encoding.

        Raises:
            BadShard: naming the first broken invariant.
        """
        raise NotImplementedError

    def dense(
        self, columns: WindowColumns, w: int, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``ids`` int32[W, K], ``logprobs`` float32[W, K], ``counts`` uint16[W, K] or None (see
        :func:`dense_rows`)."""
        raise NotImplementedError


class TopKRows(SelectionRows):
    """Top-k: ``ids`` and ``logprobs`` hold W rows of K entries each, log-probs descending."""

    format = fmt.SELECTIONS["topk"]

    def encode(self, window_id: int, w: int, rows, logprobs: fmt.LogprobEncoding) -> dict[str, pa.Array]:
        ids = np.asarray(rows.ids)
        values = np.asarray(rows.logprobs)
        if ids.ndim != 2 or ids.shape[0] != w or values.shape != ids.shape:
            raise ValueError(f"window {window_id}: top-k ids {ids.shape} / logprobs {values.shape}")
        value_type = logprobs.value_type
        return {
            fmt.IDS: _list_array(ids.astype(np.int32, copy=False), pa.int32()),
            fmt.LOGPROBS: _list_array(values.astype(value_type.to_pandas_dtype(), copy=False), value_type),
        }

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        k, ids, values = size, columns.ids, columns.mode_columns[fmt.LOGPROBS]
        if ids.shape[0] != w * k or values.shape[0] != w * k:
            raise BadShard(
                f"ids/logprobs have {ids.shape[0]}/{values.shape[0]} entries, expected W*K={w * k}"
            )
        lp = values.astype(np.float32).reshape(w, k)
        if not np.all(np.isfinite(lp)):
            raise BadShard("logprobs not finite")
        if np.any(lp > fmt.LOGPROB_MAX):
            raise BadShard(f"logprobs above 0 (max {float(lp.max()):.3g})")
        if np.any(np.diff(lp, axis=1) > 0):
            row = int(np.argmax(np.any(np.diff(lp, axis=1) > 0, axis=1)))
            raise BadShard(f"row {row}: logprobs not descending")
        tail = 1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)
        if np.any(tail < logprobs.tail_min):
            row = int(np.argmin(tail))
            raise BadShard(
                f"row {row}: tail mass {tail[row]:.3g} < {logprobs.tail_min} (probabilities sum above 1)"
            )
        if k > 1:
            per_row = np.sort(ids.reshape(w, k), axis=1)
            if np.any(per_row[:, 1:] == per_row[:, :-1]):
                raise BadShard("an id repeats within a row")

    def dense(self, columns: WindowColumns, w: int, size: int) -> tuple[np.ndarray, np.ndarray, None]:
        ids = columns.ids.astype(np.int32).reshape(w, size)
        return ids, columns.mode_columns[fmt.LOGPROBS].astype(np.float32).reshape(w, size), None


class SampledRows(SelectionRows):
    """Sampled: the unique ids of N draws per row with their ``counts``; row t owns entries
    ``row_splits[t] .. row_splits[t+1]`` of ``ids`` and ``counts``."""

    format = fmt.SELECTIONS["sampled"]

    def encode(self, window_id: int, w: int, rows, logprobs: fmt.LogprobEncoding) -> dict[str, pa.Array]:
        ids = np.asarray(rows.ids)
        splits = np.asarray(rows.row_splits, dtype=np.int32)
        counts = np.asarray(rows.counts)
        if splits.shape != (w + 1,) or counts.shape != ids.shape or ids.ndim != 1:
            raise ValueError(f"window {window_id}: sampled ids {ids.shape} counts {counts.shape}")
        return {
            fmt.IDS: _list_array(ids.astype(np.int32, copy=False), pa.int32()),
            fmt.COUNTS: _list_array(counts.astype(np.uint16, copy=False), pa.uint16()),
            fmt.ROW_SPLITS: _list_array(splits, pa.int32()),
        }

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        draws, ids = size, columns.ids
        counts, splits = columns.mode_columns[fmt.COUNTS], columns.mode_columns[fmt.ROW_SPLITS]
        if splits.shape[0] != w + 1:
            raise BadShard(f"row_splits has {splits.shape[0]} entries, expected W+1={w + 1}")
        if counts.shape[0] != ids.shape[0]:
            raise BadShard(f"counts has {counts.shape[0]} entries, ids {ids.shape[0]}")
        if splits[0] != 0 or np.any(np.diff(splits) < 0) or splits[-1] != ids.shape[0]:
            raise BadShard("row_splits must start at 0, not decrease and end at len(ids)")
        if np.any(counts == 0):
            raise BadShard("a stored count is 0")
        cum = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
        sums = cum[splits[1:]] - cum[splits[:-1]]
        if np.any(sums != draws):
            row = int(np.argmax(sums != draws))
            raise BadShard(f"row {row}: counts sum to {sums[row]}, expected draws={draws}")
        rows = np.repeat(np.arange(w, dtype=np.int64), np.diff(splits))
        if np.unique(rows * vocab + ids).shape[0] != ids.shape[0]:
            raise BadShard("an id repeats within a row")

    def dense(self, columns: WindowColumns, w: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts, splits = columns.mode_columns[fmt.COUNTS], columns.mode_columns[fmt.ROW_SPLITS]
        return expand_sampled(columns.ids.astype(np.int32), counts, splits, size)


_SELECTION_ROWS = {rows.format.mode: rows for rows in (TopKRows(), SampledRows())}


def selection_rows(mode: str) -> SelectionRows:
    """The rows of selection mode ``mode``.

    Raises:
        LongkdError: an unknown selection mode.
    """
    return _SELECTION_ROWS[fmt.selection_format(mode).mode]
