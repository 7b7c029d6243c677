"""Integrity checks (``longkd cache verify``) and a summary (``longkd cache info``) of a cache.

Verify re-derives everything the manifest promises from the bytes on disk: file sizes and
sha256, the Arrow schema, row counts and tokens, window ids (each shard an arithmetic run
``first_window + stride * i``; the runs of each residue class chain without gaps and together
cover ``0 .. windows - 1``; stride 1 for a one-rank build), and the
invariants of every row (cache/rows.py's ``RowRules``: the checksum of a format-2 row, list
lengths, log-probs finite, <= 0 and descending, tail mass not negative, ids and input ids
inside the vocabulary, sampled counts summing to the draws, adaptive rows obeying their
recorded rule). It stops at the
first problem and names the shard and what is wrong, so a user knows which file to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longkd.cache import format as fmt
from longkd.cache.manifest import load_manifest
from longkd.cache.rows import BadShard, RowRules, ShardFile, UnreadableShard, read_columns
from longkd.cache.storage import Location
from longkd.errors import LongkdError

# Windows `cache info` reads to measure the entries per row of a ragged (adaptive, sampled) cache.
INFO_SAMPLE_WINDOWS = 16


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
    # The manifest's schema already held: one positive stride, totals equal to the shards'
    # sums, every shard file present with its claimed size.
    shards = manifest["shards"]
    stride = shards[0].get("stride", 1) if shards else 1
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
    return VerifyResult(True, len(shards), windows)


def _verify_shard(location: Location, manifest: dict, shard: dict, first_window: int, stride: int = 1) -> int:
    """Check one shard; return the window id expected next in its residue class. Raises BadShard."""
    path = shard["path"]
    if location.sha256(path) != shard["sha256"]:
        raise BadShard("sha256 mismatch (file changed or corrupted)")
    rules = RowRules.of(manifest)
    try:
        file = ShardFile(location, path, shard["rows"], schema=rules.schema)
    except UnreadableShard as err:
        raise BadShard(f"not a readable Arrow IPC file of this cache's format ({err.reason})") from None
    if shard["first_window"] != first_window:
        raise BadShard(
            f"manifest first_window is {shard['first_window']}, expected {first_window} (ids not contiguous)"
        )
    rows = tokens = 0
    next_window = first_window
    for b in range(file.file.num_record_batches):
        batch = file.batch(b)
        for r in range(batch.num_rows):
            try:
                columns = read_columns(batch, r, rules.mode, rules.codecs)
            except BadShard as bad:
                raise BadShard(f"row {rows}: {bad}") from None
            if columns.window_id != next_window:
                found, want = columns.window_id, next_window
                raise BadShard(f"row {rows} has window_id {found}, expected {want} (ids not contiguous)")
            try:
                tokens += rules.check_all(columns)
            except BadShard as bad:
                raise BadShard(f"window {columns.window_id}: {bad}") from None
            rows += 1
            next_window += stride
    if rows != shard["rows"]:
        raise BadShard(f"holds {rows} rows, manifest says {shard['rows']}")
    if tokens != shard["tokens"]:
        raise BadShard(f"holds {tokens} tokens, manifest says {shard['tokens']}")
    return next_window


def describe_selection(selection: dict) -> str:
    """A manifest ``selection`` in words: ``top-k 64``, ``adaptive top-k 64 (min mass 0.999)``,
    ``sampled, 64 draws``."""
    mode = selection["mode"]
    if mode == "sampled":
        return f"sampled, {selection['draws']} draws"
    if mode == "adaptive":
        rules = [f"min {name} {selection[f'min_{name}']:g}" for name in ("mass", "prob")
                 if selection.get(f"min_{name}") is not None]  # fmt: skip
        return f"adaptive top-k {selection['k']} ({', '.join(rules)})"
    return f"top-k {selection['k']}"


def mean_entries_per_row(uri, windows: int = INFO_SAMPLE_WINDOWS) -> tuple[float, int]:
    """Mean stored entries per row (over all W rows) of up to ``windows`` windows spread evenly
    over a cache, and how many were read; for top-k caches K, with no window read.

    Raises:
        LongkdError: not a finished cache, or a damaged window among those read.
    """
    from longkd.cache.reader import CacheReader

    with CacheReader(uri) as reader:
        selection = reader.selection
        if selection["mode"] == "topk":
            return float(selection["k"]), 0
        n = reader.num_windows
        indices = np.unique(np.linspace(0, n - 1, min(n, windows)).round().astype(np.int64)) if n else []
        entries = sum(int((window.ids >= 0).sum()) for window in reader.iter_windows(indices))
        return entries / (len(indices) * reader.window) if len(indices) else 0.0, len(indices)


def cache_info(uri) -> dict:
    """A summary of a finished cache for ``longkd cache info`` (JSON-serialisable).

    ``mean_entries_per_row`` is measured on ``entries_sampled_windows`` windows
    (:func:`mean_entries_per_row`) for caches whose rows differ in length.

    Raises:
        LongkdError: not a finished cache.
    """
    location = uri if isinstance(uri, Location) else Location(uri)
    m = load_manifest(location)
    totals = m["totals"]
    on_disk = sum(max(location.size(s["path"]), 0) for s in m["shards"]) + location.size(fmt.MANIFEST_NAME)
    tokens = int(totals["tokens"])
    stats = m["packing"].get("stats", {})
    info = {
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
        "column_encodings": fmt.column_encodings(m["selection"]["mode"], m["encoding"].get("columns")),
        "position_mode": m["packing"].get("position_mode"),
        "packing_efficiency": stats.get("efficiency"),
        "shards": len(m["shards"]),
        "bytes_on_disk": on_disk,
        "bytes_per_token": on_disk / tokens if tokens else None,
    }
    info["mean_entries_per_row"], info["entries_sampled_windows"] = mean_entries_per_row(location)
    return info
