"""Atomic file writes: a file is either the old complete version or the new complete one.

Everything that a later step trusts (index, folds, manifests, checkpoints, tables)
is written through these helpers: to a temporary file in the same folder, flushed
and fsynced, then renamed over the target. A crash or a full disk leaves the
previous file intact and no half-written file under the final name.

:func:`exclusive_lock` keeps two processes from writing one run folder at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pandas as pd


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched; an OS
    error that names no file (``ENOSPC`` from a full disk) is re-raised naming ``path``.
    ``fsync=False`` keeps the rename's atomicity but not durability across a power cut
    (for many small files whose size a manifest records, like the image cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = named_os_error(error, path)
        if named is error:
            raise
        raise named from error


def named_os_error(error: BaseException, path: str | os.PathLike) -> BaseException:
    """``error``, or for an OS error that names no file (a full disk fails ``write``), the same
    error naming ``path``, so the message says which file could not be written."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        return OSError(error.errno, error.strerror or str(error), str(path))
    return error


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike, **to_csv_kwargs) -> Path:
    """Write a DataFrame as CSV atomically (``index=False`` unless given)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_write(path, "w") as handle:
        frame.to_csv(handle, **to_csv_kwargs)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class FolderBusyError(RuntimeError):
    """Another process holds the lock of a folder this one wants to write."""


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the block, or raise :class:`FolderBusyError`.

    An advisory ``flock``: the operating system releases it when the holder exits, even by
    SIGKILL, so a crashed run never leaves a stale lock behind. The file records the holder
    (pid, host, start time) for the message a second process gets.
    """
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            raise FolderBusyError(handle.read().strip() or "unknown process") from None
        handle.seek(0)
        handle.truncate()
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}")
        handle.flush()
        yield
    finally:
        handle.close()
