"""Local files and directories that are either whole or absent, whatever instant a run dies.

A file is written under a temporary name in its own directory, flushed and fsynced, then
renamed over the final name (``os.replace`` is atomic on POSIX), and the directory is fsynced
so the rename itself survives a power cut. A reader therefore sees the old file or the
complete new one, never a torn one. A directory is built under a temporary sibling name and
renamed into place once complete. The cache's object-store paths have their own version in
cache/storage.py; every local write goes through here.

Temporary names all start with ``.tmp-`` (:data:`TEMP_PREFIX`), so the next run can find and
remove what a killed one left (:func:`remove_temporaries`). Every instant between two writes
where a kill leaves the files in a new state calls :func:`write_point`; it does nothing
unless a fault-injection test installed :data:`fault_hook`, which may end the process there.

    from longkd.fileio import atomic_file, write_text_atomic
    write_text_atomic(root / "latest", "step-0000100\\n")
    with atomic_file(root / "state.json", "w") as f:
        f.write(text)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_PREFIX = ".tmp-"
# What atomic_file and cache/storage.py name a temporary file: .tmp-<32 hex digits>-<final name>.
_TEMP_FILE = re.compile(r"^\.tmp-[0-9a-f]{32}-(?P<final>.+)$")

# Called with (label, path) at every write point; None outside fault-injection tests.
fault_hook: Callable[[str, str], None] | None = None


def write_point(label: str, path: str | os.PathLike) -> None:
    """Mark an instant between two writes: a run killed here must leave resumable files.

    Args:
        label: what has just been written (``file-written``: a temporary file is complete and
            about to replace ``path``; ``dir-filled``, ``dir-swapped``, ``removed``, ...).
        path: the final path the write is for.
    """
    hook = fault_hook
    if hook is not None:
        hook(label, os.fspath(path))


def temp_file_name(final_name: str) -> str:
    """The name :func:`atomic_file` writes ``final_name`` under before renaming it."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final_name}"


def is_temp_of(name: str, finals: Callable[[str], bool]) -> bool:
    """True when ``name`` is an :func:`atomic_file` temporary of a file for which ``finals`` holds."""
    m = _TEMP_FILE.match(name)
    return bool(m) and finals(m.group("final"))


def remove_temporaries(directory: str | os.PathLike, match: Callable[[str], bool] | None = None) -> list[str]:
    """Remove what killed runs left in ``directory``: ``.tmp-`` files and directories.

    Args:
        directory: a directory (nothing happens when it does not exist).
        match: which ``.tmp-`` names to remove (default: all). Directories shared with the
            user's own files pass a matcher for exactly the temporaries longkd writes there.

    Returns:
        The names removed.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for child in root.iterdir():
        if not child.name.startswith(TEMP_PREFIX) or (match is not None and not match(child.name)):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child.name)
    return sorted(removed)


def check_out_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse an output directory that cannot be created, before anything is computed.

    ``path`` may exist (a directory) or not; the nearest existing ancestor must then be a
    writable directory.

    Args:
        path: the local directory a command will write.
        what: the setting that named it (``--out``), for the message.

    Raises:
        LongkdError: ``path`` or an ancestor is a regular file, or the ancestor is not writable.
    """
    from longkd.errors import LongkdError

    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == target else f"is below {probe}, a file"
        raise LongkdError(f"{what} {path} {where}, not a directory; choose another {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LongkdError(f"{what} {path}: {probe} is not writable; choose another {what}")


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
    tmp = final.with_name(temp_file_name(final.name))
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        write_point("file-written", final)
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

    An existing ``path`` (a stale or earlier version) is first renamed aside to a ``.tmp-``
    name and removed after the new one is in place, so at every instant ``path`` is absent,
    the old directory or the new one, never a mix.

    Args:
        path: the final directory; its parent is created if needed.

    Yields:
        The empty temporary directory to fill. It is removed if the block raises (a run
        killed outright leaves it behind, under a ``.tmp-`` name no reader looks at and
        :func:`remove_temporaries` removes).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    old = None
    try:
        yield tmp
        write_point("dir-filled", final)
        if final.exists():
            old = final.with_name(f"{TEMP_PREFIX}old-{uuid.uuid4().hex}-{final.name}")
            os.replace(final, old)
            write_point("dir-moved-aside", final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        write_point("dir-swapped", final)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
