"""Constants and the Arrow schema of the longkd cache format (docs/format.md is the spec).

Everything that both writes and reads shards (writer, reader, verify, trainer stream) takes
its column names and types from here, so the format lives in one place. What varies between
caches is declared here as data: each selection mode's own columns (:data:`SELECTIONS`) and
each log-prob encoding's value type and rounding allowance (:data:`LOGPROB_ENCODINGS`); how
a mode's rows are encoded, checked and decoded is cache/rows.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.errors import LongkdError

# Version 2 added the per-window ``checksum`` column; version 3 a named encoding per list column
# (the manifest's ``encoding.columns``). Version 1 and 2 caches (all columns plain) still read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

MANIFEST_NAME = "manifest.json"
BUILD_NAME = "build.json"
SHARDS_DIR = "shards"
PROGRESS_DIR = "progress"

# Column names, in schema order.
WINDOW_ID = "window_id"
LENGTH = "length"
INPUT_IDS = "input_ids"
SEGMENT_STARTS = "segment_starts"
IDS = "ids"
LOGPROBS = "logprobs"
COUNTS = "counts"
ROW_SPLITS = "row_splits"
TARGET_LOGPROB = "target_logprob"
CHECKSUM = "checksum"  # format 2: XXH3-64 of the row's other columns (docs/format.md "Checksum")

COMPRESSION = "zstd"
# zstd's own default level: on compact top-64 caches about 2% smaller than level 1 and
# about 10% slower to compress, far faster than the encoding before it (docs/benchmarks.md);
# recorded in the manifest so a reader knows what was used.
DEFAULT_COMPRESSION_LEVEL = 3


# log_softmax is <= 0 mathematically; a stored log-prob may exceed 0 by this much (rounding).
LOGPROB_MAX = 1e-6


@dataclass(frozen=True)
class LogprobEncoding:
    """One way of storing log-probs (the manifest's ``encoding.logprobs``).

    Attributes:
        name: its name in the manifest and for ``--logprob-dtype``.
        value_type: the Arrow type of one stored log-prob.
        tail_min: the most negative tail mass (1 minus the sum of a row's stored
            probabilities) rounding to this type can give; fp16 rounds each log-prob by up to
            2^-11 relative, so exp-sums of the stored top-k may exceed 1 by a few 1e-4.
        error: how far (nats) a read log-prob may lie from the teacher's beyond the value
            type's own rounding: 0 for plain columns, 1/64 for grid ones.
        coarse_error: what a log-prob below ``COARSE_LINE`` may lie further off (the coarse
            zone of ``grid-shift``: probabilities below 1e-4 on a coarser grid).
    """

    name: str
    value_type: pa.DataType
    tail_min: float
    error: float = 0.0
    coarse_error: float = 0.0

    def allowance(self, logprobs: np.ndarray) -> np.ndarray | float:
        """How far each read log-prob (float[n]) may lie from the teacher's: ``error``, plus
        ``coarse_error`` below ``COARSE_LINE``."""
        if not self.coarse_error:
            return self.error
        return np.where(logprobs < COARSE_LINE, self.error + self.coarse_error, self.error)


LOGPROB_ENCODINGS = {
    encoding.name: encoding
    for encoding in (
        LogprobEncoding("float32", pa.float32(), tail_min=-1e-4),
        LogprobEncoding("float16", pa.float16(), tail_min=-2e-3),
    )
}
LOGPROB_DTYPES = tuple(LOGPROB_ENCODINGS)
# What a ``grid-max`` or ``grid-min`` log-prob column reads as: float32 within 1/64 nat of the
# teacher's (the grid's rounding plus the row's shift to its exact tail; docs/format.md
# "grid-min"), the allowance a reader gives any writer; longkd's own writes stay within 1/128.
GRID_LOGPROBS = LogprobEncoding("grid", pa.float32(), tail_min=-1e-4, error=1 / 64)
# ``grid-shift`` may hold probabilities below 1e-4 on a grid up to 8 times coarser (rounding
# <= 1/8 nat, docs/format.md): a reader allows 1/4 nat more below log(1e-4) + 1/8 (the
# row's shift can lift a coarse value a little above log(1e-4)); longkd writes within 0.08.
COARSE_LINE = math.log(1e-4) + 1 / 8
GRID_SHIFT_LOGPROBS = LogprobEncoding("grid", pa.float32(), tail_min=-1e-4, error=1 / 64, coarse_error=1 / 4)

# A column type standing for the cache's log-prob encoding (its LogprobEncoding.value_type).
LOGPROB_VALUES = None


@dataclass(frozen=True)
class SelectionFormat:
    """What one selection mode stores besides the columns every shard has.

    Attributes:
        mode: its name (the manifest's ``selection.mode``).
        size_key: the manifest ``selection`` key holding its size (K entries, N draws).
        columns: ``(name, list value type)`` of its own columns, in schema order (between
            ``ids`` and ``target_logprob``); :data:`LOGPROB_VALUES` stands for the cache's
            log-prob encoding.
    """

    mode: str
    size_key: str
    columns: tuple[tuple[str, pa.DataType | None], ...]

    def fields(self, logprobs: LogprobEncoding) -> list[pa.Field]:
        """The Arrow fields of this mode's own columns under the log-prob encoding ``logprobs``."""
        return [
            pa.field(
                name, pa.list_(logprobs.value_type if value is LOGPROB_VALUES else value), nullable=False
            )
            for name, value in self.columns
        ]


SELECTIONS = {
    selection.mode: selection
    for selection in (
        SelectionFormat("topk", size_key="k", columns=((LOGPROBS, LOGPROB_VALUES),)),
        SelectionFormat(
            "sampled", size_key="draws", columns=((COUNTS, pa.uint16()), (ROW_SPLITS, pa.int32()))
        ),
        # Mass-adaptive top-k: each row keeps 1..K of its top entries (docs/format.md).
        SelectionFormat(
            "adaptive", size_key="k", columns=((LOGPROBS, LOGPROB_VALUES), (ROW_SPLITS, pa.int32()))
        ),
    )
}
SELECTION_MODES = tuple(SELECTIONS)


# Column encodings (the manifest's ``encoding.columns``, format 3), each with the list columns it
# may encode; cache/column_codecs.py implements them and docs/format.md specifies their bytes.
# ``plain`` is the list type of the schema (all a version 1 or 2 cache has); every other
# encoding stores one binary blob per row.
PLAIN = "plain"
COLUMN_ENCODINGS = {
    PLAIN: (INPUT_IDS, SEGMENT_STARTS, IDS, LOGPROBS, COUNTS, ROW_SPLITS, TARGET_LOGPROB),
    "sorted-gaps": (IDS,),
    "dictionary": (IDS,),
    "grid-max": (LOGPROBS,),
    "grid-min": (LOGPROBS,),
    "grid-shift": (LOGPROBS,),
    "grid": (TARGET_LOGPROB,),
    "ints": (INPUT_IDS,),
    "gaps": (SEGMENT_STARTS,),
    "minus-one": (COUNTS,),
    "entry-counts": (ROW_SPLITS,),
}
# `longkd cache build --encoding`: a choice per column (columns a mode lacks are ignored, those
# not named are plain). compact is the smallest measured (docs/benchmarks.md).
ENCODING_PRESETS = {
    "plain": {},
    "compact": {
        INPUT_IDS: "ints",
        SEGMENT_STARTS: "gaps",
        IDS: "dictionary",
        LOGPROBS: "grid-shift",
        COUNTS: "minus-one",
        ROW_SPLITS: "entry-counts",
        TARGET_LOGPROB: "grid",
    },
}
# The ids encodings that store each row's entries by ascending id (not in rank order).
ID_ORDER_ENCODINGS = ("sorted-gaps", "dictionary")
# The log-prob encodings on the grid, and what each one's log-probs read as: float32 within
# LogprobEncoding.allowance of the teacher's.
GRID_READS = {"grid-max": GRID_LOGPROBS, "grid-min": GRID_LOGPROBS, "grid-shift": GRID_SHIFT_LOGPROBS}
GRID_ENCODINGS = tuple(GRID_READS)
# Columns with one value per stored entry (ids and their companions); they share one order.
ENTRY_COLUMNS = (IDS, LOGPROBS, COUNTS)


def list_columns(selection_mode: str) -> tuple[str, ...]:
    """The list columns of a ``selection_mode`` shard, in schema order."""
    own = tuple(name for name, _ in selection_format(selection_mode).columns)
    return (INPUT_IDS, SEGMENT_STARTS, IDS, *own, TARGET_LOGPROB)


def column_encodings(
    selection_mode: str, named: dict | None = None, *, where: str = "encoding.columns"
) -> dict:
    """Every list column of a ``selection_mode`` cache with its encoding.

    Args:
        selection_mode: the cache's selection mode.
        named: the manifest's ``encoding.columns`` (None for a version 1 or 2 cache): column
            name -> encoding name; columns it leaves out are plain.
        where: what ``named`` is, for messages.

    Returns:
        ``{column: encoding}`` for every list column, in schema order.

    Raises:
        LongkdError: a column the mode does not have, an unknown encoding, or one that does not
            apply to its column.
    """
    columns = list_columns(selection_mode)
    named = dict(named or {})
    for column, encoding in named.items():
        if column not in columns:
            raise LongkdError(
                f"{where} names column {column!r}, which a {selection_mode} cache does not have "
                f"(its columns: {', '.join(columns)}); rebuild the cache"
            )
        if encoding not in COLUMN_ENCODINGS:
            raise LongkdError(
                f"{where}: unknown encoding {encoding!r} for {column}; this longkd knows "
                f"{', '.join(COLUMN_ENCODINGS)} (a newer longkd may have written it)"
            )
        if column not in COLUMN_ENCODINGS[encoding]:
            allowed = [name for name, cols in COLUMN_ENCODINGS.items() if column in cols]
            raise LongkdError(
                f"{where}: encoding {encoding!r} does not apply to {column}; use one of {', '.join(allowed)}"
            )
    return {column: named.get(column, PLAIN) for column in columns}


def encoding_preset(name: str, selection_mode: str) -> dict:
    """The column encodings ``--encoding name`` gives a ``selection_mode`` cache.

    Raises:
        LongkdError: an unknown preset.
    """
    if name not in ENCODING_PRESETS:
        raise LongkdError(f"unknown --encoding {name!r}; use one of {', '.join(ENCODING_PRESETS)}")
    columns = list_columns(selection_mode)
    return column_encodings(selection_mode, {c: e for c, e in ENCODING_PRESETS[name].items() if c in columns})


def selection_format(mode: str) -> SelectionFormat:
    """The declaration of selection mode ``mode``.

    Raises:
        LongkdError: an unknown selection mode.
    """
    if mode not in SELECTION_MODES:
        raise LongkdError(f"unknown selection mode {mode!r}; use one of {', '.join(SELECTION_MODES)}")
    return SELECTIONS[mode]


def logprob_encoding(name: str) -> LogprobEncoding:
    """The log-prob encoding called ``name``.

    Raises:
        LongkdError: an unknown log-prob encoding.
    """
    if name not in LOGPROB_DTYPES:
        raise LongkdError(f"unknown logprob dtype {name!r}; use one of {', '.join(LOGPROB_DTYPES)}")
    return LOGPROB_ENCODINGS[name]


def shard_name(rank: int, index: int) -> str:
    """Relative path of a completed shard: ``shards/shard-RRRRR-SSSSSS.arrow``."""
    return f"{SHARDS_DIR}/shard-{rank:05d}-{index:06d}.arrow"


def temp_shard_name(rank: int, index: int) -> str:
    """Relative path a shard is written under before it is complete (never matches shard-*.arrow)."""
    return f"{SHARDS_DIR}/.tmp-shard-{rank:05d}-{index:06d}.arrow.part"


def ledger_name(rank: int) -> str:
    """Relative path of a producer rank's progress ledger (one JSON line per completed shard)."""
    return f"{PROGRESS_DIR}/rank-{rank:05d}.jsonl"


def shard_schema(
    selection_mode: str,
    logprob_dtype: str = "float32",
    version: int = FORMAT_VERSION,
    encodings: dict | None = None,
) -> pa.Schema:
    """The Arrow schema of one shard.

    Args:
        selection_mode: a key of :data:`SELECTIONS`: ``"topk"`` (columns ids, logprobs),
            ``"sampled"`` (ids, counts, row_splits) or ``"adaptive"`` (ids, logprobs, row_splits).
        logprob_dtype: a key of :data:`LOGPROB_ENCODINGS`, the value type of stored log-probs
            (``logprobs`` of top-k and adaptive shards): ``"float32"`` or ``"float16"``.
        version: the cache's format version, one of :data:`READABLE_VERSIONS`; versions 2
            and 3 end with the ``checksum`` column, version 1 has none.
        encodings: column name -> encoding (:func:`column_encodings`; version 3 only); a
            column encoded other than plain is ``binary``. None: all plain.

    Returns:
        The schema; every shard of a cache has exactly this schema.

    Raises:
        LongkdError: an unknown selection mode, logprob dtype, format version or encoding.
    """
    if version not in READABLE_VERSIONS:
        raise LongkdError(f"format version {version!r} is not one this longkd reads ({READABLE_VERSIONS})")
    selection = selection_format(selection_mode)
    logprobs = logprob_encoding(logprob_dtype)
    fields = [
        pa.field(WINDOW_ID, pa.int64(), nullable=False),
        pa.field(LENGTH, pa.int32(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(SEGMENT_STARTS, pa.list_(pa.int32()), nullable=False),
        pa.field(IDS, pa.list_(pa.int32()), nullable=False),
    ]
    fields.extend(selection.fields(logprobs))
    fields.append(pa.field(TARGET_LOGPROB, pa.list_(pa.float32()), nullable=False))
    if encodings is not None:
        if version < 3 and any(name != PLAIN for name in encodings.values()):
            raise LongkdError(f"format version {version} stores every column plain")
        encodings = column_encodings(selection_mode, encodings)
        fields = [
            pa.field(f.name, pa.binary(), nullable=False) if encodings.get(f.name, PLAIN) != PLAIN else f
            for f in fields
        ]
    if version >= 2:
        fields.append(pa.field(CHECKSUM, pa.uint64(), nullable=False))
    return pa.schema(fields, metadata={b"longkd_format_version": str(version).encode()})
