"""Background shard writer: the teacher hands over windows and never waits on disk.

``ShardWriter.put`` queues ``(PackedWindow, TeacherRows)`` on a bounded queue (the producer
blocks only when the queue is full, which bounds memory); a thread turns each window into a
one-row Arrow record batch (cache/rows.py), appends it to an Arrow IPC file with zstd buffer
compression under a temporary name, and when the file reaches ``shard_size`` bytes closes it,
fsyncs, renames it to ``shards/shard-RRRRR-SSSSSS.arrow`` and appends it to the rank's
progress ledger (cache/ledger.py). The sha256 is computed on the bytes as they are written,
so nothing is read back.

A failure in the thread (disk full, permissions...) is re-raised in the caller's thread at
the next ``put`` or at ``close`` as a :class:`LongkdError` naming the shard and the OS error.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading

import pyarrow as pa

from longkd.cache import format as fmt
from longkd.cache.column_codecs import ColumnCodecs
from longkd.cache.ledger import ShardInfo, write_ledger
from longkd.cache.rows import window_record_batch
from longkd.cache.storage import Location
from longkd.errors import LongkdError

_STOP = object()
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Bytes from ``256MB``, ``1GB``, ``512MiB``, ``"1000"`` or an int (KB/MB/GB are powers of 1000).

    Raises:
        LongkdError: not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise LongkdError(
                f"shard size {value!r} is not a size; write e.g. 256MB, 1GB or a number of bytes"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise LongkdError(f"shard size must be positive, got {value!r}")
    return size


class _HashingFile:
    """A write-only file wrapper that counts and sha256-hashes the bytes passing through."""

    def __init__(self, handle):
        self.handle = handle
        self.bytes_written = 0
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.handle.write(view)
        self.digest.update(view)
        self.bytes_written += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        self.handle.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        # The IPC writer may close its sink; the real close (with fsync) is the ShardWriter's.
        self.closed = True


class ShardWriter:
    """Writes windows to size-capped Arrow IPC shards in a background thread.

    Args:
        location: the cache directory.
        selection_mode: a selection mode of cache/format.py: ``"topk"`` or ``"sampled"``.
        logprob_dtype: a log-prob encoding of cache/format.py: ``"float32"`` or ``"float16"``.
        codecs: the cache's column encodings (cache/column_codecs.py); None: all plain.
        shard_size: roll over to a new shard once a file reaches this many bytes (int or "256MB").
        compression_level: zstd level (None: format.DEFAULT_COMPRESSION_LEVEL, 3).
        rank: producer rank (shard names ``shard-RRRRR-*`` and ledger ``rank-RRRRR.jsonl``).
        completed: ledger entries already on disk (when resuming); new shards continue after them.
        stride: the step between consecutive window ids this rank writes (the world size).
        queue_size: windows buffered between producer and thread (back-pressure bound).
    """

    def __init__(
        self,
        location: Location,
        *,
        selection_mode: str,
        logprob_dtype: str = "float32",
        codecs: ColumnCodecs | None = None,
        shard_size: int | str = "256MB",
        compression_level: int | None = None,
        rank: int = 0,
        completed: list[ShardInfo] | None = None,
        queue_size: int = 8,
        stride: int = 1,
    ):
        self.location = location
        self.schema = fmt.shard_schema(
            selection_mode, logprob_dtype, encodings=None if codecs is None else codecs.names
        )
        self.selection_mode, self.logprob_dtype, self.codecs = selection_mode, logprob_dtype, codecs
        self.shard_size = parse_size(shard_size)
        level = fmt.DEFAULT_COMPRESSION_LEVEL if compression_level is None else int(compression_level)
        try:
            codec = pa.Codec(fmt.COMPRESSION, compression_level=level)
        except (pa.ArrowException, ValueError) as err:
            raise LongkdError(f"zstd compression level {level} is not valid: {err}") from err
        self.options = pa.ipc.IpcWriteOptions(compression=codec)
        self.rank = rank
        self.stride = int(stride)
        self.completed: list[ShardInfo] = list(completed or [])
        self._next_index = len(self.completed)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._abort = False
        self._closed = False
        self._current: dict | None = None  # the shard being written
        location.makedirs(fmt.SHARDS_DIR)
        location.makedirs(fmt.PROGRESS_DIR)
        self._thread = threading.Thread(target=self._run, name=f"longkd-shard-writer-{rank}", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------
    def put(self, window, rows) -> None:
        """Queue one window (blocks while the queue is full).

        Raises:
            LongkdError: the writer thread failed (disk full...), naming the shard.
        """
        if self._closed:
            raise RuntimeError("ShardWriter.put after close")
        self._raise_pending()
        self._queue.put((window, rows))

    def close(self) -> list[ShardInfo]:
        """Finish the last shard, wait for the thread, and return every completed shard.

        Raises:
            LongkdError: the writer thread failed; the in-progress shard is discarded.
        """
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_pending()
        return list(self.completed)

    def abort(self) -> None:
        """Stop without completing the in-progress shard (its temporary file is deleted)."""
        self._abort = True
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self._error is not None or self._abort:
                continue  # keep draining so a blocked producer wakes up and sees the error
            try:
                self._write(*item)
            except BaseException as err:  # noqa: BLE001 (handed to the producer thread)
                self._fail(err)
        if self._error is None and not self._abort:
            try:
                if self._current is not None:
                    self._finish_shard()
            except BaseException as err:  # noqa: BLE001
                self._fail(err)
        if self._abort or self._error is not None:
            self._discard_current()

    def _fail(self, err: BaseException) -> None:
        name = self._current["final"] if self._current else fmt.shard_name(self.rank, self._next_index)
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            if getattr(err, "errno", None):
                reason = f"[Errno {err.errno}] {reason}"
            wrapped = LongkdError(f"writing shard {name} failed: {reason}; no manifest was written")
            wrapped.__cause__ = err
            self._error = wrapped
        else:
            self._error = err
        self._discard_current()

    def _discard_current(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        for obj in (current.get("ipc"), current.get("handle")):
            try:
                if obj is not None:
                    obj.close()
            except BaseException:  # noqa: BLE001 (already failing; best-effort cleanup)
                pass
        try:
            self.location.delete(current["temp"])
        except OSError:
            pass

    def _open_shard(self) -> None:
        index = self._next_index
        temp = fmt.temp_shard_name(self.rank, index)
        self._current = {"final": fmt.shard_name(self.rank, index), "temp": temp, "handle": None}
        handle = self.location.open_output(temp)
        self._current["handle"] = handle
        sink = _HashingFile(handle)
        self._current.update(
            sink=sink,
            ipc=pa.ipc.new_file(sink, self.schema, options=self.options),
            rows=0,
            tokens=0,
            first=None,
            last=None,
        )

    def _write(self, window, rows) -> None:
        batch = window_record_batch(window, rows, self.selection_mode, self.logprob_dtype, self.codecs)
        if self._current is None:
            self._open_shard()
        cur = self._current
        if cur["last"] is not None and int(window.window_id) != cur["last"] + self.stride:
            # The manifest describes a shard by (first_window, stride, rows) alone.
            raise ValueError(
                f"window {window.window_id} does not follow {cur['last']} with stride {self.stride}"
            )
        cur["ipc"].write_batch(batch)
        cur["rows"] += 1
        cur["tokens"] += int(window.length)
        if cur["first"] is None:
            cur["first"] = int(window.window_id)
        cur["last"] = int(window.window_id)
        if cur["sink"].bytes_written >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        cur = self._current
        cur["ipc"].close()  # writes the footer through the hashing sink
        self.location.sync_close(cur["handle"])
        self.location.move(cur["temp"], cur["final"])
        info = ShardInfo(
            path=cur["final"],
            rows=cur["rows"],
            tokens=cur["tokens"],
            bytes=cur["sink"].bytes_written,
            sha256=cur["sink"].digest.hexdigest(),
            first_window=cur["first"],
            last_window=cur["last"],
            stride=self.stride,
        )
        self._current = None
        self.completed.append(info)
        self._next_index += 1
        write_ledger(self.location, self.rank, self.completed)
