"""Local files and directories that are either whole or absent, whatever instant a run dies.

A file is written under a temporary name in its own directory, flushed and fsynced, then
renamed over the final name (``os.replace`` is atomic on POSIX), and the directory is fsynced
so the rename itself survives a power cut. A reader therefore sees the old file or the
complete new one, never a torn one. A directory is built under a temporary sibling name and
renamed into place once complete. The cache's object-store paths have their own version in
cache/storage.py; every local write goes through here.

    from longkd.fileio import atomic_file, write_text_atomic
    write_text_atomic(root / "latest", "step-0000100\\n")
    with atomic_file(root / "state.pt", "wb") as f:
        torch.save(state, f)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` durably.

    Args:
        path: the final file; its directory must exist.
        mode: ``"wb"`` or ``"w"``.

    Yields:
        The open temporary file. If the block raises, the temporary file is removed and
        ``path`` is left as it was.
    """
    final = Path(path)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see :func:`atomic_file`)."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably (see :func:`atomic_file`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; on a clean exit rename it to ``path``.

    An existing ``path`` (a stale or earlier version) is removed just before the rename.

    Args:
        path: the final directory; its parent is created if needed.

    Yields:
        The empty temporary directory to fill. It is removed if the block raises (a run
        killed outright leaves it behind, under a ``.tmp-`` name no reader looks at).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
