"""Checkpoint files that survive a kill at any moment and never run code when loaded.

A run folder holds one file per epoch, ``checkpoint_epoch<NNN>.pt``, each with a sidecar
``checkpoint_epoch<NNN>.pt.json`` that records its size and SHA-256; the newest ``keep``
(default 2) are kept. Writing goes: bytes to a temporary file, flush, fsync, rename, fsync
the folder, then the sidecar the same way, then older checkpoints are removed. A process
killed at any point therefore leaves either a complete, verified newest checkpoint or the
previous one; :func:`load_latest_checkpoint` checks the newest against its sidecar and falls
back (with a warning) to the previous good one, never to a damaged file.

Everything is read with ``torch.load(..., weights_only=True)``: tensors and plain Python
containers only, so a planted pickle that would run code is refused. The RNG states are
therefore stored as tensors and lists (:func:`capture_rng_state`), not as Python objects.
``best_model.pt`` (the best weights) uses the same verified format via :func:`save_verified`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import named_os_error

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch(\d+)\.pt$")
BEST_MODEL_NAME = "best_model.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing its sidecar, damaged, or not a safe (weights-only) file."""


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``<run_dir>/checkpoint_epoch<NNN>.pt``."""
    return Path(run_dir) / f"checkpoint_epoch{int(epoch):03d}.pt"


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file next to ``path`` that records its size and SHA-256."""
    return Path(f"{path}.json")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint file in ``run_dir``, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk (not possible on every OS).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = named_os_error(error, path)  # a full disk: say which file could not be written
        if named is error:
            raise
        raise named from error
    _fsync_dir(path.parent)


def save_verified(obj: Any, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, then its sidecar (size, SHA-256, ``metadata``)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    _write_bytes_atomic(data, path)
    record = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    record.update(metadata or {})
    _write_bytes_atomic(json.dumps(record, indent=1).encode(), sidecar_path(path))
    return path


def load_verified(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_verified` after checking its size and SHA-256.

    Raises :class:`CheckpointError` naming the file when the sidecar is missing or does not
    match, or when ``torch.load(weights_only=True)`` refuses the content (e.g. a pickle that
    would run code). Nothing is unpickled before the checksum matches.
    """
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
    return safe_load_bytes(data, source=str(path), map_location=map_location)


def safe_load_bytes(data: bytes, source: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` on bytes; a refusal becomes a :class:`CheckpointError`."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{source}: refused by torch.load(weights_only=True); it is not a plain weights/checkpoint "
            f"file and is not unpickled ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


def save_checkpoint(state: dict, run_dir: str | os.PathLike, epoch: int, keep: int = 2) -> Path:
    """Write ``state`` as epoch ``epoch``'s checkpoint and keep only the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    path = checkpoint_path(run_dir, epoch)
    save_verified(state, path, {"epoch": int(epoch)})
    for old_epoch, old in list_checkpoints(run_dir)[keep:]:
        if old_epoch < epoch:
            with contextlib.suppress(FileNotFoundError):
                sidecar_path(old).unlink()
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return path


def load_latest_checkpoint(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", max_epoch: int | None = None
) -> tuple[dict, Path] | None:
    """The newest checkpoint of ``run_dir`` that verifies, and its path; ``None`` when there is none.

    A damaged, partial or refused newer file is skipped with a warning naming it. Raises
    :class:`CheckpointError` when checkpoint files exist but none verifies, so a run is never
    silently restarted from scratch over them (delete them or use ``--no-resume``).
    ``max_epoch`` ignores newer files (to load the one another process chose).
    """
    problems = []
    for epoch, path in list_checkpoints(run_dir):
        if max_epoch is not None and epoch > max_epoch:
            continue
        try:
            state = load_verified(path, map_location)
        except CheckpointError as error:
            problems.append(str(error))
            warnings.warn(f"ignoring checkpoint: {error}; trying the previous one", stacklevel=2)
            continue
        if not isinstance(state, dict) or "epoch" not in state:
            problems.append(f"{path}: not a training checkpoint")
            continue
        return state, path
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {run_dir}: " + "; ".join(problems) + ". Remove the damaged files or "
            "start over with --no-resume"
        )
    return None


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by a write that was killed (``.<name>.*.tmp``)."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for tmp in run_dir.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python ``random`` states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only where the same GPUs are present)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
