"""The ``longkd cache build`` pipeline: teacher + dataset -> packed windows -> shards -> manifest.

    longkd cache build --teacher PATH --data DATA --window 4096 --top-k 64 --out runs/cache

Load the teacher, open the dataset, pack samples into W-token windows, run the teacher on
batches of windows and hand each window's rows to the background :class:`ShardWriter`. The
dataset fingerprint (sha256 over token ids in packing order) is computed while streaming.
``manifest.json`` is written last, only when everything succeeded.

Resume: ``build.json`` records every setting that determines the cache's bytes plus the
teacher's identity hashes. Rerunning on the same ``--out`` with the same settings keeps the
shards the progress ledger lists (and whose sha256 still matches), deletes anything else in
``shards/`` and the temporary files a killed run left, repacks deterministically, checks
that the data still packs exactly the windows already written (a dataset edited between the
kill and the rerun is refused rather than mixed in), skips those windows without running
the teacher, and continues; the finished cache is byte-identical to an uninterrupted one.

Ranks (``torchrun ... -m longkd cache build``, see cache/distributed.py and
docs/distributed.md): rank r of ``world`` takes windows with ``window_id % world == r`` and
writes ``shard-RRRRR-*``; the ranks agree on their settings before anything is written, and
rank 0 writes ``build.json`` and, after every rank finished, the merged manifest. A single
process is rank 0 of 1. With ``--tensor-parallel N`` the job's ranks form groups of N that hold
one teacher between them (cache/tensor_parallel.py): each group plays the part one rank plays
without it (group g takes ``window_id % groups == g`` and writes ``shard-GGGGG-*``), and only
its first rank writes; the others compute with it.

The options themselves (defaults, ``--config`` files, validation) are in cache/build_settings.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longkd.cache import format as fmt
from longkd.cache.build_settings import DEFAULT_TOP_K, BuildSettings
from longkd.cache.column_codecs import ColumnCodecs
from longkd.cache.distributed import merge_shards
from longkd.cache.ledger import ShardInfo
from longkd.cache.manifest import (
    build_manifest,
    compare_build_record,
    load_manifest,
    out_dir_state,
    recover_shards,
    write_manifest,
)
from longkd.cache.storage import Location, os_reason
from longkd.cache.writer import ShardWriter
from longkd.devices import resolve_device
from longkd.distributed import Group, TensorParallel, env_world
from longkd.errors import LongkdError
from longkd.fileio import check_out_dir

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What :func:`build_cache` did: the manifest plus this run's own work and time.

    Attributes:
        manifest: the finished cache's manifest.
        windows: windows this run computed (0 when the cache was already complete).
        tokens: real tokens in those windows.
        seconds: wall time from the first window to the manifest (loading excluded).
        teacher_seconds: the part of ``seconds`` spent inside ``Teacher.run``; the rest is
            packing, waiting on a full writer queue and finishing the last shard.
    """

    manifest: dict
    windows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Fingerprint:
    """Pass samples through while hashing them: per sample, int32 LE length then int32 LE ids."""

    def __init__(self, samples: Iterable):
        self.samples = samples
        self.digest = hashlib.sha256()
        self.count = 0

    def __iter__(self) -> Iterator[list[int]]:
        for ids in self.samples:
            arr = np.asarray(ids, dtype="<i4")
            self.digest.update(np.int32(arr.shape[0]).astype("<i4").tobytes())
            self.digest.update(arr.tobytes())
            self.count += 1
            yield ids


