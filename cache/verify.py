"""Integrity checks (``longkd cache verify``) and a summary (``longkd cache info``) of a cache.

Verify re-derives everything the manifest promises from the bytes on disk: file sizes and
sha256, the Arrow schema, row counts and tokens, window ids (each shard an arithmetic run
``first_window + stride * i``; the runs of each residue class chain without gaps and together
cover ``0 .. windows - 1``; stride 1 for a one-rank build), and the
invariants of every row (list lengths, log-probs finite, <= 0 and descending, tail mass not
negative, ids inside the vocabulary, sampled counts summing to the draws). It stops at the
first problem and names the shard and what is wrong, so a user knows which file to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.cache import format as fmt
from longkd.cache.manifest import load_manifest
from longkd.cache.rows import (
    BadShard,
    UnreadableShard,
    WindowColumns,
    check_schema,
    open_shard,
    read_columns,
    selection_rows,
)
from longkd.cache.storage import Location
from longkd.errors import LongkdError


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_cache`: ``problem`` is None when everything checked out."""

    ok: bool
    shards: int
    windows: int
    problem: str | None = None


def verify_cache(uri) -> VerifyResult:
    """Check a finished cache against its manifest and the format's invariants.

    Args:
        uri: the cache directory.

    Returns:
        ``VerifyResult``: ``ok`` and counts, or the first problem ("shard PATH: what is wrong").

    Raises:
        LongkdError: the directory does not exist or holds no manifest.json (nothing to verify).
    """
    location = uri if isinstance(uri, Location) else Location(uri)
    if not location.exists() or not location.is_file(fmt.MANIFEST_NAME):
        load_manifest(location)  # raises the standard "not a finished cache" message
    try:
        manifest = load_manifest(location)
    except LongkdError as err:
        return VerifyResult(False, 0, 0, str(err))
    shards = manifest["shards"]
    strides = {s.get("stride", 1) for s in shards}
    if len(strides) > 1 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in strides):
        problem = f"manifest shard strides {sorted(map(str, strides))} are not one positive integer"
        return VerifyResult(False, 0, 0, problem)
    stride = strides.pop() if strides else 1
    # next expected window id of each residue class (shards of one producer rank)
    chain = {r: r for r in range(stride)}
    windows = 0
    for i, shard in enumerate(shards):
        residue = int(shard["first_window"]) % stride
        try:
            chain[residue] = _verify_shard(location, manifest, shard, chain[residue], stride)
        except BadShard as bad:
            return VerifyResult(False, i, windows, f"shard {shard['path']}: {bad}")
        windows += int(shard["rows"])
    for residue, end in chain.items():
        if end != residue + stride * len(range(residue, windows, stride)):
            problem = (
                f"window ids {residue} mod {stride} end at {end - stride}, but the shards hold "
                f"{windows} windows (ids missing or repeated)"
            )
            return VerifyResult(False, len(shards), windows, problem)
    totals = manifest["totals"]
    sums = {
        "windows": windows,
        "tokens": sum(int(s["tokens"]) for s in shards),
        "bytes": sum(int(s["bytes"]) for s in shards),
    }
    for key, value in sums.items():
        if totals.get(key) != value:
            problem = f"manifest totals.{key} is {totals.get(key)} but the shards add up to {value}"
            return VerifyResult(False, len(shards), windows, problem)
    return VerifyResult(True, len(shards), windows)


