"""Kill a training process at a chosen moment, from outside the package (the resume tests).

:func:`fault_env` is the environment under which every Python process (the trainer, the torchrun
agent and its workers) loads this folder's ``sitecustomize.py``, which patches the named point.
"""

from __future__ import annotations

import os
from pathlib import Path


def fault_env(spec: str, marker: Path | None = None) -> dict[str, str]:
    """``CXR_TEST_FAULT=spec`` and this folder first on ``PYTHONPATH``; with ``marker``, fire once."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {"CXR_TEST_FAULT": spec, "PYTHONPATH": path}
    if marker is not None:
        env["CXR_TEST_FAULT_MARKER"] = str(marker)
    return env