def _batches(windows: Iterable, size: int) -> Iterator[list]:
    batch = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_cache(settings: BuildSettings, *, progress: bool | None = None, echo=print) -> BuildResult:
    """Run the whole build (or resume it, or report it complete), as one rank of a torchrun
    job when ``RANK`` / ``WORLD_SIZE`` are set (every rank returns the same manifest).

    Args:
        settings: validated settings (:func:`longkd.cache.build_settings.resolve_settings`);
            ``rank`` and ``world`` are set here from the environment.
        progress: show a tqdm bar (None: only on a terminal).
        echo: where the summary lines go.

    Returns:
        A :class:`BuildResult` with the finished cache's manifest.

    Raises:
        LongkdError: bad settings, teacher or data problems, a refused --out, write errors,
            ranks started with different settings. No manifest is written then.
    """
    _, world, local_rank = env_world()
    _check_placement(settings, world)
    device = resolve_device(settings.device, local_rank=local_rank, world=world)
    group = Group(device)
    try:
        tp = TensorParallel(group, settings.tensor_parallel)
        # A group builds as one rank does without tensor parallelism: its index names its shards.
        settings.rank, settings.world = tp.index, tp.groups
        return _build(settings, group, tp, device, progress, echo)
    finally:
        group.close()


def _check_placement(settings: BuildSettings, world: int) -> None:
    """Refuse, before any process group starts, a teacher placement that cannot work.

    Raises:
        LongkdError: --tensor-parallel for a teacher transformers cannot split that way, or
            --device-map auto with several processes on one machine; either without accelerate.
    """
    from longkd.cache.tensor_parallel import check_teacher_shardable, require_accelerate

    if settings.tensor_parallel > 1:
        check_teacher_shardable(settings.teacher, settings.tensor_parallel, settings.trust_remote_code)
        require_accelerate(f"--tensor-parallel {settings.tensor_parallel}")
    if settings.device_map is not None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local > 1:
            raise LongkdError(
                f"--device-map {settings.device_map} spreads one process over a machine's GPUs, but this "
                f"job starts {local} processes on it; use one process per machine (--nproc-per-node 1), "
                "or --tensor-parallel"
            )
        require_accelerate(f"--device-map {settings.device_map}")


def _build(
    settings: BuildSettings, group: Group, tp: TensorParallel, device: str, progress: bool | None, echo
) -> BuildResult:
    """The build's phases in order: check --out, load the teacher and the data, start or resume
    --out, pack and run the teacher, write the manifest."""
    from longkd.cache.data import load_samples
    from longkd.cache.packing import Packer

    location = Location(settings.out)
    stored, finished = _check_out(settings, group, location, echo)
    if finished is not None:
        return finished
    teacher = _load_teacher(settings, device, tp)
    if tp.size > 1 and group.is_main:
        head = "split by vocabulary" if teacher.sharded_head is not None else "whole on every rank"
        echo(f"tensor parallel: {tp.groups} group(s) of {tp.size} ranks, the LM head {head}")
    tokenizer = teacher.tokenizer
    source = load_samples(
        settings.data,
        tokenizer=tokenizer,
        text_field=settings.text_field,
        input_ids_field=settings.input_ids_field,
        split=settings.split,
        streaming=settings.streaming,
        shuffle=settings.shuffle,
        seed=settings.seed,
    )
    tokenizer_info = dict(teacher.tokenizer_info())
    existed = location.exists()
    kept = _start_or_resume(settings, group, tp, location, stored, teacher, tokenizer_info)
    done = sum(info.rows for info in kept)
    if kept:
        echo(f"resuming {location.uri}: {len(kept)} shards, {done} windows already written")

    packer = Packer(_packing_config(settings, tokenizer))
    samples = _Fingerprint(source)
    windows = packer.pack(samples)
    mine = (w for w in _limit(windows, settings.max_windows) if w.window_id % settings.world == settings.rank)
    mine = _recheck_consumed(mine, location, kept, settings.data, _codecs(settings, teacher))
    run = _TeacherRun(settings, teacher)
    if tp.is_leader:
        writer = ShardWriter(
            location,
            selection_mode=settings.selection["mode"],
            logprob_dtype=settings.logprob_dtype,
            codecs=_codecs(settings, teacher),
            shard_size=settings.shard_size,
            compression_level=settings.compression_level,
            rank=settings.rank,
            completed=kept,
            stride=settings.world,
        )
    else:
        writer = _GroupMember(kept)
    bar = _progress_bar(settings, progress)
    started = time.perf_counter()
    try:
        shards = run.write_windows(mine, done, writer, bar)
        if packer.stats.windows == 0:
            raise LongkdError(
                f"no window was packed from {settings.data}: the samples hold fewer than --window "
                f"{settings.window} tokens (use a smaller --window or --tail pad)"
            )
    except LongkdError:
        if stored is None and group.world == 1 and not writer.completed:
            _remove_new_out(location, existed)  # bad input found before a single shard: leave nothing
        raise
    dataset = dict(source.describe())
    dataset.update(fingerprint=samples.digest.hexdigest(), samples=samples.count)
    manifest = _merged_manifest(
        settings, group, tp, location, teacher, tokenizer_info, packer, dataset, shards
    )
    group.rank0(lambda: write_manifest(location, manifest))  # last, after every rank finished
    elapsed = time.perf_counter() - started
    if group.is_main:
        _summary(echo, location, manifest, packer, run.tokens, elapsed)
    else:
        where = f" (tensor-parallel group {tp.index})" if tp.size > 1 else ""
        echo(f"rank {group.rank}{where}: {run.windows} windows, {run.tokens} tokens this run")
    return BuildResult(manifest, run.windows, run.tokens, elapsed, run.teacher_seconds)


