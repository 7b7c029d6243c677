"""Constants and the Arrow schema of the longkd cache format (docs/format.md is the spec).

Everything that both writes and reads shards (writer, reader, verify, trainer stream) takes
its column names and types from here, so the format lives in one place.
"""

from __future__ import annotations

import pyarrow as pa

from longkd.errors import LongkdError

FORMAT_VERSION = 1

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

SELECTION_MODES = ("topk", "sampled")
LOGPROB_DTYPES = ("float32", "float16")
COMPRESSION = "zstd"
# pyarrow's zstd default; recorded in the manifest so a reader knows what was used.
DEFAULT_COMPRESSION_LEVEL = 1


def shard_name(rank: int, index: int) -> str:
    """Relative path of a completed shard: ``shards/shard-RRRRR-SSSSSS.arrow``."""
    return f"{SHARDS_DIR}/shard-{rank:05d}-{index:06d}.arrow"


def temp_shard_name(rank: int, index: int) -> str:
    """Relative path a shard is written under before it is complete (never matches shard-*.arrow)."""
    return f"{SHARDS_DIR}/.tmp-shard-{rank:05d}-{index:06d}.arrow.part"


def ledger_name(rank: int) -> str:
    """Relative path of a producer rank's progress ledger (one JSON line per completed shard)."""
    return f"{PROGRESS_DIR}/rank-{rank:05d}.jsonl"


def shard_schema(selection_mode: str, logprob_dtype: str = "float32") -> pa.Schema:
    """The Arrow schema of one shard.

    Args:
        selection_mode: ``"topk"`` (columns ids, logprobs) or ``"sampled"`` (ids, counts,
            row_splits).
        logprob_dtype: value type of ``logprobs`` for top-k shards, ``"float32"`` or ``"float16"``.

    Returns:
        The schema; every shard of a cache has exactly this schema.

    Raises:
        LongkdError: an unknown selection mode or logprob dtype.
    """
    if selection_mode not in SELECTION_MODES:
        raise LongkdError(
            f"unknown selection mode {selection_mode!r}; use one of {', '.join(SELECTION_MODES)}"
        )
    if logprob_dtype not in LOGPROB_DTYPES:
        raise LongkdError(f"unknown logprob dtype {logprob_dtype!r}; use one of {', '.join(LOGPROB_DTYPES)}")
    fields = [
        pa.field(WINDOW_ID, pa.int64(), nullable=False),
        pa.field(LENGTH, pa.int32(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(SEGMENT_STARTS, pa.list_(pa.int32()), nullable=False),
        pa.field(IDS, pa.list_(pa.int32()), nullable=False),
    ]
    if selection_mode == "topk":
        value = pa.float16() if logprob_dtype == "float16" else pa.float32()
        fields.append(pa.field(LOGPROBS, pa.list_(value), nullable=False))
    else:
        fields.append(pa.field(COUNTS, pa.list_(pa.uint16()), nullable=False))
        fields.append(pa.field(ROW_SPLITS, pa.list_(pa.int32()), nullable=False))
    fields.append(pa.field(TARGET_LOGPROB, pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields, metadata={b"longkd_format_version": str(FORMAT_VERSION).encode()})
