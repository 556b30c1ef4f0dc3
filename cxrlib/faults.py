"""Fault injection for the tests: kill a training process at a named point.

The reliability tests prove that a run killed anywhere (a batch, a checkpoint write) resumes and
ends identical to an uninterrupted one. The trainer calls :func:`fault_point` at those points; it
does nothing unless ``CXRLIB_FAULT`` names the point, so it costs nothing in a real run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_ENV = "CXRLIB_FAULT"  # tests: "POINT[:key=value...]" kills this process at POINT
FAULT_MARKER_ENV = "CXRLIB_FAULT_MARKER"  # tests: fire only if this file does not exist yet


def fault_point(point: str, **where: int) -> None:
    """Kill this process with SIGKILL when ``CXRLIB_FAULT`` names this point (for the fault tests).

    ``CXRLIB_FAULT="train-batch:epoch=2:batch=1:rank=1"``; every given key must match. With
    ``CXRLIB_FAULT_MARKER=FILE`` it fires once: only if FILE does not exist, creating it first.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, *conditions = spec.split(":")
    if name != point:
        return
    for condition in conditions:
        key, _, value = condition.partition("=")
        if str(where.get(key)) != value:
            return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(spec)
    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_fault(epoch: int):
    """The ``before_rename`` hook of a checkpoint write: the ``checkpoint-rename`` fault point."""
    return lambda _tmp: fault_point("checkpoint-rename", epoch=epoch)
