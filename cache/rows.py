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
branches on the mode. How each list column is stored (plain Arrow lists, or a compact
encoding of format 3) is cache/column_codecs.py's :class:`ColumnCodecs`: :func:`read_columns`
and :func:`window_record_batch` go through it, so the columns a reader gets are the same
arrays whatever the encoding.

Shard bytes come from elsewhere and may be damaged, so nothing here hands Arrow a record
batch it has not validated (``RecordBatch.validate(full=True)``: list offsets inside their
values, lengths consistent) and every Arrow error is turned into :class:`BadShard` or
:class:`UnreadableShard`; a damaged file is one clear error, never a traceback or an abort
inside Arrow. Format-2 rows carry a checksum of their values (:func:`window_checksum`) and
:class:`RowRules` holds the per-row rules: the cheap ones every read applies, and the full
set ``longkd cache verify`` applies.

    from longkd.cache.rows import ShardFile, dense_rows, read_columns
    from longkd.cache.storage import Location
    shard = ShardFile(Location("runs/cache"), "shards/shard-00000-000000.arrow")
    batch, r = shard.locate(0)
    codecs = ColumnCodecs.of(manifest)              # how the cache stores each column
    columns = read_columns(batch, r, "topk", codecs)   # flat arrays, decoded
    ids, logprobs, counts = dense_rows(columns, 4096, {"mode": "topk", "k": 64})   # [W, K]
"""

from __future__ import annotations

import bisect
import functools
import struct
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.cache import format as fmt
from longkd.cache.column_codecs import ColumnCodecs, CorruptColumn
from longkd.cache.storage import Location
from longkd.errors import LongkdError, one_line

# What reading damaged Arrow bytes can raise (ArrowInvalid, ArrowIOError, a failed huge
# allocation...): always turned into BadShard / UnreadableShard.
ARROW_ERRORS = (OSError, pa.ArrowException, MemoryError, ValueError, IndexError)
_LITTLE_ENDIAN = sys.byteorder == "little"


class BadShard(Exception):
    """A shard's bytes break the format; the message says what, without naming the shard."""


class UnreadableShard(LongkdError):
    """A shard that cannot be used at all: not an Arrow IPC file, another schema, or bytes
    that differ from the manifest's sha256.

    Attributes:
        reason: what is wrong, one line.
    """

    def __init__(self, location: Location, path: str, reason: Exception | str):
        self.reason = one_line(reason) if isinstance(reason, BaseException) else reason
        super().__init__(
            f"shard {path} of {location.uri} is unreadable: {self.reason}; the cache is damaged, rebuild it "
            "(`longkd cache verify` checks every shard)"
        )


class DamagedWindow(LongkdError):
    """One window whose stored bytes are damaged (checksum, Arrow structure or row rules).

    Attributes:
        path: the shard's path in the cache.
        window: the window's id.
        reason: what is wrong, one line.
    """

    def __init__(self, location: Location, path: str, window: int, reason: str):
        self.path, self.window, self.reason = path, window, reason
        super().__init__(
            f"window {window} in shard {path} of {location.uri} is damaged: {reason}; rebuild the cache "
            "(`longkd cache verify` checks every shard), or skip damaged windows where the command "
            "offers --skip-damaged"
        )


def open_shard(location: Location, path: str) -> pa.ipc.RecordBatchFileReader:
    """Open the shard ``path`` of the cache at ``location`` (random access, nothing read yet).

    Raises:
        UnreadableShard: the file is missing or not an Arrow IPC file.
    """
    try:
        return pa.ipc.open_file(location.open_input(path))
    except ARROW_ERRORS as err:
        raise UnreadableShard(location, path, err) from None