def _check_out(
    settings: BuildSettings, group: Group, location: Location, echo
) -> tuple[dict | None, BuildResult | None]:
    """Agree on the settings, then look at --out (one rank looks, so every rank takes the same
    branch): ``(build.json or None, the result when the cache is already complete or None)``.

    Raises:
        LongkdError: ranks started with different settings, or --out holds another build.
    """
    # Before anything touches --out, so ranks started differently write nothing.
    group.agree({"settings": settings.content_settings()})
    stored, complete = group.rank0(lambda: _out_state(location))
    if stored is not None and isinstance(stored.get("settings"), dict):
        # Builds from before --tensor-parallel existed ran one teacher per rank; builds from
        # before --encoding existed wrote plain columns.
        stored["settings"].setdefault("tensor_parallel", 1)
        stored["settings"].setdefault("encoding", "plain")
    if stored is not None:
        compare_build_record(location, stored, {"settings": settings.content_settings()})
        if complete:
            manifest = load_manifest(location)
            t = manifest["totals"]
            echo(f"{location.uri} is already complete: {t.get('windows')} windows, {t.get('tokens')} tokens")
            return stored, BuildResult(manifest)
    return stored, None


def _load_teacher(settings: BuildSettings, device: str, tp: TensorParallel):
    """The teacher (split over this rank's group under --tensor-parallel, spread over the GPUs
    under --device-map auto), checked against the window and the selection.

    Raises:
        LongkdError: the teacher does not load, the window exceeds its positions (without
            --allow-extrapolation), or the top-k exceeds its vocabulary.
    """
    from longkd.cache.teacher import Teacher

    teacher = Teacher.load(
        settings.teacher,
        dtype=settings.dtype,
        device=device,
        trust_remote_code=settings.trust_remote_code,
        device_map=settings.device_map,
        tensor_parallel=tp,
    )
    selection = settings.selection
    max_positions = teacher.max_positions
    if max_positions is not None and settings.window > max_positions and not settings.allow_extrapolation:
        raise LongkdError(
            f"--window {settings.window} exceeds the teacher's max_position_embeddings "
            f"{max_positions}; use a smaller --window or pass --allow-extrapolation"
        )
    if "k" in selection and selection["k"] > teacher.embedding_size:
        raise LongkdError(
            f"--top-k {selection['k']} exceeds the teacher's vocabulary ({teacher.embedding_size} logits)"
        )
    return teacher


