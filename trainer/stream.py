"""A deterministic, resumable, infinite stream of cached windows, batched for a trainer.

One or more caches form one pool of windows (they must share the tokenizer, the window W,
the selection and the temperature). The order of epoch e is a pure function of (seed, e):

1. the pool's shards are permuted (all caches' shards together), and their windows laid end
   to end in that order;
2. that sequence is cut into consecutive blocks of ``shuffle_buffer`` windows and each block
   is permuted on its own. This is the shuffle "buffer": a window moves at most
   ``shuffle_buffer - 1`` places from its shard-order position, so reading stays local to a
   few shards at a time, as with a streaming shuffle buffer, but without any state.

With ``shuffle=False`` every epoch is the pool in order. The stream never ends: after the
last window of epoch e come the windows of epoch e+1, and a batch that straddles the boundary
takes its tail from the next epoch, so no window is skipped or repeated. Batch b of an
iteration holds the windows at flat offsets [g0 + bB, g0 + (b+1)B) of that endless sequence
(g0 = the resume point), so a batch is a function of (seed, g0, b) only: a DataLoader worker
w of n builds the batches b with b % n == w, and the stream is identical for any
``num_workers``.

``state_dict()`` counts the batches the consumer has taken (not what workers prefetched);
``load_state_dict`` resumes right after them. The training loop uses it as

    stream = WindowStream(["runs/cache"], batch_size=8, seed=0, num_workers=2)
    check_student_compatible(stream.readers[0], student.config, tokenizer)
    stream.load_state_dict(checkpoint["stream"])           # when resuming
    for batch in stream:                                    # infinite; WindowBatch
        b = batch.prefix(phase.window).to(device)
        mask = b.loss_mask(skip_first_tokens=0)             # bool [B, P]
        ...
        checkpoint["stream"] = stream.state_dict()          # after the step on `batch`

Only one iteration of a stream may be active at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longkd.errors import LongkdError

IGNORE_INDEX = -100  # torch's cross-entropy ignore_index


@dataclass
class WindowBatch:
    """A batch of B cached windows, as torch tensors (row t predicts input_ids[t+1]).

    Attributes:
        input_ids: long [B, W].
        position_ids: long [B, W], from each cache's position mode.
        lengths: long [B], real tokens per window (< W only for a padded last window).
        segment_starts: long [B, Smax], starts of packed samples (first is 0), -1 padded.
        ids: long [B, W, K], teacher token ids; -1 marks padding (sampled and adaptive caches,
            where K is the batch's largest per-row entry count).
        teacher_logprobs: float32 [B, W, K], teacher log-probs over the full vocabulary at the
            cache's temperature (sampled caches: log(counts / draws)); -inf at padding.
        next_token_logprob: float32 [B, W], teacher log-prob of the true next token; NaN where
            t >= length - 1.
        window_ids: long [B], pool indices: a cache's window_id plus the windows of the caches
            listed before it (equal to the window_id for a single cache).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    segment_starts: torch.Tensor
    ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    next_token_logprob: torch.Tensor
    window_ids: torch.Tensor

    def _map(self, fn) -> WindowBatch:
        return WindowBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> WindowBatch:
        """A copy on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> WindowBatch:
        """A copy in pinned host memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    @property
    def window(self) -> int:
        """W, positions per window in this batch."""
        return int(self.input_ids.shape[1])

    def prefix(self, p: int) -> WindowBatch:
        """The first ``p`` positions of every window (valid: the teacher is causal).

        Lengths are clipped to ``p``, and segment starts at or beyond ``p`` dropped (set to
        -1; the padded width shrinks to the largest remaining count). As in a cache built with
        window ``p``, the new last row predicts a token outside the prefix and is masked.

        Raises:
            LongkdError: ``p`` is not in ``[1, W]``.
        """
        if not 1 <= p <= self.window:
            raise LongkdError(f"prefix length {p} must be between 1 and the cache window {self.window}")
        if p == self.window:
            return self
        starts = self.segment_starts.clone()
        starts[starts >= p] = -1
        width = max(1, int((starts >= 0).sum(dim=1).max()))
        return WindowBatch(
            input_ids=self.input_ids[:, :p],
            position_ids=self.position_ids[:, :p],
            lengths=self.lengths.clamp(max=p),
            segment_starts=starts[:, :width],
            ids=self.ids[:, :p],
            teacher_logprobs=self.teacher_logprobs[:, :p],
            next_token_logprob=self.next_token_logprob[:, :p],
            window_ids=self.window_ids,
        )

    def loss_mask(self, skip_first_tokens: int = 0) -> torch.Tensor:
        """Rows to train on: bool [B, W].

        False at rows t >= length - 1 (the last row predicts a token the window does not
        hold; padded rows have no target), and, when ``skip_first_tokens`` = m > 0, at the
        first m rows of every packed sample: rows s <= t < s + m for each segment start s,
        the sample starting at 0 included (it is either a fresh sample or the continuation
        of a split one, which has no context in the window at all), so every segment is
        treated alike.
        """
        if skip_first_tokens < 0:
            raise LongkdError(f"skip_first_tokens must be >= 0, got {skip_first_tokens}")
        b, w = self.input_ids.shape
        t = torch.arange(w, device=self.input_ids.device)
        mask = t[None, :] < (self.lengths[:, None] - 1)
        if skip_first_tokens:
            starts = self.segment_starts  # [B, S]
            valid = starts >= 0
            # [B, S, W]: row t lies in the first m rows of segment s
            hit = (t[None, None, :] >= starts[:, :, None]) & (
                t[None, None, :] < starts[:, :, None] + skip_first_tokens
            )
            mask &= ~(hit & valid[:, :, None]).any(dim=1)
        return mask

    def next_tokens(self, skip_first_tokens: int = 0) -> torch.Tensor:
        """The true next token per row, long [B, W]; ``IGNORE_INDEX`` (-100) where
        :meth:`loss_mask` with the same argument is False."""
        out = torch.full_like(self.input_ids, IGNORE_INDEX)
        out[:, :-1] = self.input_ids[:, 1:]
        return out.masked_fill(~self.loss_mask(skip_first_tokens), IGNORE_INDEX)


def _manifest_of(source) -> dict:
    if isinstance(source, dict):
        return source
    if hasattr(source, "manifest"):
        return source.manifest
    from longkd.cache.reader import CacheReader

    return CacheReader(source).manifest


def _max_cached_id(reader) -> int:
    """The largest teacher id stored in a cache, from its shards' ``ids`` columns."""
    from longkd.cache.rows import max_stored_id

    return max((max_stored_id(reader.location, shard["path"]) for shard in reader.shards), default=-1)


def check_student_compatible(reader_or_manifest, student_config, tokenizer=None) -> None:
    """Refuse a student whose tokenizer or vocabulary cannot use a cache.

    Args:
        reader_or_manifest: a ``CacheReader``, its manifest dict, or a cache path / URI.
        student_config: the student's config; its ``vocab_size`` is the embedding size.
        tokenizer: the student's tokenizer; when given its fingerprint must equal the cache's.

    Raises:
        LongkdError: a different tokenizer, an embedding smaller than the cache's tokenizer, or
            one that does not cover every id the cache stores. When the student's embedding is
            smaller than the teacher's (padded) embedding, the ids are scanned, which needs a
            reader or a path rather than a bare manifest.
    """
    manifest = _manifest_of(reader_or_manifest)
    if tokenizer is not None:
        from longkd.cache.identity import tokenizer_fingerprint

        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
            raise LongkdError(
                "the student's tokenizer differs from the cache's (tokenizer fingerprint mismatch); "
                "distil with the teacher's tokenizer or rebuild the cache"
            )
    text_config = (
        student_config.get_text_config() if hasattr(student_config, "get_text_config") else student_config
    )
    vocab = int(text_config.vocab_size)
    tok_size = int(manifest["vocab"]["tokenizer_size"])
    teacher_size = int(manifest["vocab"]["embedding_size"])
    if vocab < tok_size:
        raise LongkdError(
            f"student vocab_size {vocab} is smaller than the cache's tokenizer ({tok_size} tokens); "
            f"resize the student's embedding to at least {tok_size}"
        )
    if vocab >= teacher_size:
        return  # every cached id is < the teacher's embedding size (docs/format.md integrity rules)
    if isinstance(reader_or_manifest, dict):
        raise LongkdError(
            f"student vocab_size {vocab} is below the teacher's embedding size {teacher_size}; "
            "pass the CacheReader so the cached ids can be checked"
        )
    reader = reader_or_manifest if hasattr(reader_or_manifest, "shards") else None
    if reader is None:
        from longkd.cache.reader import CacheReader

        reader = CacheReader(reader_or_manifest)
    top = _max_cached_id(reader)
    if top >= vocab:
        raise LongkdError(
            f"the cache stores teacher id {top} but the student's vocab_size is {vocab}; "
            f"resize the student's embedding to at least {top + 1}"
        )


class _Pool:
    """The windows of several caches as one index space, and the epoch orders over it."""

    def __init__(self, uris: list[str], seed: int, shuffle: bool, shuffle_buffer: int):
        from longkd.cache.reader import CacheReader

        self.uris = uris
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        # Training reads every window: a format-1 cache (no per-window checksum) has each
        # shard checked against its sha256 when first opened.
        self.readers = [CacheReader(u, full_pass=True) for u in uris]
        self.offsets = np.cumsum([0] + [r.num_windows for r in self.readers]).astype(np.int64)
        self.size = int(self.offsets[-1])
        # (first pool index, rows) per shard, over all caches in order
        # pool indices of each shard's rows, over all caches in order (a cache built by N ranks
        # interleaves window ids across shards: shard_windows gives first, first + N, ...)
        self.shards = []
        for cache, reader in enumerate(self.readers):
            start = int(self.offsets[cache])
            for i in range(len(reader.shards)):
                self.shards.append(start + reader.shard_windows(i))
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Pool indices of epoch ``epoch`` in stream order, int64 [N]."""
        if epoch in self._orders:
            return self._orders[epoch]
        if not self.shuffle:
            order = np.arange(self.size, dtype=np.int64)
        else:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            parts = [self.shards[i] for i in rng.permutation(len(self.shards))]
            order = np.concatenate(parts).astype(np.int64)
            for lo in range(0, self.size, self.shuffle_buffer):
                block = order[lo : lo + self.shuffle_buffer]
                order[lo : lo + self.shuffle_buffer] = block[rng.permutation(len(block))]
        if len(self._orders) >= 2:
            self._orders.pop(min(self._orders))
        self._orders[epoch] = order
        return order

    def read(self, index: int):
        cache = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.readers[cache].read_window(int(index - self.offsets[cache]))

    def batch(self, flat_start: int, batch_size: int) -> WindowBatch:
        """The windows at flat offsets [flat_start, flat_start + batch_size) of the endless order."""
        indices = []
        for g in range(flat_start, flat_start + batch_size):
            epoch, pos = divmod(g, self.size)
            indices.append(int(self.order(epoch)[pos]))
        return collate([self.read(i) for i in indices], indices)


def collate(windows, pool_indices) -> WindowBatch:
    """Stack ``CachedWindow`` objects into a :class:`WindowBatch` (K and S padded to the batch max)."""
    b = len(windows)
    w = windows[0].input_ids.shape[0]
    k = max(win.ids.shape[1] for win in windows)
    s = max(win.segment_starts.shape[0] for win in windows)
    ids = np.full((b, w, k), -1, dtype=np.int64)
    logprobs = np.full((b, w, k), -np.inf, dtype=np.float32)
    starts = np.full((b, s), -1, dtype=np.int64)
    for i, win in enumerate(windows):
        ids[i, :, : win.ids.shape[1]] = win.ids
        logprobs[i, :, : win.ids.shape[1]] = win.logprobs
        starts[i, : win.segment_starts.shape[0]] = win.segment_starts
    return WindowBatch(
        input_ids=torch.from_numpy(np.stack([win.input_ids for win in windows]).astype(np.int64)),
        position_ids=torch.from_numpy(np.stack([win.position_ids for win in windows]).astype(np.int64)),
        lengths=torch.tensor([win.length for win in windows], dtype=torch.int64),
        segment_starts=torch.from_numpy(starts),
        ids=torch.from_numpy(ids),
        teacher_logprobs=torch.from_numpy(logprobs),
        next_token_logprob=torch.from_numpy(
            np.stack([win.target_logprob for win in windows]).astype(np.float32)
        ),
        window_ids=torch.tensor(pool_indices, dtype=torch.int64),
    )


@dataclass
class _ReadFailure:
    """A worker's :class:`LongkdError`, handed to the consumer as an item: re-raised there as
    the same one line (an exception raised inside a DataLoader worker would come back wrapped
    in the worker's traceback)."""

    message: str


class _Batches(IterableDataset):
    """Batches b = 0, 1, ... from flat offset ``start``; worker w of n builds b % n == w.

    Under torchrun, rank r of ``world`` builds only its slice of each global batch: the
    windows at offsets ``[b*B + r*B/world, b*B + (r+1)*B/world)``.

    Readers are opened inside ``__iter__``, so every worker process has its own file handles.
    A damaged window ends the iteration with a :class:`_ReadFailure`.
    """

    def __init__(self, uris, seed, shuffle, shuffle_buffer, batch_size, start, rank=0, world=1):
        self.args = (list(uris), seed, shuffle, shuffle_buffer)
        self.batch_size, self.start = batch_size, start
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[WindowBatch]:
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        local = self.batch_size // self.world
        try:
            pool = _Pool(*self.args)
            for b in itertools.count(wid, n):
                yield pool.batch(self.start + b * self.batch_size + self.rank * local, local)
        except LongkdError as err:
            yield _ReadFailure(str(err))


class WindowStream:
    """Endless, deterministic batches of windows from one or more caches (see module docstring).

    Args:
        caches: a cache path / URI or a list of them, forming one pool.
        batch_size: B, windows per batch.
        seed: seed of the epoch orders.
        shuffle: permute shards and windows (False: the pool in order, every epoch).
        shuffle_buffer: windows per independently permuted block.
        num_workers: DataLoader worker processes (0: batches built in this process).
        pin_memory: put batches in pinned memory (for fast copies to an accelerator).
        prefetch_factor: batches each worker prepares ahead (with ``num_workers`` > 0).
        rank, world: under torchrun, this rank yields only its ``batch_size / world`` windows of
            each global batch of ``batch_size``; the state (global windows taken) is the same on
            every rank.

    Attributes:
        readers: the ``CacheReader`` of each cache, in order (metadata; workers open their own).
        window: W. selection, temperature: shared by all caches.
        windows_per_epoch: total windows in the pool.

    Raises:
        LongkdError: an empty list, bad sizes, a cache that cannot be opened, caches that
            disagree on tokenizer, window, selection or temperature, or a pool with no windows.
    """

    def __init__(
        self,
        caches: str | list[str],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        rank: int = 0,
        world: int = 1,
    ):
        uris = (
            [str(caches)]
            if isinstance(caches, str) or not hasattr(caches, "__iter__")
            else [str(c) for c in caches]
        )
        if not uris:
            raise LongkdError("WindowStream needs at least one cache")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("num_workers", num_workers, 0),
            ("prefetch_factor", prefetch_factor, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LongkdError(f"{name} must be an integer >= {low}, got {value!r}")
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise LongkdError(
                f"batch_size {batch_size} must be a multiple of the {world} ranks (rank {rank}); "
                "each rank takes an equal slice of every global batch"
            )
        self.rank, self.world = rank, world
        self.uris = uris
        self.batch_size, self.seed, self.shuffle = batch_size, int(seed), bool(shuffle)
        self.shuffle_buffer, self.num_workers = shuffle_buffer, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._pool = _Pool(uris, self.seed, self.shuffle, shuffle_buffer)
        self.readers = self._pool.readers
        self._check_pool()
        first = self.readers[0]
        self.window, self.selection, self.temperature = first.window, first.selection, first.temperature
        self.windows_per_epoch = self._pool.size
        if self.windows_per_epoch == 0:
            raise LongkdError(f"the caches {', '.join(uris)} hold no windows")
        self._flat = 0  # windows the consumer has taken since epoch 0 began

    def _check_pool(self) -> None:
        first = self.readers[0]
        for uri, reader in zip(self.uris[1:], self.readers[1:]):
            for what, a, b in (
                ("tokenizer fingerprint", first.manifest["tokenizer"]["fingerprint"],
                 reader.manifest["tokenizer"]["fingerprint"]),
                ("window", first.window, reader.window),
                ("selection", first.selection, reader.selection),
                ("temperature", first.temperature, reader.temperature),
            ):  # fmt: skip
                if a != b:
                    raise LongkdError(
                        f"cache {uri} has {what} {b!r} but {self.uris[0]} has {a!r}; "
                        "caches streamed together must share tokenizer, window, selection and temperature"
                    )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Pool indices of epoch ``epoch`` in stream order, int64 [windows_per_epoch]."""
        return self._pool.order(epoch).copy()

    @property
    def epoch(self) -> int:
        return self._flat // self.windows_per_epoch

    @property
    def position(self) -> int:
        return self._flat % self.windows_per_epoch

    def state_dict(self) -> dict:
        """Where the consumer stands: the next batch starts at window ``position`` of ``epoch``.

        Returns:
            ``{"epoch", "position", "seed", "windows_per_epoch", "shuffle", "shuffle_buffer",
            "batch_size"}`` (plain ints and bools, JSON-safe).
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "windows_per_epoch": self.windows_per_epoch,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: the next batch is the one an uninterrupted run would give next.

        The batch size may differ from the saved one (the position counts windows).

        Raises:
            LongkdError: a state from another pool or order (windows per epoch, seed, shuffle or
                shuffle buffer differ) or a malformed state.
        """
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            saved = {k: state[k] for k in ("seed", "windows_per_epoch", "shuffle", "shuffle_buffer")}
        except (KeyError, TypeError, ValueError) as err:
            raise LongkdError(
                f"stream state is malformed ({err!r}); expected WindowStream.state_dict()"
            ) from err
        mine = self.state_dict()
        for key, value in saved.items():
            if value != mine[key]:
                raise LongkdError(
                    f"stream state has {key}={value!r} but this stream has {mine[key]!r}; "
                    "resume with the same caches, seed and shuffle settings"
                )
        if epoch < 0 or not 0 <= position < self.windows_per_epoch:
            raise LongkdError(f"stream state epoch {epoch} / position {position} is out of range")
        self._flat = epoch * self.windows_per_epoch + position

    def __iter__(self) -> Iterator[WindowBatch]:
        """Batches from the resume point on, endlessly.

        Raises:
            LongkdError: a damaged window or shard (one line naming it, also from a worker).
        """
        dataset = _Batches(
            self.uris, self.seed, self.shuffle, self.shuffle_buffer, self.batch_size, start=self._flat,
            rank=self.rank, world=self.world,
        )  # fmt: skip
        loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        for batch in loader:
            if isinstance(batch, _ReadFailure):
                raise LongkdError(batch.message)
            # counted when handed over, so a checkpoint taken after training on it resumes after it
            self._flat += self.batch_size
            yield batch