class ShardFile:
    """An open shard and the record batch holding each of its rows; every batch it hands out
    is validated.

    Args:
        location: the cache directory.
        path: the shard's path inside it.
        rows: the rows the manifest lists for the shard. When the file has exactly that many
            record batches, row r is batch r (longkd writes one batch per window), known
            without reading any batch (on an object store that would fetch the whole shard).
            None, or another batch count: every batch's rows are counted.
        schema: when given, the schema the file must have (:func:`check_schema`).

    Raises:
        UnreadableShard: the file cannot be opened, has another schema, or a batch cannot be
            read while counting rows.
    """

    def __init__(
        self, location: Location, path: str, rows: int | None = None, schema: pa.Schema | None = None
    ):
        self.location, self.path = location, path
        self.file = open_shard(location, path)
        try:
            if schema is not None:
                check_schema(self.file.schema, schema)
            batches = self.file.num_record_batches
            if rows is not None and batches == rows:
                self._starts = list(range(batches))
            else:
                self._starts, total = [], 0
                for b in range(batches):
                    self._starts.append(total)
                    total += self.batch(b).num_rows
        except BadShard as bad:
            raise UnreadableShard(location, path, str(bad)) from None

    def batch(self, b: int) -> pa.RecordBatch:
        """Record batch ``b``, validated (:func:`read_batch`).

        Raises:
            BadShard: the batch cannot be read or is not valid Arrow.
        """
        return read_batch(self.file, b)

    def locate(self, row: int) -> tuple[pa.RecordBatch, int]:
        """The validated record batch holding row ``row`` of the shard, and the row's index in it.

        Raises:
            BadShard: that batch cannot be read or is not valid Arrow.
        """
        b = max(bisect.bisect_right(self._starts, row) - 1, 0)
        return self.batch(b), row - self._starts[b]


def read_batch(file: pa.ipc.RecordBatchFileReader, b: int) -> pa.RecordBatch:
    """Record batch ``b`` of an open shard, validated in full (every list offset inside its
    values, every length consistent), so slicing it can never make Arrow abort.

    Raises:
        BadShard: the batch cannot be read or is not valid Arrow.
    """
    try:
        batch = file.get_batch(b)
        batch.validate(full=True)
    except ARROW_ERRORS as err:
        raise BadShard(f"record batch {b} unreadable ({one_line(err, 160)})") from None
    return batch


def check_schema(schema: pa.Schema, expected: pa.Schema) -> None:
    """Check a shard's schema against the one its cache's manifest implies (metadata not
    compared); ``expected`` is ``format.shard_schema(mode, logprob_dtype, version)``.

    Raises:
        BadShard: the schema differs, on one line naming the first column that differs.
    """
    if schema.equals(expected, check_metadata=False):
        return

    def show(fields: pa.Schema, i: int) -> str:
        if i >= len(fields):
            return "nothing"
        field = fields.field(i)
        return f"{field.name}: {field.type}{'' if field.nullable is False else ' (nullable)'}"[:100]

    i = next((i for i in range(max(len(schema), len(expected))) if show(schema, i) != show(expected, i)), 0)
    raise BadShard(
        f"schema differs from the cache's at column {i}: expected {show(expected, i)}, "
        f"found {show(schema, i)} ({len(expected)} columns expected, {len(schema)} found)"
    )