def _start_or_resume(
    settings: BuildSettings,
    group: Group,
    tp: TensorParallel,
    location: Location,
    stored: dict | None,
    teacher,
    tokenizer_info: dict,
) -> list[ShardInfo]:
    """Agree on the build record; write build.json to a new --out, or recover this rank's
    completed shards from an existing one (a group's first rank recovers them; the other ranks
    of the group receive its list).

    Returns:
        The shards kept (empty for a new build).

    Raises:
        LongkdError: ranks load different teachers or tokenizers, or --out was built with them.
    """
    record = {
        "format_version": fmt.FORMAT_VERSION,
        "settings": settings.content_settings(),
        "teacher": teacher.identity(),
        "tokenizer_fingerprint": tokenizer_info.get("fingerprint"),
    }
    group.agree(record, "teacher or tokenizer")
    if stored is not None:
        compare_build_record(location, stored, record)
        kept = recover_shards(location, settings.rank) if tp.is_leader else []
        if tp.size == 1:
            return kept
        every = group.all_gather([info.to_dict() for info in kept])
        return [ShardInfo(**entry) for entry in every[tp.leader]]

    def start() -> None:
        try:
            location.makedirs()
            location.write_text_atomic(fmt.BUILD_NAME, json.dumps(record, indent=2) + "\n")
        except (OSError, pa.ArrowException) as err:
            raise LongkdError(
                f"--out {location.uri}: cannot create the cache there ({os_reason(err)}); "
                "choose a writable --out"
            ) from err

    group.rank0(start)
    return []


def _packing_config(settings: BuildSettings, tokenizer):
    """The packer's settings: the build's plus the tokenizer's pad and EOS ids."""
    from longkd.cache.packing import PackingConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PackingConfig(
        window=settings.window,
        max_sample_tokens=settings.max_sample_tokens,
        overflow=settings.overflow,
        position_mode=settings.position_mode,
        add_eos=not settings.no_eos,
        tail=settings.tail,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id,
    )


class _GroupMember:
    """Stands in for the :class:`ShardWriter` on a tensor-parallel group's ranks after its first:
    they compute every window of the group with it, and its first rank writes them."""

    def __init__(self, completed: list[ShardInfo]):
        self.completed = list(completed)

    def put(self, window, rows) -> None:
        pass

    def close(self) -> list[ShardInfo]:
        return list(self.completed)

    def abort(self) -> None:
        pass


class _TeacherRun:
    """The teacher over this rank's windows, batch by batch, each window handed to the writer.

    Attributes:
        windows: windows computed (and written) so far.
        tokens: real tokens in those windows.
        teacher_seconds: time spent inside ``Teacher.run``.
    """

    def __init__(self, settings: BuildSettings, teacher):
        from longkd.cache.teacher import SelectionConfig

        self.settings, self.teacher = settings, teacher
        selection = settings.selection
        self.select = SelectionConfig(
            mode=selection["mode"],
            k=selection.get("k", DEFAULT_TOP_K),
            draws=selection.get("draws"),
            min_mass=selection.get("min_mass"),
            min_prob=selection.get("min_prob"),
        )
        self.windows, self.tokens, self.teacher_seconds = 0, 0, 0.0

    def write_windows(self, windows: Iterable, done: int, writer: ShardWriter, bar) -> list[ShardInfo]:
        """Run the teacher on ``windows`` after the first ``done`` (already written) and close
        the writer; on any failure the writer is aborted (its partial shard deleted).

        Returns:
            Every completed shard of this rank (the writer's).
        """
        settings = self.settings
        started, local = time.perf_counter(), 0
        try:
            # Batches are formed over this rank's windows from the start, so a resumed run sees the
            # same batch compositions (hence the same floating-point results) as an uninterrupted one.
            for batch in _batches(windows, settings.batch_size):
                first_local, local = local, local + len(batch)
                if local <= done:
                    bar.update(len(batch))
                    continue
                rows = self._run(batch)
                for offset, (window, window_rows) in enumerate(zip(batch, rows, strict=True)):
                    if first_local + offset >= done:
                        writer.put(window, window_rows)
                        self.tokens += int(window.length)
                        self.windows += 1
                bar.update(len(batch))
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
            return writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()

    def _run(self, batch: list) -> list:
        """``Teacher.run`` on one batch of packed windows (timed)."""
        import torch

        from longkd.cache.packing import position_ids_for

        settings = self.settings
        input_ids = torch.from_numpy(np.stack([w.input_ids for w in batch]).astype(np.int64))
        positions = np.stack(
            [position_ids_for(settings.window, w.segment_starts, settings.position_mode) for w in batch]
        )
        run_start = time.perf_counter()
        rows = self.teacher.run(
            input_ids,
            torch.from_numpy(positions.astype(np.int64)),
            [int(w.window_id) for w in batch],
            self.select,
            temperature=settings.temperature,
            seed=settings.seed,
            chunk_size=settings.chunk_size,
        )
        self.teacher_seconds += time.perf_counter() - run_start
        return rows