def _verify_shard(location: Location, manifest: dict, shard: dict, first_window: int, stride: int = 1) -> int:
    """Check one shard; return the window id expected next in its residue class. Raises BadShard."""
    path = shard["path"]
    size = location.size(path)
    if size < 0:
        raise BadShard("missing (listed in manifest.json but not on disk)")
    if size != shard["bytes"]:
        raise BadShard(f"size is {size} bytes, manifest says {shard['bytes']} (file truncated or changed)")
    if location.sha256(path) != shard["sha256"]:
        raise BadShard("sha256 mismatch (file changed or corrupted)")
    try:
        reader = open_shard(location, path)
    except UnreadableShard as err:
        raise BadShard(f"not a readable Arrow IPC file ({err.reason})") from err.reason
    mode = manifest["selection"]["mode"]
    check_schema(reader.schema, mode, manifest["encoding"].get("logprobs", "float32"))
    if shard["first_window"] != first_window:
        raise BadShard(
            f"manifest first_window is {shard['first_window']}, expected {first_window} (ids not contiguous)"
        )
    checker = _RowChecker(manifest)
    rows = tokens = 0
    next_window = first_window
    for b in range(reader.num_record_batches):
        try:
            batch = reader.get_batch(b)
        except (OSError, pa.ArrowException) as err:
            raise BadShard(f"record batch {b} unreadable ({err})") from err
        for r in range(batch.num_rows):
            window_id = batch.column(fmt.WINDOW_ID)[r].as_py()
            if window_id != next_window:
                raise BadShard(
                    f"row {rows} has window_id {window_id}, expected {next_window} (ids not contiguous)"
                )
            try:
                tokens += checker.check(read_columns(batch, r, mode))
            except BadShard as bad:
                raise BadShard(f"window {window_id}: {bad}") from None
            rows += 1
            next_window += stride
    if rows != shard["rows"]:
        raise BadShard(f"holds {rows} rows, manifest says {shard['rows']}")
    if tokens != shard["tokens"]:
        raise BadShard(f"holds {tokens} tokens, manifest says {shard['tokens']}")
    return next_window


class _RowChecker:
    """Per-row invariants of docs/format.md for one cache (the selection mode's own: cache/rows.py)."""

    def __init__(self, manifest: dict):
        self.w = int(manifest["window"])
        self.vocab = int(manifest["vocab"]["embedding_size"])
        self.rows = selection_rows(manifest["selection"]["mode"])
        self.size = manifest["selection"].get(self.rows.format.size_key)
        self.logprobs = fmt.LOGPROB_ENCODINGS[manifest["encoding"].get("logprobs", "float32")]

    def check(self, columns: WindowColumns) -> int:
        """Check one window's row; return its real token count. Raises BadShard."""
        w = self.w
        length = columns.length
        if not 1 <= length <= w:
            raise BadShard(f"length {length} outside [1, {w}]")
        input_ids = columns.input_ids
        if input_ids.shape[0] != w:
            raise BadShard(f"input_ids has {input_ids.shape[0]} tokens, expected W={w}")
        starts = columns.segment_starts
        if starts.shape[0] < 1 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= length:
            raise BadShard(
                f"segment_starts {starts[:8].tolist()}... must start at 0, increase and stay below length"
            )
        target = columns.target_logprob
        if target.shape[0] != w:
            raise BadShard(f"target_logprob has {target.shape[0]} rows, expected {w}")
        real = target[: length - 1]
        if not np.all(np.isfinite(real)) or np.any(real > fmt.LOGPROB_MAX):
            raise BadShard("target_logprob not finite and <= 0 on real rows")
        if not np.all(np.isnan(target[length - 1 :])):
            raise BadShard("target_logprob must be NaN from row length-1 on")
        ids = columns.ids
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise BadShard(f"ids outside [0, {self.vocab}) (embedding size)")
        self.rows.check(columns, w=w, size=self.size, vocab=self.vocab, logprobs=self.logprobs)
        return int(length)


def cache_info(uri) -> dict:
    """A summary of a finished cache for ``longkd cache info`` (JSON-serialisable).

    Raises:
        LongkdError: not a finished cache.
    """
    location = uri if isinstance(uri, Location) else Location(uri)
    m = load_manifest(location)
    totals = m["totals"]
    on_disk = sum(max(location.size(s["path"]), 0) for s in m["shards"]) + location.size(fmt.MANIFEST_NAME)
    tokens = int(totals["tokens"])
    stats = m["packing"].get("stats", {})
    return {
        "uri": location.uri,
        "format_version": m["format_version"],
        "teacher": m["teacher"].get("name_or_path"),
        "tokenizer_size": m["vocab"].get("tokenizer_size"),
        "embedding_size": m["vocab"].get("embedding_size"),
        "window": m["window"],
        "windows": totals["windows"],
        "tokens": tokens,
        "selection": m["selection"],
        "temperature": m["temperature"],
        "logprobs_encoding": m["encoding"].get("logprobs"),
        "position_mode": m["packing"].get("position_mode"),
        "packing_efficiency": stats.get("efficiency"),
        "shards": len(m["shards"]),
        "bytes_on_disk": on_disk,
        "bytes_per_token": on_disk / tokens if tokens else None,
    }