def max_stored_id(location: Location, path: str, codecs: ColumnCodecs | None = None) -> int:
    """The largest teacher id in the ``ids`` column of the shard ``path`` (-1 when it stores none).

    Args:
        location: the cache directory.
        path: the shard's path inside it.
        codecs: the cache's column encodings; None reads them from the cache's manifest when
            ``ids`` is not stored plain.

    Raises:
        UnreadableShard: the file cannot be opened or a batch cannot be read or decoded.
    """
    import pyarrow.compute as pc

    best = -1
    file = open_shard(location, path)
    for b in range(file.num_record_batches):
        try:
            batch = read_batch(file, b)
            column = batch.column(fmt.IDS)
            if pa.types.is_list(column.type):
                values = pc.list_flatten(column)
                if len(values):
                    best = max(best, int(pc.max(values).as_py()))
                continue
            if codecs is None:
                from longkd.cache.manifest import load_manifest

                codecs = ColumnCodecs.of(load_manifest(location))
            for r in range(batch.num_rows):
                ids = read_columns(batch, r, codecs.mode, codecs).ids
                if ids.size:
                    best = max(best, int(ids.max()))
        except (BadShard, KeyError, *ARROW_ERRORS) as err:
            raise UnreadableShard(location, path, str(err)) from None
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
        ids: int32: [W * K] for top-k, [M] for sampled and adaptive caches.
        target_logprob: float32[W].
        mode_columns: the selection mode's own columns by name (cache/format.py's
            ``SELECTIONS``): top-k ``logprobs`` [W * K] in the cache's log-prob encoding;
            sampled ``counts`` uint16[M] and ``row_splits`` int32[W + 1]; adaptive
            ``logprobs`` [M] and ``row_splits`` int32[W + 1].
        checksum: the stored ``checksum`` (format 2 and 3), None for a format-1 row.
        entry_order: ``"rank"`` (each row's entries as the producer ordered them: top-k and
            adaptive log-probs descending) or ``"id"`` (ascending id: the ``sorted-gaps`` and
            ``dictionary`` encodings).
    """

    window_id: int
    length: int
    input_ids: np.ndarray
    segment_starts: np.ndarray
    ids: np.ndarray
    target_logprob: np.ndarray
    mode_columns: dict[str, np.ndarray]
    checksum: int | None = None
    entry_order: str = "rank"

    def values(self, name: str):
        """The column ``name`` of the shard schema: an int for ``window_id`` and ``length``, the
        flat numpy array for a list column."""
        if name in self.mode_columns:
            return self.mode_columns[name]
        return getattr(self, name)


def read_columns(
    batch: pa.RecordBatch, row: int, selection_mode: str, codecs: ColumnCodecs | None = None
) -> WindowColumns:
    """The columns of row ``row`` of ``batch``, a validated record batch of a ``selection_mode``
    shard (:func:`read_batch`), decoded; ``checksum`` is None when the batch has no such column.

    Args:
        batch: the record batch.
        row: the row's index in it.
        selection_mode: the cache's selection mode.
        codecs: the cache's column encodings (``ColumnCodecs.of(manifest)``); None: every
            column plain (any version 1 or 2 cache).

    Raises:
        BadShard: a column that does not decode (format 3), naming it.
    """
    names = batch.schema.names
    length = int(batch.column(fmt.LENGTH)[row].as_py())
    if codecs is None or codecs.plain:
        values = {
            name: batch.column(name)[row].values.to_numpy(zero_copy_only=False)
            for name in fmt.list_columns(selection_mode)
        }
    else:
        try:
            values = codecs.decode(batch, row, length)
        except CorruptColumn as bad:
            raise BadShard(str(bad)) from None
    return WindowColumns(
        window_id=int(batch.column(fmt.WINDOW_ID)[row].as_py()),
        length=length,
        input_ids=values[fmt.INPUT_IDS],
        segment_starts=values[fmt.SEGMENT_STARTS],
        ids=values[fmt.IDS],
        target_logprob=values[fmt.TARGET_LOGPROB],
        mode_columns={name: values[name] for name, _ in fmt.SELECTIONS[selection_mode].columns},
        checksum=int(batch.column(fmt.CHECKSUM)[row].as_py()) if fmt.CHECKSUM in names else None,
        entry_order="rank" if codecs is None else codecs.entry_order,
    )


def _hasher():
    try:
        import xxhash
    except ImportError as err:  # it comes with `datasets`; a trimmed environment may lack it
        raise LongkdError(
            "reading or writing format-2 caches needs the xxhash package (a dependency of datasets); "
            "pip install xxhash"
        ) from err
    return xxhash.xxh3_64()


@functools.cache
def _hashed_lists(selection_mode: str) -> tuple[str, ...]:
    """The list columns a checksum covers, in schema order (all after window_id and length)."""
    return tuple(fmt.shard_schema(selection_mode, version=1).names[2:])


def window_checksum(columns: WindowColumns, selection_mode: str) -> int:
    """The ``checksum`` of one window (format 2 and 3): XXH3-64 (seed 0) over its other columns.

    The hashed bytes are every column of the shard schema except ``checksum``, in schema
    order: ``window_id`` as int64 and ``length`` as int32; each list column as its element
    count (uint64) followed by its decoded elements in their plain type (what a plain column
    stores); all little-endian (docs/format.md "Checksum").

    Args:
        columns: the window, from :func:`read_columns` (or built by the writer).
        selection_mode: the cache's selection mode (which columns follow ``ids``).

    Returns:
        The checksum, an unsigned 64-bit integer.
    """
    digest = _hasher()
    digest.update(struct.pack("<qi", columns.window_id, columns.length))
    for name in _hashed_lists(selection_mode):
        values = np.ascontiguousarray(columns.values(name))
        if not _LITTLE_ENDIAN:
            values = values.astype(values.dtype.newbyteorder("<"))
        digest.update(struct.pack("<Q", values.shape[0]))
        digest.update(values)
    return digest.intdigest()


def dense_rows(
    columns: WindowColumns, window: int, selection: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The dense view of a window's stored rows, what a loss and ``longkd cache inspect`` use.

    Args:
        columns: from :func:`read_columns`.
        window: W.
        selection: the manifest's ``selection`` (``{"mode": "topk", "k": K}``,
            ``{"mode": "sampled", "draws": N}`` or ``{"mode": "adaptive", "k": K, ...}``).

    Returns:
        ``ids`` int32[W, K], ``logprobs`` float32[W, K] (log-probs over the full vocabulary;
        sampled: log(counts / draws)) and ``counts`` uint16[W, K] for sampled caches, None for
        top-k and adaptive. Sampled and adaptive caches: K is the window's largest row,
        padding has id -1, log-prob -inf (and count 0).
    """
    rows = selection_rows(selection["mode"])
    return rows.dense(columns, window, int(selection[rows.format.size_key]))


