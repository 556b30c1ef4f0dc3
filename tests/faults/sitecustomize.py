"""Test fault points, loaded at start-up by any Python process with this folder on ``PYTHONPATH``.

``CXR_TEST_FAULT`` names a point and conditions; the process kills itself with SIGKILL there:

* ``train-batch:epoch=E:batch=B[:rank=R]``: the training loader (sampler a ``StepBlockSampler``)
  has fetched batch B of epoch E on rank R, and the training loop has not seen it yet;
* ``checkpoint-rename:epoch=E``: the complete temporary file of ``checkpoint_epoch<EEE>.pt`` is
  about to be renamed to it.

With ``CXR_TEST_FAULT_MARKER=FILE`` it fires once: only if FILE does not exist, creating it first.
"""

import os
import re
import signal
from pathlib import Path

SPEC = os.environ.get("CXR_TEST_FAULT", "")
POINT, *CONDITIONS = SPEC.split(":")
WANTED = dict(condition.partition("=")[::2] for condition in CONDITIONS)


def kill_if(**where: int) -> None:
    """SIGKILL this process when every condition of the spec holds for ``where``."""
    if any(str(where.get(key)) != value for key, value in WANTED.items()):
        return
    marker = os.environ.get("CXR_TEST_FAULT_MARKER")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(SPEC)
    os.kill(os.getpid(), signal.SIGKILL)


def killing_batches(batches, epoch: int, rank: int):
    for number, batch in enumerate(batches, start=1):
        kill_if(epoch=epoch, batch=number, rank=rank)
        yield batch


if POINT == "train-batch":
    from torch.utils.data import DataLoader

    iterate = DataLoader.__iter__

    def patched_iter(loader):
        sampler = loader.sampler
        if type(sampler).__name__ != "StepBlockSampler":
            return iterate(loader)
        return killing_batches(iterate(loader), sampler.epoch, sampler.rank)

    DataLoader.__iter__ = patched_iter

elif POINT == "checkpoint-rename":
    replace = os.replace

    def patched_replace(src, dst, *args, **kwargs):
        epoch = re.fullmatch(r"checkpoint_epoch(\d+)\.pt", os.path.basename(dst))
        if epoch:
            kill_if(epoch=int(epoch.group(1)))
        return replace(src, dst, *args, **kwargs)

    os.replace = patched_replace
