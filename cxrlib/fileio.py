"""Atomic writes, verified ``torch`` files, one-line errors, a folder lock (docs/training.md)."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import hashlib
import io
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pandas as pd
import torch


class DataError(ValueError):
    """An input file that cannot be used; one line naming the file (and column and CSV line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class DataFileNotFound(DataError, FileNotFoundError):
    """A file an input names, or the input itself, is not there."""


class ConfigError(ValueError):
    """A parameter or input file is wrong; raised before any work starts."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing its sidecar, damaged, or not a safe (weights-only) file."""


class FolderBusyError(RuntimeError):
    """Another process holds the lock of a folder this one wants to write."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """A temporary file next to ``path``, renamed to it on success; on failure ``path`` is untouched."""
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
        if isinstance(error, OSError) and error.errno is not None and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> list[str]:
    """A CSV file's column names; a :class:`DataError` when it has none or two share a name."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            header = next(csv.reader(io.StringIO(handle.readline())), [])
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: line 1: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (csv.Error, OSError) as error:
        raise DataError(f"{path}: line 1: cannot read the header: {error}") from None
    if not header or not any(c.strip() for c in header):
        raise DataError(f"{path}: line 1: the file is empty or has no header")
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:
        raise DataError(f"{path}: line 1: column {twice!r} appears twice in the header")
    return header


def read_csv_text(path: str | os.PathLike, **options) -> pd.DataFrame:
    """``pandas.read_csv`` whose failures become one :class:`DataError` naming the file."""
    try:
        return pd.read_csv(path, **options)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, csv.Error, ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read it as CSV: {error}") from None


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file next to ``path`` that records its size and SHA-256."""
    return Path(f"{path}.json")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a rename survives a power cut once the folder is on disk
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_verified(obj: Any, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, then its sidecar (size, SHA-256, ``metadata``)."""
    path, buffer = Path(path), io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    with atomic_write(path) as handle:
        handle.write(data)
    _fsync_dir(path.parent)  # the file is on disk before its sidecar
    record = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_text_atomic(json.dumps(record | (metadata or {}), indent=1), sidecar_path(path))
    _fsync_dir(path.parent)
    return path


def load_verified(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """A :func:`save_verified` file, loaded ``weights_only`` once its size and SHA-256 match the sidecar."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if not side.is_file():
        raise CheckpointError(f"{path}: no sidecar {side.name} (the write did not finish)")
    try:
        record = json.loads(side.read_text())
        expected_size, expected_sha = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{side}: unreadable sidecar ({error})") from error
    data = path.read_bytes()
    if len(data) != expected_size:
        raise CheckpointError(f"{path}: {len(data)} bytes, the sidecar records {expected_size} (truncated?)")
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(f"{path}: SHA-256 differs from the sidecar's (damaged file)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True); it is not a plain weights/checkpoint "
            f"file and is not unpickled ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, else a ``FolderBusyError`` naming the holder."""
    import fcntl  # POSIX only: importing cxrlib stays possible elsewhere

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
        handle.truncate(0)
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}")
        handle.flush()
        yield
    finally:
        handle.close()