def _merged_manifest(
    settings: BuildSettings,
    group: Group,
    tp: TensorParallel,
    location: Location,
    teacher,
    tokenizer_info: dict,
    packer,
    dataset: dict,
    shards: list[ShardInfo],
) -> dict:
    """The finished cache's manifest over every writing rank's shards (each group's first).

    Raises:
        LongkdError: the ranks packed different data.
    """
    parts = group.all_gather({"shards": [s.to_dict() for s in shards], "fingerprint": dataset["fingerprint"]})
    if len({part["fingerprint"] for part in parts}) > 1:
        raise LongkdError(
            f"the ranks packed different data (dataset fingerprints differ) from {settings.data}; "
            "the dataset must read identically on every rank"
        )
    return build_manifest(
        teacher={**teacher.identity(), "dtype": settings.dtype},
        tokenizer=tokenizer_info,
        embedding_size=teacher.embedding_size,
        window=settings.window,
        packing={
            "policy": "concat",
            "max_sample_tokens": settings.max_sample_tokens,
            "overflow": settings.overflow,
            "position_mode": settings.position_mode,
            "add_eos": not settings.no_eos,
            "shuffle": settings.shuffle,
            "seed": settings.seed,
            "tail": settings.tail,
            "stats": packer.stats.to_dict(),
        },
        selection=settings.selection,
        temperature=settings.temperature,
        encoding={
            "ids": "int32",
            "logprobs": settings.logprob_dtype,
            "columns": _codecs(settings, teacher).manifest_entry(),
            "compression": fmt.COMPRESSION,
            "compression_level": (
                fmt.DEFAULT_COMPRESSION_LEVEL
                if settings.compression_level is None
                else settings.compression_level
            ),
        },
        dataset=dataset,
        shards=merge_shards([parts[r]["shards"] for r in range(0, group.world, tp.size)], location.uri),
    )


def _out_state(location: Location) -> tuple[dict | None, bool]:
    """(build.json or None, whether manifest.json exists) of --out.

    Raises:
        LongkdError: --out is (below) a regular file, in a place that is not writable, or holds
            something other than a longkd build.
    """
    if location.is_local:
        check_out_dir(location.root, "--out")
    stored = out_dir_state(location)
    return stored, stored is not None and location.is_file(fmt.MANIFEST_NAME)


def _remove_new_out(location: Location, existed: bool) -> None:
    """Undo the start of a build that failed before completing a shard: build.json, the empty
    shards/ and progress/ folders, and --out itself when this run created it."""
    location.delete(fmt.BUILD_NAME)
    for folder in (fmt.SHARDS_DIR, fmt.PROGRESS_DIR):
        if location.is_dir(folder) and not location.listdir(folder):
            location.fs.delete_dir(location.path(folder))
    if not existed and not location.listdir():
        location.fs.delete_dir(location.path())


