"""Set-ups shared by several test files: random text data, `longkd cache build` runs (in this
process or under real torchrun), and small test-side utilities (a disk-full writer, one torch
thread, the loss oracles' row reduction).

Each test file keeps its own sizes and flags (as keyword arguments here), so what a test checks
stays visible in the test file while the mechanics live in one place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

# longkd.cli and longkd.tools.random_models import transformers (seconds): they are imported where used,
# so the kernel tests, which only need reduce_rows, do not pay for them.


def write_random_text(
    path: Path,
    *,
    samples: int,
    vocab: int,
    lengths: tuple[int, int] | int,
    seed: int | None,
    ids_field: str | None = None,
    fields: Mapping[str, object] | None = None,
) -> Path:
    """A jsonl file of ``samples`` rows ``{"text": "t5 t17 ..."}`` over the word tokenizer's ids.

    Ids are drawn uniformly from ``[4, vocab)`` (0-3 are the tokenizer's special tokens).

    Args:
        path: the file to write (replaced if present).
        samples: number of rows.
        vocab: exclusive upper bound of the drawn ids.
        lengths: ``(low, high)``: each sample's length in tokens is drawn from ``[low, high)``;
            an int: every sample has exactly that many tokens (no length draw).
        seed: numpy ``default_rng`` seed; ``None`` draws fresh data on every call.
        ids_field: if given, each row also stores its ids as a list under this key.
        fields: constant extra keys written after the text (and ids) in every row.

    Returns:
        ``path``.
    """
    from longkd.tools.random_models import ids_to_text

    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(samples):
            size = lengths if isinstance(lengths, int) else int(rng.integers(*lengths))
            ids = rng.integers(4, vocab, size=size)
            row = {"text": ids_to_text(ids)}
            if ids_field is not None:
                row[ids_field] = ids.tolist()
            row.update(fields or {})
            f.write(json.dumps(row) + "\n")
    return path


def cache_build_argv(teacher, data, out, *extra: str, **flags) -> list[str]:
    """The argv of ``longkd cache build --teacher T --data D --out O [flags...] [extra...]``.

    Args:
        teacher, data, out: paths or strings (``out`` may be a ``file://`` URI).
        *extra: raw arguments appended last, as given (e.g. ``"--top-k", "8"``).
        **flags: one option each, spelled in Python: ``top_k=8`` -> ``--top-k 8``; ``True`` gives
            the bare switch (``shuffle=True`` -> ``--shuffle``); ``None`` or ``False`` leaves the
            option out, so a caller can drop a default.

    Returns:
        The argument list for :func:`longkd.cli.main` or ``python -m longkd``.
    """
    argv = ["cache", "build", "--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return [*argv, *extra]


def build_cache(teacher, data, out, *extra: str, **flags):
    """Run ``longkd cache build`` in this process and require exit status 0.

    Args: as :func:`cache_build_argv`.

    Returns:
        ``out``, unchanged (a path, or the URI string).
    """
    from longkd.cli import main

    argv = cache_build_argv(teacher, data, out, *extra, **flags)
    assert main(argv) == 0, argv
    return out


def torchrun(args, nproc: int = 2, **popen) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m longkd ARGS``.

    The workers compute with one thread and never reach the hub. ``popen`` overrides the
    Popen arguments (stdout and stderr are pipes unless given).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([*cmd, "-m", "longkd", *args], env=env, text=True, **popen)


def run_torchrun(args, nproc: int = 2, timeout: float = 300) -> tuple[int, str, str]:
    """:func:`torchrun` to the end: ``(exit status, stdout, stderr)``."""
    proc = torchrun(args, nproc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (a child of the agent with RANK=rank in its env)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def ledger_lines(out: Path, rank: int) -> int:
    """Shards writer ``rank`` of the build into ``out`` has completed so far (its ledger's lines)."""
    try:
        return len((out / "progress" / f"rank-{rank:05d}.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def read_manifest(cache) -> dict:
    """The ``manifest.json`` of a finished local cache directory, parsed."""
    return json.loads((Path(cache) / "manifest.json").read_text())


def fail_writes_after(monkeypatch, budget: int) -> None:
    """Make shard files raise ``OSError(ENOSPC)`` once ``budget`` bytes have been written.

    Patches the cache writer's hashing file wrapper (the one place shard bytes pass through),
    so the error surfaces exactly where a full disk would: in the writer thread, mid-shard.
    """
    from longkd.cache import writer as writer_mod

    real_write = writer_mod._HashingFile.write
    left = {"bytes": budget}

    def failing_write(self, data):
        n = memoryview(data).nbytes
        if left["bytes"] < n:
            raise OSError(errno.ENOSPC, "No space left on device")
        left["bytes"] -= n
        return real_write(self, data)

    monkeypatch.setattr(writer_mod._HashingFile, "write", failing_write)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count after.

    Builds compared bit for bit with builds in ``OMP_NUM_THREADS=1`` subprocesses must use one
    thread too: float reductions may differ with the thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"):
    """The sparse-KL losses' reduction, written plainly for the test oracles.

    Args:
        rows: per-row losses, [N].
        mask: bool [N] or None; masked-out rows count as 0 and are left out of the mean.
        reduction: "none" ([N]), "sum" (scalar) or "mean" (sum over the kept rows, divided by
            their number, or by 1 when no row is kept).

    Returns:
        [N] for "none", else a scalar tensor (differentiable through ``rows``).
    """
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.shape[0] if mask is None else int(mask.sum())
    return rows.sum() / max(count, 1)