def _owned(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` as a writable array of ``dtype``: itself when it already is one (a decoded
    column), else a copy (a read-only view of an Arrow buffer, another dtype)."""
    if values.dtype == dtype and values.flags.writeable:
        return values
    return values.astype(dtype)


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


def expand_adaptive(
    ids: np.ndarray, logprobs: np.ndarray, row_splits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dense [W, Kmax] arrays from the ragged adaptive encoding.

    Args:
        ids: int32[M] each row's kept ids, concatenated (rank order).
        logprobs: [M] their log-probs, in the cache's log-prob encoding.
        row_splits: int32[W+1], row t owns entries [row_splits[t], row_splits[t+1]); starts at
            0 and ends at M (checked by every read).

    Returns:
        ids int32[W, Kmax] (-1 padding) and logprobs float32[W, Kmax] (-inf padding); Kmax is
        the window's largest row.
    """
    per_row = np.diff(np.asarray(row_splits, dtype=np.int64))
    kmax = int(per_row.max()) if per_row.size else 0
    keep = np.arange(kmax) < per_row[:, None]  # [W, Kmax], row-major like the flat arrays
    out_ids = np.full(keep.shape, -1, dtype=np.int32)
    out_logprobs = np.full(keep.shape, -np.inf, dtype=np.float32)
    out_ids[keep] = ids
    out_logprobs[keep] = logprobs
    return out_ids, out_logprobs


def _list_array(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """A one-element list array holding ``values`` (flattened)."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=type_)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], type=pa.int32()), flat)


def window_record_batch(
    window, rows, selection_mode: str, logprob_dtype: str = "float32", codecs: ColumnCodecs | None = None
) -> pa.RecordBatch:
    """One window as a one-row record batch of its shard schema (see docs/format.md).

    Args:
        window: a ``PackedWindow`` (``window_id``, ``input_ids`` int32[W], ``length``,
            ``segment_starts`` int32[S]).
        rows: the teacher's ``TeacherRows`` for it: top-k ``ids`` int32[W, K] and ``logprobs``
            float32[W, K], sampled ``ids`` int32[M], ``counts`` uint16[M], ``row_splits``
            int32[W+1], or adaptive ``ids`` int32[M], ``logprobs`` float32[M], ``row_splits``
            int32[W+1]; and ``target_logprob`` float32[W].
        selection_mode: the cache's selection mode.
        logprob_dtype: the cache's log-prob encoding.
        codecs: the cache's column encodings; None: every column plain.

    Returns:
        The record batch, of schema ``format.shard_schema(selection_mode, logprob_dtype,
        encodings=codecs.names)``; its ``checksum`` is :func:`window_checksum` of the other
        columns as a reader decodes them.

    Raises:
        LongkdError: an unknown selection mode or log-prob encoding.
        ValueError: shapes that disagree with the window (a bug upstream, not a user error).
    """
    schema = fmt.shard_schema(
        selection_mode, logprob_dtype, encodings=None if codecs is None else codecs.names
    )
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
    if codecs is not None and not codecs.plain:
        flat = {name: columns[name].values.to_numpy(zero_copy_only=False) for name in codecs.names}
        flat = codecs.order_entries(flat, flat.get(fmt.ROW_SPLITS))
        columns.update({name: _list_array(flat[name], columns[name].type.value_type) for name in flat})
        columns.update(codecs.encode(flat, length))
    values = [name for name in schema.names if name != fmt.CHECKSUM]
    unsigned = pa.RecordBatch.from_arrays([columns[name] for name in values], names=values)
    checksum = window_checksum(read_columns(unsigned, 0, selection_mode, codecs), selection_mode)
    columns[fmt.CHECKSUM] = pa.array([checksum], type=pa.uint64())
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

    def check_shape(self, columns: WindowColumns, *, w: int, size: int) -> None:
        """The mode's cheap rules, O(row), applied on every read: each column has the length
        the window implies and offsets are monotone, so the dense view is safe to build.

        Args:
            columns: the window, from :func:`read_columns`.
            w: W.
            size: the manifest's selection size (K or N).

        Raises:
            BadShard: naming the first broken rule.
        """
        raise NotImplementedError

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        """Check the rest of the format's invariants of the mode's stored rows (``longkd cache
        verify``).

        Args:
            columns: the window, from :func:`read_columns`; already through
                :meth:`check_shape`, its ``ids`` checked to lie in ``[0, vocab)``.
            w: W.
            size: the manifest's selection size (K or N).
            vocab: V, the teacher's embedding size.
            logprobs: the cache's log-prob encoding.

        Raises:
            BadShard: naming the first broken invariant.
        """
        raise NotImplementedError

    def check_rule(
        self, columns: WindowColumns, *, w: int, selection: dict, logprobs: fmt.LogprobEncoding
    ) -> None:
        """Check that the stored rows obey the selection rule the manifest records, for modes
        whose rows depend on one beyond their size (``longkd cache verify``); nothing by default.

        Args:
            columns: the window, already through :meth:`check`.
            w: W.
            selection: the manifest's ``selection``.
            logprobs: the cache's log-prob encoding.

        Raises:
            BadShard: naming the first row that breaks the rule.
        """

    def dense(
        self, columns: WindowColumns, w: int, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``ids`` int32[W, K], ``logprobs`` float32[W, K], ``counts`` uint16[W, K] or None (see
        :func:`dense_rows`)."""
        raise NotImplementedError


class TopKRows(SelectionRows):
    """Top-k: ``ids`` and ``logprobs`` hold W rows of K entries each, log-probs descending
    (or, stored by id, ids ascending)."""

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

    def check_shape(self, columns: WindowColumns, *, w: int, size: int) -> None:
        ids, values = columns.ids, columns.mode_columns[fmt.LOGPROBS]
        if ids.shape[0] != w * size or values.shape[0] != w * size:
            raise BadShard(
                f"ids/logprobs have {ids.shape[0]}/{values.shape[0]} entries, expected W*K={w * size}"
            )

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        k, ids, values = size, columns.ids, columns.mode_columns[fmt.LOGPROBS]
        lp = values.astype(np.float32).reshape(w, k)
        if not np.all(np.isfinite(lp)):
            raise BadShard("logprobs not finite")
        if np.any(lp > fmt.LOGPROB_MAX):
            raise BadShard(f"logprobs above 0 (max {float(lp.max()):.3g})")
        if columns.entry_order == "rank" and np.any(np.diff(lp, axis=1) > 0):
            row = int(np.argmax(np.any(np.diff(lp, axis=1) > 0, axis=1)))
            raise BadShard(f"row {row}: logprobs not descending")
        if columns.entry_order == "id" and k > 1 and np.any(np.diff(ids.reshape(w, k), axis=1) <= 0):
            row = int(np.argmax(np.any(np.diff(ids.reshape(w, k), axis=1) <= 0, axis=1)))
            raise BadShard(f"row {row}: ids not ascending (the ids encoding stores each row by id)")
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
        ids, values = columns.ids, columns.mode_columns[fmt.LOGPROBS]
        return _owned(ids, np.int32).reshape(w, size), _owned(values, np.float32).reshape(w, size), None


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

    def check_shape(self, columns: WindowColumns, *, w: int, size: int) -> None:
        ids = columns.ids
        counts, splits = columns.mode_columns[fmt.COUNTS], columns.mode_columns[fmt.ROW_SPLITS]
        if splits.shape[0] != w + 1:
            raise BadShard(f"row_splits has {splits.shape[0]} entries, expected W+1={w + 1}")
        if counts.shape[0] != ids.shape[0]:
            raise BadShard(f"counts has {counts.shape[0]} entries, ids {ids.shape[0]}")
        per_row = np.diff(splits)
        if splits[0] != 0 or np.any(per_row < 0) or splits[-1] != ids.shape[0]:
            raise BadShard("row_splits must start at 0, not decrease and end at len(ids)")
        if per_row.size and per_row.max() > size:
            raise BadShard(f"a row holds {int(per_row.max())} ids, more than the {size} draws")

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        draws, ids = size, columns.ids
        counts, splits = columns.mode_columns[fmt.COUNTS], columns.mode_columns[fmt.ROW_SPLITS]
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


class AdaptiveRows(SelectionRows):
    """Mass-adaptive top-k: row t keeps its ``row_splits[t+1] - row_splits[t]`` most likely
    entries, 1 to K, log-probs descending (or, stored by id, ids ascending); where
    the manifest's rule (``min_mass``, ``min_prob``: cache/encodings.py's
    ``select_entry_counts``) cut a row short, the rest of its mass is in the tail, as for
    top-k."""

    format = fmt.SELECTIONS["adaptive"]

    def encode(self, window_id: int, w: int, rows, logprobs: fmt.LogprobEncoding) -> dict[str, pa.Array]:
        ids = np.asarray(rows.ids)
        values = np.asarray(rows.logprobs)
        splits = np.asarray(rows.row_splits, dtype=np.int32)
        if ids.ndim != 1 or values.shape != ids.shape or splits.shape != (w + 1,):
            raise ValueError(
                f"window {window_id}: adaptive ids {ids.shape} / logprobs {values.shape} / "
                f"row_splits {splits.shape}"
            )
        value_type = logprobs.value_type
        return {
            fmt.IDS: _list_array(ids.astype(np.int32, copy=False), pa.int32()),
            fmt.LOGPROBS: _list_array(values.astype(value_type.to_pandas_dtype(), copy=False), value_type),
            fmt.ROW_SPLITS: _list_array(splits, pa.int32()),
        }

    def check_shape(self, columns: WindowColumns, *, w: int, size: int) -> None:
        ids = columns.ids
        values, splits = columns.mode_columns[fmt.LOGPROBS], columns.mode_columns[fmt.ROW_SPLITS]
        if splits.shape[0] != w + 1:
            raise BadShard(f"row_splits has {splits.shape[0]} entries, expected W+1={w + 1}")
        if values.shape[0] != ids.shape[0]:
            raise BadShard(f"logprobs has {values.shape[0]} entries, ids {ids.shape[0]}")
        per_row = np.diff(splits.astype(np.int64))
        if splits[0] != 0 or np.any(per_row < 1) or splits[-1] != ids.shape[0]:
            raise BadShard(
                "row_splits must start at 0, give every row at least one entry and end at len(ids)"
            )
        if per_row.max() > size:
            raise BadShard(f"a row holds {int(per_row.max())} entries, more than k={size}")

    def check(
        self, columns: WindowColumns, *, w: int, size: int, vocab: int, logprobs: fmt.LogprobEncoding
    ) -> None:
        ids, splits = columns.ids, columns.mode_columns[fmt.ROW_SPLITS].astype(np.int64)
        lp = columns.mode_columns[fmt.LOGPROBS].astype(np.float32)
        if not np.all(np.isfinite(lp)):
            raise BadShard("logprobs not finite")
        if np.any(lp > fmt.LOGPROB_MAX):
            raise BadShard(f"logprobs above 0 (max {float(lp.max()):.3g})")
        # rank order: log-probs descending; id order (sorted-gaps, dictionary): ids ascending
        rising = np.diff(lp) > 0 if columns.entry_order == "rank" else np.diff(ids.astype(np.int64)) <= 0
        rising[splits[1:-1] - 1] = False  # from one row's last entry to the next row's first
        if rising.any():
            row = int(np.searchsorted(splits, np.argmax(rising), side="right") - 1)
            what = "logprobs not descending" if columns.entry_order == "rank" else "ids not ascending"
            raise BadShard(f"row {row}: {what}")
        tail = 1.0 - np.add.reduceat(np.exp(lp.astype(np.float64)), splits[:-1])
        if np.any(tail < logprobs.tail_min):
            row = int(np.argmin(tail))
            raise BadShard(
                f"row {row}: tail mass {tail[row]:.3g} < {logprobs.tail_min} (probabilities sum above 1)"
            )
        rows = np.repeat(np.arange(w, dtype=np.int64), np.diff(splits))
        if np.unique(rows * vocab + ids).shape[0] != ids.shape[0]:
            raise BadShard("an id repeats within a row")

    def check_rule(
        self, columns: WindowColumns, *, w: int, selection: dict, logprobs: fmt.LogprobEncoding
    ) -> None:
        """What can be checked of the recorded rule without the entries a row left out: no
        row goes on past the entry at which its covered mass reached ``min_mass``; no entry
        but a row's first has a probability below ``min_prob``; and, under ``min_mass``
        alone, a row of fewer than K entries covers ``min_mass``. (Under ``min_prob`` a row
        also stops when its next entry falls below it, which the cache does not hold.)
        Comparisons allow the encoding's rounding: the tail allowance for masses, the value
        type's epsilon relative to ``log(min_prob)`` for log-probs, and the encoding's
        ``error`` on every log-prob (a grid's rounding)."""
        k, min_mass, min_prob = int(selection["k"]), selection.get("min_mass"), selection.get("min_prob")
        splits = columns.mode_columns[fmt.ROW_SPLITS].astype(np.int64)
        lp = columns.mode_columns[fmt.LOGPROBS].astype(np.float64)
        if columns.entry_order == "id":  # each row in rank order: log-prob descending, ties by id
            rows = np.repeat(np.arange(w, dtype=np.int64), np.diff(splits))
            lp = lp[np.lexsort((columns.ids, -lp, rows))]
        last = splits[1:] - 1  # each row's last entry
        covered = np.add.reduceat(np.exp(lp), splits[:-1])  # [W]
        slack = -logprobs.tail_min
        if min_mass is not None:
            over = covered - np.exp(lp[last] + logprobs.allowance(lp[last])) >= min_mass + slack
            if over.any():
                row = int(np.argmax(over))
                raise BadShard(f"row {row}: keeps entries after its covered mass reached min_mass={min_mass}")
            if min_prob is None:
                short = (np.diff(splits) < k) & (covered < min_mass - slack)
                if short.any():
                    row = int(np.argmax(short))
                    raise BadShard(
                        f"row {row}: {int(np.diff(splits)[row])} entries of k={k} cover only "
                        f"{covered[row]:.6g} < min_mass={min_mass}"
                    )
        if min_prob is not None:
            log_min = float(np.log(min_prob))
            eps = float(np.finfo(logprobs.value_type.to_pandas_dtype()).eps)
            below = lp < log_min - np.maximum(eps * max(1.0, abs(log_min)), logprobs.allowance(lp))
            below[splits[:-1]] = False  # a row keeps its first entry whatever its probability
            if below.any():
                row = int(np.searchsorted(splits, np.argmax(below), side="right") - 1)
                raise BadShard(f"row {row}: keeps an entry of probability below min_prob={min_prob}")

    def dense(self, columns: WindowColumns, w: int, size: int) -> tuple[np.ndarray, np.ndarray, None]:
        ids, logprobs = expand_adaptive(
            columns.ids, columns.mode_columns[fmt.LOGPROBS], columns.mode_columns[fmt.ROW_SPLITS]
        )
        return ids, logprobs, None


_SELECTION_ROWS = {rows.format.mode: rows for rows in (TopKRows(), SampledRows(), AdaptiveRows())}


def selection_rows(mode: str) -> SelectionRows:
    """The rows of selection mode ``mode``.

    Raises:
        LongkdError: an unknown selection mode.
    """
    return _SELECTION_ROWS[fmt.selection_format(mode).mode]


# ----------------------------------------------------------------------------- row rules


class RowRules:
    """The per-row rules of docs/format.md for one cache.

    :meth:`check_read` is what every read applies (O(row), cheap next to decoding): the
    checksum of a format-2 row, then the lengths, the length field, monotone segment starts
    and offsets, and ids (``ids`` and ``input_ids``) inside the vocabulary. :meth:`check_all`
    adds the rest (``longkd cache verify``): target log-probs, each mode's value rules and the
    selection rule the manifest records (adaptive caches).

    Args:
        window: W.
        vocab: V, the teacher's embedding size.
        selection: the manifest's ``selection``.
        logprob_dtype: the manifest's ``encoding.logprobs``.
        version: the cache's format version (2 and 3: rows carry a checksum).
        encodings: the manifest's ``encoding.columns`` (format 3; None: all plain).

    Attributes:
        codecs: the cache's column encodings, for :func:`read_columns`.
        schema: the Arrow schema every shard of the cache has.
    """

    def __init__(
        self,
        *,
        window: int,
        vocab: int,
        selection: dict,
        logprob_dtype: str,
        version: int,
        encodings: dict | None = None,
    ):
        self.w, self.vocab, self.version = int(window), int(vocab), int(version)
        self.mode, self.selection = selection["mode"], dict(selection)
        self.rows = selection_rows(self.mode)
        self.size = int(selection[self.rows.format.size_key])
        self.codecs = ColumnCodecs(self.mode, self.size, self.w, self.vocab, encodings)
        grid = fmt.GRID_READS.get(self.codecs.names.get(fmt.LOGPROBS))
        self.logprobs = grid or fmt.logprob_encoding(logprob_dtype)
        self.schema = fmt.shard_schema(self.mode, logprob_dtype, self.version, self.codecs.names)

    @classmethod
    def of(cls, manifest: dict) -> RowRules:
        """The rules of the cache a validated manifest describes."""
        return cls(
            window=manifest["window"],
            vocab=manifest["vocab"]["embedding_size"],
            selection=manifest["selection"],
            logprob_dtype=manifest["encoding"].get("logprobs", "float32"),
            version=manifest["format_version"],
            encodings=manifest["encoding"].get("columns"),
        )

    def check_read(self, columns: WindowColumns) -> None:
        """The rules every read applies. Raises BadShard naming the first broken one."""
        if self.version >= 2 and columns.checksum != window_checksum(columns, self.mode):
            raise BadShard("checksum mismatch (its bytes changed after it was written)")
        w, length = self.w, columns.length
        if not 1 <= length <= w:
            raise BadShard(f"length {length} outside [1, {w}]")
        for name in (fmt.INPUT_IDS, fmt.TARGET_LOGPROB):
            if columns.values(name).shape[0] != w:
                raise BadShard(f"{name} has {columns.values(name).shape[0]} entries, expected W={w}")
        starts = columns.segment_starts
        if starts.shape[0] < 1 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= length:
            raise BadShard(
                f"segment_starts {starts[:8].tolist()}... must start at 0, increase and stay below length"
            )
        for name in (fmt.INPUT_IDS, fmt.IDS):
            ids = columns.values(name)  # int32; as uint32 a negative id is >= 2^31 > vocab
            if ids.size and ids.view(np.uint32).max() >= self.vocab:
                raise BadShard(f"{name} outside [0, {self.vocab}) (embedding size)")
        self.rows.check_shape(columns, w=w, size=self.size)

    def check_all(self, columns: WindowColumns) -> int:
        """Every rule of the format; returns the window's real token count. Raises BadShard."""
        self.check_read(columns)
        length, target = columns.length, columns.target_logprob
        real = target[: length - 1]
        if not np.all(np.isfinite(real)) or np.any(real > fmt.LOGPROB_MAX):
            raise BadShard("target_logprob not finite and <= 0 on real rows")
        if not np.all(np.isnan(target[length - 1 :])):
            raise BadShard("target_logprob must be NaN from row length-1 on")
        self.rows.check(columns, w=self.w, size=self.size, vocab=self.vocab, logprobs=self.logprobs)
        self.rows.check_rule(columns, w=self.w, selection=self.selection, logprobs=self.logprobs)
        return int(length)
