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
from longkd.cache.storage import Location
from longkd.errors import LongkdError

# Rounding allowances: log_softmax is <= 0 mathematically; fp16 storage rounds each log-prob
# by up to 2^-11 relative, so exp-sums of the stored top-k may exceed 1 by a few 1e-4.
LOGPROB_MAX = 1e-6
TAIL_MIN = {"float32": -1e-4, "float16": -2e-3}


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_cache`: ``problem`` is None when everything checked out."""

    ok: bool
    shards: int
    windows: int
    problem: str | None = None


class _Bad(Exception):
    """A problem in one shard (message without the shard name)."""


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
        except _Bad as bad:
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
    """Check one shard; return the window id expected next in its residue class. Raises _Bad."""
    path = shard["path"]
    size = location.size(path)
    if size < 0:
        raise _Bad("missing (listed in manifest.json but not on disk)")
    if size != shard["bytes"]:
        raise _Bad(f"size is {size} bytes, manifest says {shard['bytes']} (file truncated or changed)")
    if location.sha256(path) != shard["sha256"]:
        raise _Bad("sha256 mismatch (file changed or corrupted)")
    try:
        reader = pa.ipc.open_file(location.open_input(path))
    except (OSError, pa.ArrowException) as err:
        raise _Bad(f"not a readable Arrow IPC file ({err})") from err
    mode = manifest["selection"]["mode"]
    dtype = manifest["encoding"].get("logprobs", "float32")
    schema = fmt.shard_schema(mode, dtype)
    if not reader.schema.equals(schema, check_metadata=False):
        raise _Bad(f"schema differs from format v{fmt.FORMAT_VERSION} {mode}/{dtype}: {reader.schema}")
    if shard["first_window"] != first_window:
        raise _Bad(
            f"manifest first_window is {shard['first_window']}, expected {first_window} (ids not contiguous)"
        )
    checker = _RowChecker(manifest)
    rows = tokens = 0
    next_window = first_window
    for b in range(reader.num_record_batches):
        try:
            batch = reader.get_batch(b)
        except (OSError, pa.ArrowException) as err:
            raise _Bad(f"record batch {b} unreadable ({err})") from err
        for r in range(batch.num_rows):
            window_id = batch.column(fmt.WINDOW_ID)[r].as_py()
            if window_id != next_window:
                raise _Bad(
                    f"row {rows} has window_id {window_id}, expected {next_window} (ids not contiguous)"
                )
            try:
                tokens += checker.check(batch, r)
            except _Bad as bad:
                raise _Bad(f"window {window_id}: {bad}") from None
            rows += 1
            next_window += stride
    if rows != shard["rows"]:
        raise _Bad(f"holds {rows} rows, manifest says {shard['rows']}")
    if tokens != shard["tokens"]:
        raise _Bad(f"holds {tokens} tokens, manifest says {shard['tokens']}")
    return next_window


class _RowChecker:
    """Per-row invariants of docs/format.md for one cache."""

    def __init__(self, manifest: dict):
        self.w = int(manifest["window"])
        self.vocab = int(manifest["vocab"]["embedding_size"])
        self.mode = manifest["selection"]["mode"]
        self.k = manifest["selection"].get("k")
        self.draws = manifest["selection"].get("draws")
        self.tail_min = TAIL_MIN[manifest["encoding"].get("logprobs", "float32")]

    def check(self, batch: pa.RecordBatch, r: int) -> int:
        """Check row ``r``; return its real token count. Raises _Bad."""

        def values(name: str) -> np.ndarray:
            return batch.column(name)[r].values.to_numpy(zero_copy_only=False)

        w = self.w
        length = batch.column(fmt.LENGTH)[r].as_py()
        if not 1 <= length <= w:
            raise _Bad(f"length {length} outside [1, {w}]")
        input_ids = values(fmt.INPUT_IDS)
        if input_ids.shape[0] != w:
            raise _Bad(f"input_ids has {input_ids.shape[0]} tokens, expected W={w}")
        starts = values(fmt.SEGMENT_STARTS)
        if starts.shape[0] < 1 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= length:
            raise _Bad(
                f"segment_starts {starts[:8].tolist()}... must start at 0, increase and stay below length"
            )
        target = values(fmt.TARGET_LOGPROB)
        if target.shape[0] != w:
            raise _Bad(f"target_logprob has {target.shape[0]} rows, expected {w}")
        real = target[: length - 1]
        if not np.all(np.isfinite(real)) or np.any(real > LOGPROB_MAX):
            raise _Bad("target_logprob not finite and <= 0 on real rows")
        if not np.all(np.isnan(target[length - 1 :])):
            raise _Bad("target_logprob must be NaN from row length-1 on")
        ids = values(fmt.IDS)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise _Bad(f"ids outside [0, {self.vocab}) (embedding size)")
        if self.mode == "topk":
            self._check_topk(ids, values(fmt.LOGPROBS))
        else:
            self._check_sampled(ids, values(fmt.COUNTS), values(fmt.ROW_SPLITS))
        return int(length)

    def _check_topk(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        w, k = self.w, self.k
        if ids.shape[0] != w * k or logprobs.shape[0] != w * k:
            raise _Bad(f"ids/logprobs have {ids.shape[0]}/{logprobs.shape[0]} entries, expected W*K={w * k}")
        lp = logprobs.astype(np.float32).reshape(w, k)
        if not np.all(np.isfinite(lp)):
            raise _Bad("logprobs not finite")
        if np.any(lp > LOGPROB_MAX):
            raise _Bad(f"logprobs above 0 (max {float(lp.max()):.3g})")
        if np.any(np.diff(lp, axis=1) > 0):
            row = int(np.argmax(np.any(np.diff(lp, axis=1) > 0, axis=1)))
            raise _Bad(f"row {row}: logprobs not descending")
        tail = 1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)
        if np.any(tail < self.tail_min):
            row = int(np.argmin(tail))
            raise _Bad(f"row {row}: tail mass {tail[row]:.3g} < {self.tail_min} (probabilities sum above 1)")
        if k > 1:
            per_row = np.sort(ids.reshape(w, k), axis=1)
            if np.any(per_row[:, 1:] == per_row[:, :-1]):
                raise _Bad("an id repeats within a row")

    def _check_sampled(self, ids: np.ndarray, counts: np.ndarray, splits: np.ndarray) -> None:
        w = self.w
        if splits.shape[0] != w + 1:
            raise _Bad(f"row_splits has {splits.shape[0]} entries, expected W+1={w + 1}")
        if counts.shape[0] != ids.shape[0]:
            raise _Bad(f"counts has {counts.shape[0]} entries, ids {ids.shape[0]}")
        if splits[0] != 0 or np.any(np.diff(splits) < 0) or splits[-1] != ids.shape[0]:
            raise _Bad("row_splits must start at 0, not decrease and end at len(ids)")
        if np.any(counts == 0):
            raise _Bad("a stored count is 0")
        cum = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
        sums = cum[splits[1:]] - cum[splits[:-1]]
        if np.any(sums != self.draws):
            row = int(np.argmax(sums != self.draws))
            raise _Bad(f"row {row}: counts sum to {sums[row]}, expected draws={self.draws}")
        rows = np.repeat(np.arange(w, dtype=np.int64), np.diff(splits))
        if np.unique(rows * self.vocab + ids).shape[0] != ids.shape[0]:
            raise _Bad("an id repeats within a row")


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
