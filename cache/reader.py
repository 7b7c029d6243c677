"""Read windows back from a finished cache, by global index, with random access.

Shards are Arrow IPC files, so a window is found by (shard, row) from the manifest's per-shard
``first_window``, ``stride`` and ``rows`` (:class:`WindowIndex`: a cache built by N ranks
interleaves window ids, shard of rank r holding r, r+N, r+2N, ...) and read through
``pa.ipc.RecordBatchFileReader`` without scanning the file, so a cache on an object store is
read with range requests, never downloaded whole.
Sampled caches (ids + counts + row_splits) are expanded (cache/rows.py) into the same dense
[W, K] view as top-k caches, so a trainer handles both alike.

Every read is checked, since a cache may come from elsewhere: the manifest against its schema
and the shard files' sizes when the reader opens, each shard's Arrow schema when it is first
used, and each window's Arrow structure, checksum (format 2) and cheap row rules when it is
read (cache/rows.py). A damaged window is a one-line :class:`~longkd.cache.rows.DamagedWindow`
naming the shard and the window, or, with ``skip_damaged``, left out of :meth:`iter_windows`
and counted. Format-1 caches have no per-window checksum: with ``full_pass`` (a caller that
reads every window, such as training) each shard is checked against the manifest's sha256
when it is first opened.

    from longkd.cache.reader import CacheReader
    reader = CacheReader("runs/cache")
    w = reader.read_window(0)   # w.ids [W, K], w.logprobs [W, K], w.position_ids [W]
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from longkd.cache.manifest import load_manifest
from longkd.cache.rows import (
    BadShard,
    DamagedWindow,
    RowRules,
    ShardFile,
    UnreadableShard,
    WindowColumns,
    dense_rows,
    read_columns,
)
from longkd.cache.storage import Location
from longkd.errors import LongkdError

log = logging.getLogger(__name__)

_OPEN_SHARDS = 8  # open file handles kept for random access (at least 2 x stride, see CacheReader)


@dataclass
class CachedWindow:
    """One cached window (docs/format.md "Row semantics": row t predicts input_ids[t+1]).

    Attributes:
        window_id: global window index.
        length: real tokens L (< W only for a padded last window).
        input_ids: int32[W].
        segment_starts: int32[S], starting with 0.
        position_ids: int64[W], derived from segment_starts and the cache's position mode.
        target_logprob: float32[W], teacher log-prob of input_ids[t+1]; NaN where t+1 >= L.
        ids: int32[W, K] teacher token ids; -1 marks padding (sampled and adaptive caches,
            where K is the window's largest row).
        logprobs: float32[W, K], log-probs over the full vocabulary at temperature T; -inf at
            padding. Sampled caches: log(counts / draws).
        counts: uint16[W, K] for sampled caches (0 at padding), None for top-k and adaptive.
    """

    window_id: int
    length: int
    input_ids: np.ndarray
    segment_starts: np.ndarray
    position_ids: np.ndarray
    target_logprob: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray | None


class WindowIndex:
    """Where each window id lives, from the manifest's shard entries alone.

    Every shard holds an arithmetic run of window ids, ``first_window + stride * i`` for
    ``i < rows`` (``stride`` defaults to 1; a build by N ranks writes stride N). Shards of one
    residue class ``first_window % stride`` chain without gaps, and together the classes hold
    ``0 .. total - 1`` exactly once. Memory is O(shards), not O(windows).

    Args:
        shards: manifest shard entries (``first_window``, ``rows``, optional ``stride``), in
            any order.
        where: names the cache in messages.

    Raises:
        LongkdError: mixed or non-positive strides, or ids that are missing, repeated or out of
            ``0 .. total - 1``: the manifest is corrupt.
    """

    def __init__(self, shards: list[dict], where: str = "cache"):
        strides = set()
        for shard in shards:
            stride = shard.get("stride", 1)
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise LongkdError(
                    f"{where}: shard {shard.get('path')!r} has stride {stride!r}; the manifest is corrupt"
                )
            strides.add(stride)
        if len(strides) > 1:
            raise LongkdError(f"{where}: shards mix strides {sorted(strides)}; the manifest is corrupt")
        self.stride = strides.pop() if strides else 1
        self.total = sum(int(s["rows"]) for s in shards)
        self._first = [int(s["first_window"]) for s in shards]
        self._rows = [int(s["rows"]) for s in shards]
        # residue class -> shards sorted by first window: (firsts, shard indices)
        chains: dict[int, list[tuple[int, int]]] = {}
        for i, first in enumerate(self._first):
            chains.setdefault(first % self.stride, []).append((first, i))
        self._chains: dict[int, tuple[list[int], list[int]]] = {}
        for residue in range(self.stride):
            chain = sorted(chains.pop(residue, []))
            expected = residue
            for first, i in chain:
                if first != expected:
                    raise LongkdError(
                        f"{where}: shard {shards[i].get('path')!r} starts at window {first}, expected "
                        f"{expected} (window ids missing or repeated); the manifest is corrupt"
                    )
                expected = first + self.stride * self._rows[i]
            wanted = len(range(residue, self.total, self.stride))
            if (expected - residue) // self.stride != wanted:
                raise LongkdError(
                    f"{where}: windows {residue} mod {self.stride} number "
                    f"{(expected - residue) // self.stride}, expected {wanted} of {self.total} windows "
                    "(window ids missing or repeated); the manifest is corrupt"
                )
            self._chains[residue] = ([f for f, _ in chain], [i for _, i in chain])

    def locate(self, window_id: int) -> tuple[int, int]:
        """``(shard_index, row)`` of ``window_id``.

        Raises:
            IndexError: ``window_id`` outside ``[0, total)``.
        """
        if not 0 <= window_id < self.total:
            raise IndexError(f"window {window_id} out of range [0, {self.total})")
        firsts, shards = self._chains[window_id % self.stride]
        j = bisect.bisect_right(firsts, window_id) - 1
        return shards[j], (window_id - firsts[j]) // self.stride

    def shard_windows(self, shard: int) -> np.ndarray:
        """Window ids of ``shard``'s rows in row order, int64 [rows]."""
        return self._first[shard] + self.stride * np.arange(self._rows[shard], dtype=np.int64)


class CacheReader:
    """Random access to the windows of a finished cache.

    Args:
        uri: the cache directory (local path or pyarrow.fs URI).
        skip_damaged: :meth:`iter_windows` leaves damaged windows out (logging one line each
            and listing them in ``damaged``) instead of raising; :meth:`read_window` always raises.
        full_pass: the caller will read every window: shards of a format-1 cache (no
            per-window checksum) are then checked against the manifest's sha256 when first opened.

    Attributes:
        manifest: the validated manifest dict.
        version: its format version.
        damaged: window ids :meth:`iter_windows` skipped (with ``skip_damaged``).
        window: W.
        num_windows: total windows.
        selection: ``{"mode": "topk", "k": K}``, ``{"mode": "sampled", "draws": N}`` or
            ``{"mode": "adaptive", "k": K, "min_mass": M, "min_prob": P}`` (a null rule unused).
        temperature: T of the stored log-probs.
        position_mode: ``"continuous"`` or ``"reset"``.
        shards: the manifest's shard entries.

    Raises:
        LongkdError: missing directory, an unfinished build (no manifest.json), an invalid
            manifest, or shard files that are missing or of another size.
    """

    def __init__(self, uri, *, skip_damaged: bool = False, full_pass: bool = False):
        self.location = uri if isinstance(uri, Location) else Location(uri)
        self.manifest = load_manifest(self.location)
        self.version = int(self.manifest["format_version"])
        self.skip_damaged, self.full_pass = bool(skip_damaged), bool(full_pass)
        self.damaged: list[int] = []
        self.rules = RowRules.of(self.manifest)
        self._schema = self.rules.schema
        self._broken: dict[int, UnreadableShard] = {}  # shards that cannot be used at all
        self._hashed: set[int] = set()  # format-1 shards whose sha256 matched
        self.window = int(self.manifest["window"])
        self.selection = dict(self.manifest["selection"])
        self.temperature = float(self.manifest["temperature"])
        self.position_mode = self.manifest["packing"].get("position_mode", "continuous")
        self.shards = list(self.manifest["shards"])
        self.index = WindowIndex(self.shards, f"{self.location.uri}/manifest.json")
        self.num_windows = self.index.total
        # Reading in window-id order cycles through `stride` shards; keep them all open.
        self._max_open = max(_OPEN_SHARDS, 2 * self.index.stride)
        self._open: OrderedDict[int, ShardFile] = OrderedDict()

    def __len__(self) -> int:
        return self.num_windows

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release open shard files."""
        self._open.clear()

    def shard_of(self, index: int) -> tuple[int, int]:
        """``(shard_index, row)`` holding window ``index``.

        Raises:
            IndexError: index outside ``[0, num_windows)``.
        """
        return self.index.locate(index)

    def shard_windows(self, shard: int) -> np.ndarray:
        """Window ids of shard ``shard``'s rows in row order, int64 [rows]."""
        return self.index.shard_windows(shard)

    def _shard(self, shard: int, scan: bool = False) -> ShardFile:
        """Shard ``shard``, open. Without ``scan`` row r is taken to be batch r when the batch
        count allows it (:class:`ShardFile`); read_window checks the window id it gets and
        rescans if a foreign writer broke that assumption.

        Raises:
            UnreadableShard: the shard cannot be opened, has another schema, or (format 1 with
                ``full_pass``) differs from the manifest's sha256; remembered, so a skipped
                shard is not opened again for each of its windows.
        """
        if shard in self._broken:
            raise self._broken[shard]
        if shard in self._open and not scan:
            self._open.move_to_end(shard)
            return self._open[shard]
        entry = self.shards[shard]
        rows = None if scan else int(entry["rows"])
        try:
            if self.version < 2 and self.full_pass and shard not in self._hashed:
                if self.location.sha256(entry["path"]) != entry["sha256"]:
                    raise UnreadableShard(self.location, entry["path"], "sha256 differs from the manifest's")
                self._hashed.add(shard)
            opened = ShardFile(self.location, entry["path"], rows, schema=self._schema)
        except OSError as err:
            error = UnreadableShard(self.location, entry["path"], err)
            self._broken[shard] = error
            raise error from None
        except UnreadableShard as err:
            self._broken[shard] = err
            raise
        self._open[shard] = opened
        self._open.move_to_end(shard)
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return opened

    def read_window(self, index: int) -> CachedWindow:
        """The window with global index ``index`` (equal to its window_id), checked.

        Raises:
            IndexError: ``index`` outside ``[0, num_windows)``.
            DamagedWindow: the window's bytes are damaged (Arrow structure, checksum, row rules).
            UnreadableShard: its shard cannot be used at all.
            LongkdError: the shard does not hold that window where the manifest says.
        """
        shard, row = self.shard_of(index)
        try:
            for scan in (False, True):
                batch, r = self._shard(shard, scan=scan).locate(row)
                if r < batch.num_rows:
                    columns = read_columns(batch, r, self.selection["mode"], self.rules.codecs)
                    self.rules.check_read(columns)
                    if columns.window_id == index:
                        return self._decode(columns)
        except BadShard as bad:
            raise DamagedWindow(self.location, self.shards[shard]["path"], index, str(bad)) from None
        raise LongkdError(
            f"shard {self.shards[shard]['path']} of {self.location.uri} does not hold window {index} "
            "at the row the manifest implies; run `longkd cache verify`"
        )

    def iter_windows(self, indices: Iterable[int] | None = None) -> Iterator[CachedWindow]:
        """Windows in ``indices`` order (default: all, in window-id order). With
        ``skip_damaged`` a damaged window, or each window of an unreadable shard, is left out
        and its id appended to ``damaged``.

        Raises:
            DamagedWindow, UnreadableShard: without ``skip_damaged``, as :meth:`read_window`.
        """
        for index in range(self.num_windows) if indices is None else indices:
            try:
                window = self.read_window(int(index))
            except (DamagedWindow, UnreadableShard) as err:
                if not self.skip_damaged:
                    raise
                self.damaged.append(int(index))
                log.warning("skipped damaged window %d: %s", int(index), err.reason)
                continue
            yield window

    def _decode(self, columns: WindowColumns) -> CachedWindow:
        from longkd.cache.packing import position_ids_for

        segment_starts = columns.segment_starts.astype(np.int32)
        ids, logprobs, counts = dense_rows(columns, self.window, self.selection)
        return CachedWindow(
            window_id=columns.window_id,
            length=columns.length,
            input_ids=columns.input_ids.astype(np.int32),
            segment_starts=segment_starts,
            position_ids=np.asarray(
                position_ids_for(self.window, segment_starts, self.position_mode), dtype=np.int64
            ),
            target_logprob=columns.target_logprob.astype(np.float32),
            ids=ids,
            logprobs=logprobs,
            counts=counts,
        )
