"""Where a cache lives: local paths and URIs (``file://``, ``s3://``, ``gs://``...) via pyarrow.fs.

Writer, manifest, reader and verify only talk to a :class:`Location`, a directory on some
pyarrow filesystem addressed by relative POSIX paths, so one code path serves a local disk
and object stores. Local paths get real durability (``fsync``) and atomic renames; object
stores get whatever their "move" offers.

Temporary files are named ``.tmp-...`` here as in longkd/fileio.py, and every instant between
two writes calls ``fileio.write_point`` (a no-op outside fault-injection tests).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from longkd.errors import LongkdError, one_line
from longkd.fileio import temp_file_name, write_bytes_atomic, write_point

_HASH_BLOCK = 1 << 20


def _is_uri(text: str) -> bool:
    return "://" in text


def os_reason(err: BaseException) -> str:
    """An ``OSError`` (or Arrow I/O error) as ``[Errno 28] No space left on device``, for messages."""
    if isinstance(err, OSError) and err.strerror:
        return f"[Errno {err.errno}] {err.strerror}" if err.errno else err.strerror
    return one_line(err, 200)


class Location:
    """A directory on a pyarrow filesystem; every path argument is relative to it (POSIX ``/``).

    Args:
        uri: a local path (relative or absolute) or a URI that ``pyarrow.fs.FileSystem.from_uri``
            understands.

    Raises:
        LongkdError: the URI cannot be opened (unknown scheme, missing credentials...).
    """

    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri)
        if _is_uri(self.uri) and not self.uri.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
                # Touch the store now, so a missing bucket or credential is one clear error here
                # rather than a traceback from the first read or write.
                self.fs.get_file_info(self.root.rstrip("/") or "/")
            except (pa.ArrowException, OSError, ValueError) as err:
                raise LongkdError(f"cannot open {self.uri}: {one_line(err)}") from err
        else:
            path = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(os.path.expanduser(path))
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (as the underlying filesystem names it)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        return self._info(rel).type == pafs.FileType.Directory

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        """File size in bytes (-1 when missing)."""
        info = self._info(rel)
        return info.size if info.type == pafs.FileType.File else -1

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly inside ``rel``; empty when it does not exist."""
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False))
        return sorted(info.base_name for info in infos)

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def delete(self, rel: str) -> None:
        """Delete a file (no error when it is already gone)."""
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (atomic on local filesystems)."""
        write_point("file-written", self.path(dst))
        self.fs.move(self.path(src), self.path(dst))
        write_point("file-moved", self.path(dst))

    def open_input(self, rel: str) -> pa.NativeFile:
        """A random-access file for reading (what ``pa.ipc.open_file`` needs)."""
        return self.fs.open_input_file(self.path(rel))

    def open_output(self, rel: str) -> BinaryIO:
        """A writable binary file; ``sync_close`` makes its bytes durable before closing."""
        if self.is_local:
            handle = open(self.path(rel), "wb")  # noqa: SIM115 (closed by sync_close)
        else:
            handle = self.fs.open_output_stream(self.path(rel))
        write_point("file-opened", self.path(rel))
        return handle

    @staticmethod
    def sync_close(handle) -> None:
        """Flush, fsync (for local files) and close ``handle`` from :meth:`open_output`."""
        handle.flush()
        if hasattr(handle, "fileno") and not isinstance(handle, pa.NativeFile):
            os.fsync(handle.fileno())
        handle.close()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to a temporary name in the same directory, make it durable, rename.

        A reader therefore sees either the old file or the complete new one. Local paths go
        through :func:`longkd.fileio.write_bytes_atomic` (fsync of the file and of the
        directory); object stores get their own "move".
        """
        parent = posixpath.dirname(rel)
        if parent:
            self.makedirs(parent)
        if self.is_local:
            write_bytes_atomic(self.path(rel), data)
            return
        tmp = posixpath.join(parent, temp_file_name(posixpath.basename(rel)))
        handle = self.open_output(tmp)
        try:
            handle.write(data)
            self.sync_close(handle)
            self.move(tmp, rel)
        except BaseException:
            handle.close()
            self.delete(tmp)
            raise

    def remove_temporaries(self, rel: str, match) -> list[str]:
        """Delete the ``.tmp-`` files in directory ``rel`` for which ``match(name)`` holds
        (what killed writers left); returns their names."""
        names = [n for n in self.listdir(rel) if n.startswith(".tmp-") and match(n)]
        for name in names:
            self.delete(posixpath.join(rel, name) if rel else name)
        return names

    def write_text_atomic(self, rel: str, text: str) -> None:
        self.write_bytes_atomic(rel, text.encode("utf-8"))

    def sha256(self, rel: str) -> str:
        """Hex sha256 of the file's bytes, read in 1 MiB blocks."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path(rel)) as f:
            while True:
                block = f.read(_HASH_BLOCK)
                if not block:
                    break
                digest.update(block)
        return digest.hexdigest()
