"""A cache as a PyTorch ``IterableDataset``, for training loops other than ``longkd train``.

Why it exists: most people who build a cache keep their own loop (a plain PyTorch loop, the
Hugging Face ``Trainer``, ...) and want the cache's windows in it with the guarantees
``longkd train`` gives. :class:`CacheDataset` yields the windows of the trainer's own
deterministic order (trainer/stream.py: the same pool, shard permutation and shuffle buffer,
read by the same reader), one window per item; :func:`collate_windows` stacks a DataLoader
batch into the tensors a model and the loss (trainer/loss_api.py) take; :func:`check_model_fits`
is the trainer's check that a model and tokenizer can use the cache.

    from torch.utils.data import DataLoader
    from longkd import CacheDataset, check_model_fits, collate_windows

    dataset = CacheDataset("cache", batch_size=8, seed=0)        # B windows per rank and batch
    check_model_fits(dataset, model, tokenizer)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_windows, num_workers=2)
    for batch in loader:                                          # endless: stop when you like
        ...                                                       # train on the batch
        dataset.mark_consumed(batch)                              # then state_dict() resumes after it

The order. Windows are laid end to end in one endless sequence: epoch 0's order, then epoch
1's, ... (each a permutation of the cache's windows: no window is repeated or skipped within
an epoch, and a batch that straddles an epoch boundary takes its tail from the next epoch).
Global batch b holds the offsets ``[s + b*G, s + (b+1)*G)`` of that sequence, where s is the
position the iteration started from and G = ``batch_size * world``; rank r takes the r-th
slice of ``batch_size`` windows, and DataLoader worker w of n builds that rank's batches b with
``b % n == w``. So the batches a rank receives do not depend on ``num_workers``, and all ranks
together read each window once per epoch.

Resume. The dataset cannot see which batches a DataLoader (or a framework wrapping it) has
prefetched, so the consumer says what it trained on: ``mark_consumed(batch)`` moves the
position past the global batch holding ``batch``; ``state_dict()`` then describes it, and a
new dataset given ``load_state_dict(state)`` before its DataLoader is iterated continues with
the next global batch, exactly as an uninterrupted run would. A DataLoader iterator created
later also starts there, so a loop may be stopped and its loader iterated again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from longkd.errors import LongkdError, one_line
from longkd.trainer.stream import WindowStream, check_student_compatible

# The trainer's own pool (order and reading) and batch builder: the dataset is the same stream,
# cut into per-window items, not a second reader.
from longkd.trainer.stream import _Pool as _TrainerPool
from longkd.trainer.stream import collate as _collate_batch

_WORKER_WRAPPER = "\nOriginal Traceback"


class CacheReadError(LongkdError):
    """A window that cannot be read: a shard is missing, truncated or damaged.

    A DataLoader worker's exception reaches the main process rebuilt as
    ``type(err)("Caught ... in DataLoader worker process N.\\nOriginal Traceback ...: message")``;
    the constructor keeps only the original message, so the error is one line there too.
    """

    def __init__(self, message: str):
        if _WORKER_WRAPPER in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


@dataclass
class WindowItem:
    """One window as :class:`CacheDataset` yields it (``collate_windows`` stacks a batch of them).

    Attributes:
        window: the decoded ``CachedWindow`` (cache/reader.py), all W positions.
        pool_index: the window's index in the pool of caches (its ``window_id`` for one cache).
        stream_offset: its offset in the endless sequence of epochs (epoch * windows + position).
        batch_start: the stream offset of the first window of the rank's batch it belongs to.
        batch_size: windows in that batch (the dataset's ``batch_size``).
        prefix: P, positions to keep (the batch is cut with ``WindowBatch.prefix``).
    """

    window: object
    pool_index: int
    stream_offset: int
    batch_start: int
    batch_size: int
    prefix: int


def _distributed_rank_world() -> tuple[int, int]:
    """``(rank, world)`` of the default torch.distributed process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CacheDataset(IterableDataset):
    """The windows of one or more caches, endlessly, in ``longkd train``'s order (module docstring).

    Args:
        caches: a cache path / URI, or a list of them forming one pool (same tokenizer, window,
            selection and temperature).
        batch_size: B, windows per batch on this rank: pass the same number to the DataLoader
            (``collate_windows`` refuses batches of another size).
        seed: seed of the epoch orders.
        shuffle: permute shards and windows (False: the pool in order, every epoch).
        shuffle_buffer: windows per independently permuted block.
        prefix: P, train on the first P positions of every window (valid: the teacher is causal);
            None keeps all W.
        rank, world: this process's rank and the number of ranks; None takes them from the
            default ``torch.distributed`` process group when one is initialised, else 0 and 1.
            Frameworks that split an ``IterableDataset`` across processes themselves (the
            Hugging Face ``Trainer`` through accelerate) need ``rank=0, world=1``.
        verify: first check every shard against the manifest (size, sha256, schema, rows: what
            ``longkd cache verify`` checks; it reads the whole cache once). Without it a damaged
            window fails when it is read (its checksum and row rules are checked on every read;
            a format-1 cache, without checksums, has each shard's sha256 checked when first
            opened).

    Attributes:
        window: W. selection: ``{"mode": "topk", "k": K}``, ``{"mode": "sampled", "draws": N}``
            or ``{"mode": "adaptive", "k": K, "min_mass": M, "min_prob": P}``.
        temperature: T of the stored log-probs (the loss's default temperature).
        loss_mode: the loss mode ``longkd train`` uses for this cache by default
            (``"sampled"`` for a sampled cache, else ``"bucket"``: top-k and adaptive caches).
        windows_per_epoch: windows in the pool.

    Raises:
        LongkdError: a cache that cannot be opened (an unfinished build has no manifest.json),
            caches that disagree, bad sizes, or ``prefix`` outside ``[1, W]``.
        CacheReadError: with ``verify``, a shard that fails verification; while iterating, a
            window that cannot be read (a missing, truncated or damaged shard).
    """

    def __init__(
        self,
        caches: str | list[str],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        prefix: int | None = None,
        rank: int | None = None,
        world: int | None = None,
        verify: bool = False,
    ):
        super().__init__()
        if (rank is None) != (world is None):
            raise LongkdError("CacheDataset: pass both rank and world, or neither")
        if rank is None:
            rank, world = _distributed_rank_world()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LongkdError(f"CacheDataset: batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(world, bool) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
            raise LongkdError(f"CacheDataset: rank {rank!r} / world {world!r} must satisfy 0 <= rank < world")
        # The trainer's stream validates the caches and settings and keeps the resume position
        # (in windows of the global sequence); it is never iterated here.
        self._stream = WindowStream(
            caches,
            batch_size=batch_size * world,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            rank=rank,
            world=world,
        )
        self.window = self._stream.window
        if prefix is None:
            prefix = self.window
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= self.window:
            raise LongkdError(
                f"CacheDataset: prefix {prefix!r} must be an integer from 1 to the cache window {self.window}"
            )
        self.batch_size, self.rank, self.world, self.prefix = batch_size, rank, world, prefix
        self.selection = self._stream.selection
        self.temperature = self._stream.temperature
        self.loss_mode = "sampled" if self.selection.get("mode") == "sampled" else "bucket"
        self.windows_per_epoch = self._stream.windows_per_epoch
        self._settings = (self._stream.uris, self._stream.seed, self._stream.shuffle, shuffle_buffer)
        if verify:
            _verify(self._stream.uris)

    @property
    def readers(self) -> list:
        """The ``CacheReader`` of each cache (manifests and metadata; iteration opens its own)."""
        return self._stream.readers

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def _position(self) -> int:
        state = self._stream.state_dict()
        return state["epoch"] * self.windows_per_epoch + state["position"]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Pool indices of epoch ``epoch`` in stream order, int64 [windows_per_epoch]."""
        return self._stream.epoch_order(epoch)

    def __iter__(self) -> Iterator[WindowItem]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        uris = self._settings[0]
        try:
            pool = _TrainerPool(*self._settings)  # per process: workers open their own files
        except LongkdError as err:
            raise CacheReadError(str(err)) from err
        start, size = self._position, self.batch_size
        for b in itertools.count(worker, workers):
            first = start + b * self._global_batch + self.rank * size
            for offset in range(first, first + size):
                epoch, position = divmod(offset, pool.size)
                index = int(pool.order(epoch)[position])
                yield WindowItem(
                    window=_read(pool, index, uris),
                    pool_index=index,
                    stream_offset=offset,
                    batch_start=first,
                    batch_size=size,
                    prefix=self.prefix,
                )

    def mark_consumed(self, batch: dict) -> None:
        """Record that the consumer has trained on ``batch``: the position moves past its global batch.

        Call it once per batch, in order (skipping some is allowed: the position moves past the
        global batch holding ``batch``). On every rank the position is the same afterwards.

        Args:
            batch: a dict from :func:`collate_windows` (its ``stream_offsets`` are used).

        Raises:
            LongkdError: a batch without ``stream_offsets``, or one from before the position (a
                batch marked twice, or one from a DataLoader iterator created before a
                ``load_state_dict``).
        """
        offsets = batch.get("stream_offsets") if isinstance(batch, dict) else None
        if offsets is None or len(offsets) == 0:
            raise LongkdError(
                "mark_consumed: pass the batch dict collate_windows made (it has stream_offsets)"
            )
        first = int(torch.as_tensor(offsets).min())
        position = self._position
        if first < position:
            raise LongkdError(
                f"mark_consumed: the batch starts at stream offset {first}, before the position {position}; "
                "mark each batch once, and re-create the DataLoader iterator after load_state_dict"
            )
        end = position + ((first - position) // self._global_batch + 1) * self._global_batch
        state = self._stream.state_dict()
        state["epoch"], state["position"] = divmod(end, self.windows_per_epoch)
        self._stream.load_state_dict(state)

    def state_dict(self) -> dict:
        """Where the next iteration starts: after the last global batch passed to ``mark_consumed``.

        Returns:
            ``{"epoch", "position", "seed", "windows_per_epoch", "shuffle", "shuffle_buffer",
            "batch_size"}`` (JSON-safe; ``longkd train`` saves the same dict, with
            ``batch_size`` the global batch).
        """
        return self._stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; call it before the DataLoader is iterated (workers copy the dataset).

        The batch size and number of ranks may differ from the saved run's (the position counts
        windows).

        Raises:
            LongkdError: a state from another pool or order (windows, seed, shuffle or shuffle
                buffer differ) or a malformed state.
        """
        self._stream.load_state_dict(state)


def _verify(uris: list[str]) -> None:
    """``longkd cache verify`` on every cache; the first problem is a :class:`CacheReadError`."""
    from longkd.cache.verify import verify_cache

    for uri in uris:
        result = verify_cache(uri)
        if not result.ok:
            raise CacheReadError(
                f"cache {uri} is damaged: {result.problem}; rebuild it (or restore the shard from a copy)"
            )


def _read(pool, index: int, uris: list[str]):
    """Window ``index`` of the pool; a file that cannot be read is a :class:`CacheReadError`."""
    import pyarrow as pa

    from longkd.cache.rows import DamagedWindow, UnreadableShard

    try:
        return pool.read(index)
    except (OSError, ValueError, pa.ArrowException, LongkdError) as err:
        cache = int(np.searchsorted(pool.offsets, index, side="right")) - 1
        reader, local = pool.readers[cache], int(index - pool.offsets[cache])
        shard = reader.shards[reader.shard_of(local)[0]]["path"]
        reason = err.reason if isinstance(err, (UnreadableShard, DamagedWindow)) else err
        raise CacheReadError(
            f"cache {uris[cache]}: window {local} in shard {shard} cannot be read ({one_line(reason, 200)}); "
            f"the cache is damaged: run `longkd cache verify {uris[cache]}` and rebuild the bad shard"
        ) from err


def collate_windows(items: list[WindowItem], *, skip_first_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Stack one DataLoader batch of :class:`CacheDataset` items into tensors (B windows, P positions).

    Row t of a window predicts token t+1: ``labels`` are already shifted, so compute the
    cross-entropy against the logits of the same row (do not pass them to a Hugging Face
    model's ``labels=``, which shifts again).

    Args:
        items: B items of one batch of the dataset (DataLoader ``batch_size`` = the dataset's).
        skip_first_tokens: m > 0 also leaves out the first m rows of every packed sample, as
            the trainer's ``loss.skip_first_tokens`` does (use ``functools.partial``).

    Returns:
        ``input_ids`` long [B, P]; ``position_ids`` long [B, P] (from the cache's position
        mode); ``labels`` long [B, P], the next token, -100 where not trained (the window's
        last row, padding, and the skipped rows); ``loss_mask`` bool [B, P] (= labels != -100);
        ``teacher_ids`` long [B, P, K], -1 at padding (sampled and adaptive caches: K is the
        batch's largest entry count); ``teacher_logprobs`` float32 [B, P, K], the teacher's log-probs over the
        full vocabulary at the cache's temperature (sampled caches: log(counts / draws)), -inf
        at padding; ``window_ids`` long [B] (pool indices); ``stream_offsets`` long [B] (for
        ``CacheDataset.mark_consumed``).

    Raises:
        LongkdError: items that are not one whole batch of a ``CacheDataset`` (another
            DataLoader batch size), or a negative ``skip_first_tokens``.
    """
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, WindowItem) for i in items):
        raise LongkdError(
            "collate_windows: expected a list of CacheDataset items; use DataLoader(dataset, "
            "batch_size=dataset.batch_size, collate_fn=collate_windows)"
        )
    size, start = items[0].batch_size, items[0].batch_start
    if len(items) != size or any(i.batch_start != start for i in items):
        raise LongkdError(
            f"collate_windows: a DataLoader batch of {len(items)} windows does not match the "
            f"CacheDataset batch_size {size}; give the DataLoader batch_size=dataset.batch_size"
        )
    batch = _collate_batch([i.window for i in items], [i.pool_index for i in items])
    batch = batch.prefix(items[0].prefix)
    mask = batch.loss_mask(skip_first_tokens)
    return {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "labels": batch.next_tokens(skip_first_tokens),
        "loss_mask": mask,
        "teacher_ids": batch.ids,
        "teacher_logprobs": batch.teacher_logprobs,
        "window_ids": batch.window_ids,
        "stream_offsets": torch.tensor([i.stream_offset for i in items], dtype=torch.int64),
    }


def check_model_fits(cache, model, tokenizer=None) -> None:
    """Refuse a model and tokenizer that cannot be distilled from a cache, as ``longkd train`` does.

    Checks the tokenizer fingerprint (when a tokenizer is given), that the embedding covers the
    cache's tokenizer, and, when the embedding is smaller than the teacher's padded one, that
    it covers every teacher id the cache stores (a scan of the ``ids`` columns).

    Args:
        cache: a :class:`CacheDataset`, a cache path / URI, or a ``CacheReader``.
        model: a transformers model or its config (``vocab_size`` is the embedding size).
        tokenizer: the model's tokenizer, or None to skip the fingerprint.

    Raises:
        LongkdError: the first misfit, on one line, naming the fix (the trainer's messages).
    """
    readers = cache.readers if isinstance(cache, CacheDataset) else [cache]
    config = getattr(model, "config", model)
    for reader in readers:
        check_student_compatible(reader, config, tokenizer)
