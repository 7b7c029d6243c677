"""Constants and the Arrow schema of the longkd cache format (docs/format.md is the spec).

Everything that both writes and reads shards (writer, reader, verify, trainer stream) takes
its column names and types from here, so the format lives in one place. What varies between
caches is declared here as data: each selection mode's own columns (:data:`SELECTIONS`) and
each log-prob encoding's value type and rounding allowance (:data:`LOGPROB_ENCODINGS`); how
a mode's rows are encoded, checked and decoded is cache/rows.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from longkd.errors import LongkdError

# Version 2 added the per-window ``checksum`` column; version 1 caches (no checksum) still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

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
# pyarrow's zstd default; recorded in the manifest so a reader knows what was used.
DEFAULT_COMPRESSION_LEVEL = 1


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
    """

    name: str
    value_type: pa.DataType
    tail_min: float


LOGPROB_ENCODINGS = {
    encoding.name: encoding
    for encoding in (
        LogprobEncoding("float32", pa.float32(), tail_min=-1e-4),
        LogprobEncoding("float16", pa.float16(), tail_min=-2e-3),
    )
}
LOGPROB_DTYPES = tuple(LOGPROB_ENCODINGS)

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
    selection_mode: str, logprob_dtype: str = "float32", version: int = FORMAT_VERSION
) -> pa.Schema:
    """The Arrow schema of one shard.

    Args:
        selection_mode: a key of :data:`SELECTIONS`: ``"topk"`` (columns ids, logprobs),
            ``"sampled"`` (ids, counts, row_splits) or ``"adaptive"`` (ids, logprobs, row_splits).
        logprob_dtype: a key of :data:`LOGPROB_ENCODINGS`, the value type of stored log-probs
            (``logprobs`` of top-k and adaptive shards): ``"float32"`` or ``"float16"``.
        version: the cache's format version, one of :data:`READABLE_VERSIONS`; version 2
            ends with the ``checksum`` column, version 1 has none.

    Returns:
        The schema; every shard of a cache has exactly this schema.

    Raises:
        LongkdError: an unknown selection mode, logprob dtype or format version.
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
    if version >= 2:
        fields.append(pa.field(CHECKSUM, pa.uint64(), nullable=False))
    return pa.schema(fields, metadata={b"longkd_format_version": str(version).encode()})