def _codecs(settings: BuildSettings, teacher) -> ColumnCodecs:
    """The column encodings ``--encoding`` gives the cache."""
    selection = settings.selection
    mode = selection["mode"]
    return ColumnCodecs(
        mode,
        selection[fmt.selection_format(mode).size_key],
        settings.window,
        teacher.embedding_size,
        fmt.encoding_preset(settings.encoding, mode),
    )


def _stored_windows(location: Location, shards: list[ShardInfo], codecs: ColumnCodecs) -> Iterator[tuple]:
    """``(shard path, window_id, length, input_ids, segment_starts)`` of every row of
    ``shards``, in order, reading only those four columns."""
    wanted = (fmt.INPUT_IDS, fmt.SEGMENT_STARTS)
    for info in shards:
        source = location.open_input(info.path)
        schema = pa.ipc.open_file(source).schema
        columns = [fmt.WINDOW_ID, fmt.LENGTH, fmt.INPUT_IDS, fmt.SEGMENT_STARTS]
        options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        reader = pa.ipc.open_file(source, options=options)
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            ids, lengths = batch.column(fmt.WINDOW_ID), batch.column(fmt.LENGTH)
            for r in range(batch.num_rows):
                length = int(lengths[r].as_py())
                values = codecs.decode(batch, r, length, wanted)
                yield (
                    info.path,
                    int(ids[r].as_py()),
                    length,
                    values[fmt.INPUT_IDS],
                    values[fmt.SEGMENT_STARTS],
                )


def _recheck_consumed(
    windows: Iterable, location: Location, kept: list[ShardInfo], data: str, codecs: ColumnCodecs
) -> Iterator:
    """Pass this rank's packed windows through, checking the first ones against those the kept
    shards already hold, so a dataset that changed since the build started is refused before
    the teacher runs on a single new window.

    Raises:
        LongkdError: a window packs other tokens than the stored one, or the data now packs
            fewer windows than were written.
    """
    stored = _stored_windows(location, kept, codecs)
    changed = (
        f"--data {data} changed since this build started: restore the data the build started "
        "with, or build into a new --out"
    )
    for window in windows:
        expected = next(stored, None)
        if expected is not None:
            path, window_id, length, input_ids, segment_starts = expected
            if not (
                int(window.window_id) == window_id
                and int(window.length) == length
                and np.array_equal(np.asarray(window.input_ids), input_ids)
                and np.array_equal(np.asarray(window.segment_starts), segment_starts)
            ):
                raise LongkdError(f"{changed} (window {window_id} of {path} now packs other tokens)")
        yield window
    if next(stored, None) is not None:
        raise LongkdError(f"{changed} (it now packs fewer windows than the shards already hold)")


def _limit(windows: Iterable, max_windows: int | None) -> Iterator:
    """Windows with id < max_windows; stops without asking the packer for one more window, so
    the packing stats and the dataset fingerprint cover exactly what was packed."""
    for window in windows:
        if max_windows is not None and window.window_id >= max_windows:
            return
        yield window
        if max_windows is not None and window.window_id >= max_windows - 1:
            return


def _progress_bar(settings: BuildSettings, progress: bool | None):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    total = None
    if settings.max_windows is not None:
        total = -(-settings.max_windows // settings.world)
    return tqdm(total=total, unit="win", desc="cache build", disable=disable, dynamic_ncols=True)


def _summary(echo, location: Location, manifest: dict, packer, computed_tokens: int, elapsed: float) -> None:
    t = manifest["totals"]
    echo(packer.stats.summary())
    per_token = t["bytes"] / t["tokens"] if t["tokens"] else float("nan")
    echo(
        f"wrote {location.uri}: {t['windows']} windows, {t['tokens']} tokens, "
        f"{len(manifest['shards'])} shards, {t['bytes']:,} bytes ({per_token:.1f} B/token); "
        f"{computed_tokens / max(elapsed, 1e-9):,.0f} tokens/s this run"
    )
