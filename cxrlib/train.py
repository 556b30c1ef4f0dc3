"""Train DenseNet121 on one fold at one resolution with the paper's recipe; one process or torchrun DDP.

Launch (``--out`` is the fold's run folder, by convention ``runs/<preset>/res<R>/fold<k>``)::

    # one GPU, or the CPU
    python -m cxrlib.train --index runs/mimic/index.csv --folds runs/mimic/folds.csv \\
        --cache cache/mimic --resolution 512 --fold 0 --out runs/mimic/res512/fold0

    # every GPU of this node
    torchrun --standalone --nproc_per_node=gpu -m cxrlib.train --index ... --resolution 1024 \\
        --fold 0 --out ...

    # two nodes of 8 GPUs (the same command on each node; --out on a shared filesystem; a fresh
    # rendezvous store per round, so that the nodes can restart together after a failure)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node01:29500 \\
        --rdzv_id=res2048-fold0 --max-restarts=3 -m cxrlib.train --index ... --resolution 2048 ...

    # SLURM: sbatch this script (one torchrun per node; srun starts it on each node)
    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64 --time=48:00:00
    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 --max-restarts=3 \\
        -m cxrlib.train --index ... --resolution 2048 --fold 0 --out ...
    # (--max-restarts: after a crash the workers restart and resume from the newest checkpoint)
    # (or srun --ntasks-per-node=8 python -m cxrlib.train ... with MASTER_ADDR/MASTER_PORT exported:
    #  SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are read when torchrun's variables are absent)

From a notebook, :func:`cxrlib.launch.launch` builds and runs the torchrun command.

The recipe (paper section 2.2, Table 1):

* Adam; BCE on logits with unknown labels masked out (:func:`cxrlib.labels.masked_bce_with_logits`);
  the loss of an optimizer step is the mean over the known labels of its whole effective
  batch (every micro-batch and process; DDP's gradient averaging is compensated), so one
  process with accumulation and N processes give the same gradient for the same images.
* Learning rate and effective batch per resolution (:data:`TABLE1`): 5e-4 / 2.5e-4 / 1.6e-4 /
  8.204e-5 and 512 / 256 / 168 / 42 at 256 / 512 / 1024 / 2048 px. Other resolutions: the
  effective batch interpolated log-linearly in resolution between Table 1's neighbours (the
  end values outside 256-2048), and lr = 5e-4 x effective batch / 512 (linear scaling anchored
  on 256 px). A given ``--effective-batch`` without ``--lr`` scales the resolution's lr linearly.
  Effective batch = per-process batch x processes x accumulation steps: met exactly whenever a
  split within the per-process limit exists (:func:`plan_batches`); otherwise the closest is
  used and the learning rate scaled linearly by actual / requested (logged, and recorded in
  ``done.json`` as ``lr``, ``lr_requested`` and ``lr_scale``).
* ``ReduceLROnPlateau(factor=0.5, patience=3)`` on the validation loss (PyTorch semantics: the
  lr halves at the end of the 4th consecutive epoch without improvement, i.e. once the loss has
  not improved *for more than* 3 epochs); training stops once the validation loss has not
  improved for 10 consecutive epochs (``--patience-stop``) or at ``--epochs``. Improvement
  means lower by more than 1e-4 relative (the scheduler's own threshold). The validation loss
  is summed and counted over all processes, so all take the same decisions.
* Augmentation (random horizontal flip, rotation uniform in [-15, 15] degrees) runs on the
  device in batches (:func:`cxrlib.transforms.rotate_flip_batch`, the core of
  :class:`cxrlib.transforms.BatchTransform`); DataLoader workers only decode uint8 images.
  Each image's flip and angle are drawn per epoch from ``(seed, epoch)`` and indexed by the
  image, so they do not depend on the number of processes, the batch size or a resume.
* Mixed precision (``--amp auto``): bf16 autocast on GPUs that support it, fp16 with a
  GradScaler on the others, off on the CPU; channels_last on GPUs (``--channels-last on``
  also on the CPU, where it pays at small sizes).
* Per-process batch (``--batch-size``; by default chosen automatically and logged): on a GPU the
  largest power of two, at most 256, whose estimated training memory fits 80% of the free memory
  (``torch.cuda.mem_get_info``) less 1 GiB (:func:`default_per_gpu_batch`). The estimate per image
  is 0.083 GiB x (R / 256)^2 with bf16 or fp16 autocast and channels_last (measured on an H200),
  twice that in float32, half that with ``--memory-efficient`` (:func:`training_gib_per_image`).
  On the CPU: 16 up to 128 px, else 8. That is a limit: the per-process batch and the
  accumulation steps then make up the effective batch (:func:`plan_batches`), so the batch
  changes the speed, not the recipe.
* Input pipeline: DataLoader workers (:func:`default_workers`) only decode cached uint8 images
  into shared memory; batches go through pinned memory with non-blocking copies, persistent
  workers and a prefetch of 4 batches per worker; augmentation and normalisation run on the device.
* BatchNorm: each process normalises with its own micro-batch's statistics (torchvision's
  references and plain DDP do the same); ``--sync-bn`` uses SyncBatchNorm on GPUs. The sampler
  (:class:`StepBlockSampler`, a DistributedSampler with ``set_epoch``) deals each optimizer
  step's images to the processes in contiguous blocks, so N processes and one process with N
  times the accumulation steps (same per-process batch) normalise the same groups of images and
  train identically to float precision. Only BatchNorm's running statistics, which the
  validation loss and the predictions use, differ: under DDP they are rank 0's.

Files in ``--out``: ``history.csv`` (epoch, train_loss, val_loss, lr, seconds, img_per_s; lr is
the rate the epoch trained with, img_per_s the training images per second of the training
phase, seconds the whole epoch), ``checkpoint_epoch<NNN>.pt`` (+ ``.json`` sidecars, the newest
two kept; see :mod:`cxrlib.checkpoint`), ``best_model.pt``, ``val_predictions.csv``,
``test_predictions.csv`` and ``done.json``. Re-running the same command resumes from the newest
good checkpoint (epoch granularity; with ``--deterministic`` on the CPU the result is
bit-identical to an uninterrupted run), or does nothing when ``done.json`` says the run is
complete; ``--no-resume`` starts over. While a run writes ``--out``, rank 0 holds a lock on
``--out/.lock``: a second run on the same folder is refused with the first one's pid and host.
A failed write (full disk, quota, read-only or I/O error) ends the run with a one-line error
naming the file; the checkpoints written before are kept for the resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import __version__
from . import dist as cxrdist
from .cache import MANIFEST_NAME, cached_image_path, check_cache
from .checkpoint import (
    BEST_MODEL_NAME,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    load_verified,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
    save_verified,
    sidecar_path,
)
from .datasets import CXRDataset, ImageReadError, collate_skip_none, read_index
from .fileio import FolderBusyError, exclusive_lock, sha256_file, write_csv_atomic, write_text_atomic
from .labels import masked_bce_with_logits
from .models import WEIGHT_CHOICES, WeightsUnavailableError, build_model
from .predict import IndexedDataset, logits_frame, predict_arrays
from .runtime import ConfigError, amp_dtype, autocast, model_input, resolve_device, use_channels_last
from .splits import fold_ids, num_folds, read_folds
from .transforms import MAX_ROTATION_DEGREES, normalize, rotate_flip_batch

# Paper, Table 1: resolution -> (initial learning rate, effective batch size).
TABLE1: dict[int, tuple[float, int]] = {
    256: (5e-4, 512),
    512: (2.5e-4, 256),
    1024: (1.6e-4, 168),
    2048: (8.204e-5, 42),
}
MIN_RESOLUTION = 32  # DenseNet121 reduces the input 32x; smaller images have no feature map left
# Automatic per-GPU batch (see default_per_gpu_batch). Training memory per image with bf16 +
# channels_last, measured on an H200 (design.md): 10.6 GiB for 128 images at 256 px, 21 GiB for 4
# at 2048 px -> about 0.083 GiB x (R / 256)^2.
GIB_PER_IMAGE_AT_256 = 0.083
# Tensors saved for the backward pass of DenseNet121, counted on the CPU (autograd's saved-tensor
# hooks, 128 px): float32 keeps 1.97x the bytes of bf16 autocast, and memory_efficient (gradient
# checkpointing of each dense layer's concatenation + BN + ReLU + 1x1 conv) 0.47x. Rounded up.
FLOAT32_MEMORY_FACTOR = 2.0
MEMORY_EFFICIENT_FACTOR = 0.5
AUTO_BATCH_MEMORY_FRACTION = 0.8  # of the free memory; the rest absorbs allocator fragmentation
AUTO_BATCH_RESERVED_GIB = 1.0  # weights, gradients, Adam's state, cuDNN workspace
AUTO_BATCH_CAP = 256
CPU_BATCH_SMALL, CPU_BATCH_LARGE = 16, 8  # on the CPU speed, not memory, limits the batch
PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead
FAULT_ENV = "CXRLIB_FAULT"  # tests: "POINT[:key=value...]" kills this process at POINT
FAULT_MARKER_ENV = "CXRLIB_FAULT_MARKER"  # tests: fire only if this file does not exist yet
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # one-line errors, no traceback
LOCK_NAME = ".lock"  # held by rank 0 while a run writes its folder
RESULT_FILES = ("history.csv", "val_predictions.csv", "test_predictions.csv", "done.json")
ESSENTIAL_KEYS = ("resolution", "fold", "index_sha256", "folds_sha256", "seed", "effective_batch", "weights")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


# ----------------------------------------------------------------------------- recipe defaults


def default_effective_batch(resolution: int) -> int:
    """Table 1's effective batch, log-linearly interpolated in resolution between its entries."""
    resolutions = sorted(TABLE1)
    if resolution in TABLE1:
        return TABLE1[resolution][1]
    if resolution <= resolutions[0]:
        return TABLE1[resolutions[0]][1]
    if resolution >= resolutions[-1]:
        return TABLE1[resolutions[-1]][1]
    low = max(r for r in resolutions if r < resolution)
    high = min(r for r in resolutions if r > resolution)
    t = (math.log(resolution) - math.log(low)) / (math.log(high) - math.log(low))
    log_batch = (1 - t) * math.log(TABLE1[low][1]) + t * math.log(TABLE1[high][1])
    return int(round(math.exp(log_batch)))


def default_lr(resolution: int, effective_batch: int | None = None) -> float:
    """Initial learning rate: Table 1's, or 5e-4 x effective batch / 512; scaled linearly to a
    non-default ``effective_batch``."""
    base_batch = default_effective_batch(resolution)
    base_lr = TABLE1[resolution][0] if resolution in TABLE1 else 5e-4 * base_batch / 512
    if effective_batch is None:
        return base_lr
    return base_lr * effective_batch / base_batch


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How an effective batch is made: per-process batch x processes x accumulation steps."""

    per_gpu_batch: int
    world_size: int
    accumulation_steps: int
    requested_effective_batch: int

    @property
    def effective_batch(self) -> int:
        return self.per_gpu_batch * self.world_size * self.accumulation_steps

    @property
    def exact(self) -> bool:
        return self.effective_batch == self.requested_effective_batch

    @property
    def lr_scale(self) -> float:
        """Linear scaling of the learning rate to the batch actually used: actual / requested."""
        return self.effective_batch / self.requested_effective_batch

    def describe(self) -> str:
        text = (
            f"effective batch {self.effective_batch} = {self.per_gpu_batch} per process x "
            f"{self.world_size} process(es) x {self.accumulation_steps} accumulation step(s)"
        )
        if not self.exact:
            text += (
                f"; {self.requested_effective_batch} requested cannot be matched exactly, so the "
                f"learning rate is scaled by {self.effective_batch}/{self.requested_effective_batch}"
            )
        return text


def plan_batches(
    effective_batch: int, world_size: int, per_gpu_batch: int | None = None, max_per_gpu: int | None = None
) -> BatchPlan:
    """Choose accumulation steps (and, when ``per_gpu_batch`` is None, the per-process batch).

    With a fixed ``per_gpu_batch``: accumulation = round(effective / (batch x world)), at least 1.
    Otherwise the requested effective batch is met exactly whenever a per-process batch of at
    most ``max_per_gpu`` allows it (with the fewest accumulation steps among the exact splits:
    42 on one GPU of at most 4 images is 3 x 14). Only when no split is exact is the closest
    taken (fewest steps among equally close ones); :attr:`BatchPlan.lr_scale` then says how
    the learning rate follows it.
    """
    if effective_batch < 1 or world_size < 1:
        raise ConfigError(f"effective batch ({effective_batch}) and processes ({world_size}) must be >= 1")
    if per_gpu_batch is not None:
        if per_gpu_batch < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {per_gpu_batch}")
        steps = max(1, round(effective_batch / (per_gpu_batch * world_size)))
        return BatchPlan(per_gpu_batch, world_size, steps, effective_batch)
    limit = max(1, max_per_gpu or effective_batch)
    per_process, remainder = divmod(effective_batch, world_size)
    if remainder == 0:
        for steps in range(1, per_process + 1):
            if per_process % steps == 0 and per_process // steps <= limit:
                return BatchPlan(per_process // steps, world_size, steps, effective_batch)
    best = BatchPlan(1, world_size, 1, effective_batch)
    for steps in range(1, max(1, math.ceil(effective_batch / world_size)) + 1):
        share = effective_batch / (world_size * steps)
        for batch in sorted({min(limit, max(1, math.floor(share))), min(limit, max(1, math.ceil(share)))}):
            plan = BatchPlan(batch, world_size, steps, effective_batch)
            if abs(plan.lr_scale - 1) < abs(best.lr_scale - 1):  # ties keep the fewer steps
                best = plan
    return best


def training_gib_per_image(
    resolution: int, amp: torch.dtype | None = torch.bfloat16, memory_efficient: bool = False
) -> float:
    """Estimated GPU training memory per image (GiB) at ``resolution``: 0.083 x (R / 256)^2 with
    mixed precision, x 2 in float32 (``amp`` None), x 0.5 with ``memory_efficient``."""
    per_image = GIB_PER_IMAGE_AT_256 * (resolution / 256) ** 2
    if amp is None:
        per_image *= FLOAT32_MEMORY_FACTOR
    if memory_efficient:
        per_image *= MEMORY_EFFICIENT_FACTOR
    return per_image


def batch_for_memory(
    resolution: int,
    free_bytes: int,
    amp: torch.dtype | None = torch.bfloat16,
    memory_efficient: bool = False,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """Largest power of two (1 .. ``cap``) whose estimated training memory fits ``free_bytes``:
    ``0.8 x free - 1 GiB`` divided by :func:`training_gib_per_image`."""
    if free_bytes < 0 or cap < 1:
        raise ConfigError(f"free memory ({free_bytes} bytes) must be >= 0 and the cap ({cap}) >= 1")
    usable = AUTO_BATCH_MEMORY_FRACTION * free_bytes / 2**30 - AUTO_BATCH_RESERVED_GIB
    fits = int(usable / training_gib_per_image(resolution, amp, memory_efficient))
    if fits < 1:
        return 1
    return min(cap, 2 ** int(math.log2(fits)))


def default_per_gpu_batch(
    resolution: int,
    device: str | torch.device,
    memory_efficient: bool = False,
    amp: torch.dtype | None | str = "auto",
    free_bytes: int | None = None,
) -> int:
    """The per-process batch limit when ``--batch-size`` is not given.

    On a GPU: :func:`batch_for_memory` of the device's free memory (``torch.cuda.mem_get_info``, or
    ``free_bytes``) with ``amp`` (a dtype, None for float32, or the ``--amp`` mode) and
    ``memory_efficient``. On the CPU: 16 up to 128 px, else 8.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SMALL if resolution <= 128 else CPU_BATCH_LARGE
    if isinstance(amp, str):
        amp = amp_dtype(device, amp)
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(resolution, free_bytes, amp, memory_efficient)


def describe_auto_batch(
    resolution: int, device: str | torch.device, amp: torch.dtype | None, memory_efficient: bool, batch: int
) -> str:
    """One log line saying how the automatic per-process batch limit ``batch`` was chosen."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"per-process batch limit {batch}: the CPU default at {resolution} px (--batch-size to change)"
    free, total = torch.cuda.mem_get_info(device)
    precision = str(amp).removeprefix("torch.") if amp is not None else "float32"
    checkpointing = ", memory_efficient" if memory_efficient else ""
    return (
        f"per-process batch limit {batch}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
        f"x {AUTO_BATCH_MEMORY_FRACTION} - {AUTO_BATCH_RESERVED_GIB:g} GiB, over an estimated "
        f"{training_gib_per_image(resolution, amp, memory_efficient):.3f} GiB per image at {resolution} px "
        f"({precision}{checkpointing}); a power of two, at most {AUTO_BATCH_CAP} (--batch-size to override)"
    )


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """DataLoader workers per process: the node's cores shared among its processes (at most 8) on a
    GPU; none on the CPU, where decoding tiny images in the main process is cheaper."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, local_world_size) - 1))


def epoch_augmentation(num_images: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training image's (rotation angle in degrees, horizontal flip) for one epoch."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(mixed)
    angles = (torch.rand(num_images, generator=generator) * 2 - 1) * MAX_ROTATION_DEGREES
    flips = torch.rand(num_images, generator=generator) < 0.5
    return angles, flips


def augment_batch(
    images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``[B, 1, R, R]`` on the device -> flipped, rotated, normalised float ``[B, 3, R, R]``.

    The same operations as :class:`cxrlib.transforms.BatchTransform` in training mode, with
    the draws given.
    """
    x = normalize(rotate_flip_batch(images.float().div_(255.0), angles, flips))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- arguments


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--index", required=True, type=Path, help="index.csv (python -m cxrlib.datasets)")
    data.add_argument("--folds", required=True, type=Path, help="folds.csv (python -m cxrlib.splits)")
    data.add_argument("--cache", required=True, type=Path, help="image cache folder (python -m cxrlib.cache)")
    data.add_argument("--cache-format", default="png", choices=("png", "jpg"), help="cache file format")
    data.add_argument("--resolution", required=True, type=int, help="image side in pixels (multiple of 32)")
    data.add_argument("--fold", required=True, type=int, help="fold number, 0 .. K-1")
    data.add_argument("--out", required=True, type=Path, help="this fold's run folder")
    data.add_argument("--max-train-images", type=int, default=None, help="use only the first N train images")
    data.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per process (default: auto)"
    )
    data.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images (each is reported by path)"
    )

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, default=100, help="maximum number of epochs (default 100)")
    recipe.add_argument(
        "--weights", default="imagenet", help="imagenet, none, or a local weights file (default imagenet)"
    )
    recipe.add_argument(
        "--batch-size", type=int, default=None, help="per-process batch (default: fits memory)"
    )
    recipe.add_argument(
        "--effective-batch", type=int, default=None, help="default: Table 1 for the resolution"
    )
    recipe.add_argument(
        "--lr", type=float, default=None, help="initial learning rate (default: Table 1 rule)"
    )
    recipe.add_argument("--patience-lr", type=int, default=3, help="ReduceLROnPlateau patience (default 3)")
    recipe.add_argument("--lr-factor", type=float, default=0.5, help="lr reduction factor (default 0.5)")
    recipe.add_argument(
        "--patience-stop", type=int, default=10, help="stop after N epochs without improvement (default 10)"
    )
    recipe.add_argument("--seed", type=int, default=0, help="seed for weights, order and augmentation")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    system.add_argument(
        "--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision"
    )
    system.add_argument(
        "--memory-efficient", action="store_true", help="gradient checkpointing in dense blocks"
    )
    system.add_argument(
        "--channels-last",
        default="auto",
        choices=("auto", "on", "off"),
        help="channels_last memory format (auto: on GPUs only; on pays on the CPU at small sizes)",
    )
    system.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    system.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    system.add_argument("--no-resume", action="store_true", help="start over, deleting this run's files")
    system.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    system.add_argument(
        "--skip-nonfinite-steps", action="store_true", help="skip an optimizer step whose loss is NaN/inf"
    )
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """One-line :class:`ConfigError` for a wrong parameter or a missing input, before any work."""
    if args.resolution < MIN_RESOLUTION or args.resolution % 32:
        raise ConfigError(
            f"--resolution {args.resolution}: must be a multiple of 32 and at least {MIN_RESOLUTION} "
            "(DenseNet121 reduces the image 32x)"
        )
    for name in ("epochs", "batch_size", "effective_batch", "max_train_images", "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    if args.patience_lr < 0 or args.patience_stop < 1 or not 0 < args.lr_factor < 1:
        raise ConfigError("--patience-lr >= 0, --patience-stop >= 1 and 0 < --lr-factor < 1 are required")
    for flag, path in (("--index", args.index), ("--folds", args.folds)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: file not found")
    if not args.cache.is_dir():
        raise ConfigError(
            f"--cache {args.cache}: folder not found; build it with python -m cxrlib.cache --index "
            f"{args.index} --resolutions {args.resolution} --format {args.cache_format} --out {args.cache}"
        )
    if args.weights not in WEIGHT_CHOICES and not Path(args.weights).is_file():
        raise ConfigError(f"--weights {args.weights}: not imagenet, none or an existing file")
    device = resolve_device(args.device)
    amp_dtype(device, args.amp)
    if args.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)")


def check_cached_images(frame: pd.DataFrame, cache: Path, resolution: int, fmt: str, index: Path) -> None:
    """:class:`ConfigError` naming the first needed cached image that is missing, and the command to build it.

    With a manifest (:func:`cxrlib.cache.check_cache`) an image counts when the manifest lists it and
    its file has the recorded size; without one (a cache written by other means) when its file exists.
    """
    if (cache / MANIFEST_NAME).is_file():
        missing = check_cache(frame, cache, resolution, fmt)
    else:
        ids = frame["dicom_id"].astype(str)
        missing = [d for d in ids if not cached_image_path(cache, resolution, d, fmt).is_file()]
    if missing:
        path = cached_image_path(cache, resolution, missing[0], fmt)
        raise ConfigError(
            f"cached image {path} (dicom_id {missing[0]}) is missing or incomplete ({len(missing)} of "
            f"{len(frame)} needed images); build the cache with: python -m cxrlib.cache --index {index} "
            f"--resolutions {resolution} --format {fmt} --out {cache}"
        )


def fold_frames(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """The fold's train / val / test rows of the index (index order), checked and cached."""
    try:
        index = read_index(args.index)
        folds = read_folds(args.folds, index)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    k = num_folds(folds)
    if not 0 <= args.fold < k:
        raise ConfigError(f"--fold {args.fold}: {args.folds} has folds 0 .. {k - 1}")
    frames = {}
    for role in ("train", "val", "test"):
        ids = set(fold_ids(folds, args.fold, role))
        frames[role] = index[index["dicom_id"].isin(ids)].reset_index(drop=True)
        if frames[role].empty:
            raise ConfigError(f"fold {args.fold} of {args.folds} has no {role} images")
    if args.max_train_images is not None:
        frames["train"] = frames["train"].iloc[: args.max_train_images].reset_index(drop=True)
    needed = pd.concat(list(frames.values()), ignore_index=True)
    check_cached_images(needed, args.cache, args.resolution, args.cache_format, args.index)
    return frames


# ----------------------------------------------------------------------------- state and helpers


class EarlyStopping:
    """Counts epochs without improvement of the validation loss; ``should_stop`` after ``patience``."""

    def __init__(self, patience: int = 10, threshold: float = 1e-4):
        self.patience, self.threshold = patience, threshold
        self.best, self.best_epoch, self.bad_epochs = math.inf, 0, 0

    def step(self, loss: float, epoch: int) -> bool:
        """Record one epoch's loss; True when it is an improvement (a new best)."""
        target = self.best * (1 - self.threshold) if math.isfinite(self.best) else self.best
        if loss < target:
            self.best, self.best_epoch, self.bad_epochs = float(loss), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclasses.dataclass
class Runtime:
    """What every step needs to know about this process and the run."""

    info: cxrdist.DistInfo
    amp: torch.dtype | None
    channels_last: bool
    plan: BatchPlan
    skip_nonfinite: bool
    show_progress: bool

    @property
    def device(self) -> torch.device:
        return self.info.device


def log(message: str) -> None:
    """Print on the main process only."""
    if cxrdist.is_main_process():
        print(f"[cxrlib.train] {message}", flush=True)


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


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's BatchNorm running statistics (DDP's own rule) before evaluating."""
    for buffer in model.buffers():
        cxrdist.broadcast_(buffer.data, src=0)


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def run_fingerprint(args: argparse.Namespace, effective_batch: int) -> dict:
    """The arguments a resumed run must share with the checkpoint it continues."""
    return {
        "resolution": args.resolution,
        "fold": args.fold,
        "index_sha256": sha256_file(args.index),
        "folds_sha256": sha256_file(args.folds),
        "seed": args.seed,
        "effective_batch": effective_batch,
        "weights": str(args.weights),
        "max_train_images": args.max_train_images,
    }


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    differ = [k for k in (*ESSENTIAL_KEYS, "max_train_images") if saved.get(k) != current.get(k)]
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
        raise ConfigError(
            f"{where} belongs to a run with other settings ({details}); use another --out, "
            "or --no-resume to start this run over"
        )


def jsonable_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def start_over(out: Path) -> None:
    """Delete this run's checkpoints and results (``--no-resume``)."""
    for _, path in list_checkpoints(out):
        sidecar_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    for name in (*RESULT_FILES, BEST_MODEL_NAME, f"{BEST_MODEL_NAME}.json"):
        (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out)


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rt: Runtime,
    epoch: int,
    augmentation: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """One pass over this process's share of the training images; returns the global train loss,
    image count, skipped steps and bad-image count."""
    model.train()
    device, world = rt.device, rt.info.world_size
    # on the device once per epoch, so no batch waits on a host-to-device copy of its draws
    angles, flips = (draws.to(device) for draws in augmentation)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, known labels, images (all processes)
    skipped_steps, group = 0, []
    progress = tqdm(
        total=len(loader),
        desc=f"epoch {epoch}",
        unit="batch",
        disable=not (rt.show_progress and rt.info.is_main),
        mininterval=1.0 if sys.stderr.isatty() else 10.0,
        leave=False,
    )

    def optimizer_step(group: list) -> None:
        nonlocal skipped_steps
        known = sum(batch[3].sum() for _, batch in group).to(device, torch.float64).reshape(1)
        known = cxrdist.all_reduce_sum(known).clamp_min(1.0)
        # Mean over the known labels of the whole effective batch; DDP divides gradients by `world`.
        scale = world / known
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite = torch.zeros(len(group), dtype=torch.float64, device=device)
        for j, (_, (positions, images, targets, masks)) in enumerate(group):
            last = j == len(group) - 1
            sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
            with sync or contextlib.nullcontext():
                where = positions.to(device, non_blocking=True)
                x = augment_batch(
                    images.to(device, non_blocking=True), angles[where], flips[where], rt.channels_last
                )
                with autocast(device, rt.amp):
                    logits = model(x)
                batch_loss = masked_bce_with_logits(
                    logits, targets.to(device, non_blocking=True), masks.to(device, non_blocking=True), "sum"
                )
                scaler.scale(batch_loss * scale.to(batch_loss.dtype)).backward()
            loss_sum += batch_loss.detach().double()
            nonfinite[j] = (~torch.isfinite(batch_loss.detach())).double()
        images_count = torch.tensor([sum(len(batch[0]) for _, batch in group)], device=device)
        # one all-reduce per step: loss sum, image count, and which micro-batches were not finite
        step = cxrdist.all_reduce_sum(
            torch.cat([loss_sum.reshape(1), images_count.double(), nonfinite])
        ).cpu()
        bad = torch.nonzero(step[2:]).flatten()
        if len(bad):
            batch_number = group[int(bad[0])][0]
            message = (
                f"non-finite training loss (NaN or inf) in epoch {epoch}, batch {batch_number} "
                f"(the optimizer step of batches {group[0][0]}-{group[-1][0]})"
            )
            if not rt.skip_nonfinite:
                raise NonFiniteLossError(
                    message + "; lower --lr, try --amp off, or pass --skip-nonfinite-steps"
                )
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            log(message + ": step skipped (--skip-nonfinite-steps)")
            return
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        totals[0] += step[0]
        totals[1] += known.cpu().item()
        totals[2] += step[1]

    for batch_number, batch in enumerate(loader, start=1):
        fault_point("train-batch", epoch=epoch, batch=batch_number, rank=rt.info.rank)
        progress.update(1)
        if batch is None:  # every image of this micro-batch was unreadable (--skip-bad-images)
            if world > 1:
                raise ImageReadError(
                    f"every image of batch {batch_number} (epoch {epoch}, rank {rt.info.rank}) is "
                    "unreadable; with several processes such a batch cannot be skipped: fix or rebuild "
                    "the cache"
                )
            continue
        group.append((batch_number, batch))
        if len(group) == rt.plan.accumulation_steps:
            optimizer_step(group)
            group = []
    if group:
        optimizer_step(group)
    progress.close()
    images = int(totals[2].item())
    expected = len(loader.sampler) * world
    return {
        "train_loss": float(totals[0] / totals[1]) if totals[1] > 0 else math.nan,
        "images": images,
        "skipped_steps": skipped_steps,
        "bad_images": max(0, expected - images) if not skipped_steps else None,
    }


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader, rt: Runtime) -> float:
    """Masked BCE over every known validation label of all processes (summed, counted, all-reduced)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for batch in loader:
        if batch is None:
            continue
        _, images, targets, masks = batch
        with autocast(rt.device, rt.amp):
            logits = model(model_input(images.to(rt.device, non_blocking=True), rt.channels_last))
        masks = masks.to(rt.device, non_blocking=True)
        targets = targets.to(rt.device, non_blocking=True)
        totals[0] += masked_bce_with_logits(logits, targets, masks, "sum").double()
        totals[1] += masks.sum().double()
    cxrdist.all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


class StepBlockSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch with ``set_epoch``) that deals each optimizer step's
    images to the processes in contiguous blocks.

    Step ``s`` takes the next ``per_gpu_batch x accumulation_steps x world`` images of the epoch's
    permutation; process ``r`` gets the ``r``-th block of them. One process with ``world`` times the
    accumulation steps therefore sees exactly the same micro-batches in the same steps, so
    BatchNorm normalises the same groups of images and the runs agree to float precision. The
    last, partial step is split evenly, padded by repetition as DistributedSampler pads.
    """

    def __init__(
        self, dataset, num_replicas: int, rank: int, per_gpu_batch: int, accumulation_steps: int, seed: int
    ):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=False)
        self.block = per_gpu_batch * accumulation_steps
        step_size = self.block * num_replicas
        full, rest = divmod(len(dataset), step_size)
        self.num_samples = full * self.block + math.ceil(rest / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        step_size = self.block * self.num_replicas
        mine: list[int] = []
        for start in range(0, len(order), step_size):
            step = order[start : start + step_size]
            share = math.ceil(len(step) / self.num_replicas)
            step += (step * share)[: share * self.num_replicas - len(step)]
            mine += step[self.rank * share : (self.rank + 1) * share]
        return iter(mine)


def shard(n: int, rank: int, world: int) -> list[int]:
    """Positions ``rank, rank + world, ...`` of ``n`` items: an unpadded share for evaluation."""
    return list(range(rank, n, world))


def make_loader(
    dataset, batch_size: int, sampler, workers: int, device: torch.device, seed: int
) -> DataLoader:
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )


def write_predictions(
    model: nn.Module, frame: pd.DataFrame, args, rt: Runtime, workers: int, path: Path
) -> None:
    """Best model's logits for ``frame``'s images: each process scores its share, rank 0 writes."""
    dataset = CXRDataset(
        frame,
        args.resolution,
        args.cache,
        cache_format=args.cache_format,
        skip_bad_images=args.skip_bad_images,
    )
    positions = shard(len(dataset), rt.info.rank, rt.info.world_size)
    local = torch.utils.data.Subset(dataset, positions)
    local_pos, logits = predict_arrays(
        model, local, 2 * rt.plan.per_gpu_batch, rt.device, rt.amp, workers, rt.channels_last
    )
    global_pos = torch.as_tensor(np.asarray(positions, dtype=np.int64)[local_pos], device=rt.device)
    gathered_pos = cxrdist.all_gather_tensors(global_pos)
    gathered_logits = cxrdist.all_gather_tensors(torch.as_tensor(logits, device=rt.device))
    if rt.info.is_main:
        table = logits_frame(
            frame["dicom_id"].tolist(),
            torch.cat(gathered_pos).cpu().numpy(),
            torch.cat(gathered_logits).cpu().numpy(),
        )
        write_csv_atomic(table, path)


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    """Train one fold at one resolution (see module docs); returns the summary written to done.json.

    Raises :class:`ConfigError`, :class:`NonFiniteLossError`, :class:`CheckpointError`,
    :class:`cxrlib.datasets.ImageReadError`, :class:`cxrlib.models.WeightsUnavailableError` or
    :class:`cxrlib.fileio.FolderBusyError` (another run is writing the same ``--out``).
    """
    validate_args(args)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    frames = fold_frames(args)
    try:
        info = cxrdist.init_distributed(None if args.device == "auto" else args.device)
    except cxrdist.DeviceError as error:
        raise ConfigError(str(error)) from error
    try:
        with run_folder_lock(args.out, info.is_main), algorithm_settings(args.deterministic):
            return _train(args, frames, info)
    finally:
        cxrdist.cleanup()


@contextlib.contextmanager
def run_folder_lock(out: Path, is_main: bool):
    """Rank 0 holds `out`'s lock for the run, so a second run on the same folder is refused
    instead of mixing its checkpoints with the first one's. Raises :class:`FolderBusyError`."""
    if not is_main:
        yield
        return
    try:
        with exclusive_lock(out / LOCK_NAME):
            yield
    except FolderBusyError as holder:
        raise FolderBusyError(
            f"another training run is writing {out} ({holder}); wait for it to finish or stop it, "
            f"or give this one another --out"
        ) from None


@contextlib.contextmanager
def algorithm_settings(deterministic: bool):
    """Deterministic algorithms (or cuDNN autotuning) for the run; the caller's settings afterwards."""
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    cudnn.benchmark, cudnn.deterministic = not deterministic, deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no such variant
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]


def _train(args: argparse.Namespace, frames: dict[str, pd.DataFrame], info: cxrdist.DistInfo) -> dict:
    out, device = args.out, info.device
    started = time.time()
    effective = args.effective_batch or default_effective_batch(args.resolution)
    requested_lr = args.lr if args.lr is not None else default_lr(args.resolution, args.effective_batch)
    amp = amp_dtype(device, args.amp)
    max_batch = args.batch_size or default_per_gpu_batch(args.resolution, device, args.memory_efficient, amp)
    plan = plan_batches(effective, info.world_size, args.batch_size, max_per_gpu=max_batch)
    lr = requested_lr * plan.lr_scale  # linear scaling when the batch cannot be met exactly
    fingerprint = run_fingerprint(args, effective)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())
    workers = args.workers if args.workers is not None else default_workers(device, local_world)
    channels_last = use_channels_last(device, args.channels_last)
    rt = Runtime(info, amp, channels_last, plan, args.skip_nonfinite_steps, True)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.no_resume:
            start_over(out)
        remove_stale_temporaries(out)
    cxrdist.barrier()
    done_file = out / "done.json"
    if done_file.is_file() and not args.no_resume:
        done = json.loads(done_file.read_text())
        check_fingerprint(done.get("fingerprint", {}), fingerprint, done_file)
        if done.get("stopped_early") or done.get("epochs_run", 0) >= args.epochs:
            log(f"{out} is already complete ({done.get('reason')}); nothing to do (--no-resume to redo)")
            return done
        log(f"{done_file}: continuing to {args.epochs} epochs")
        cxrdist.barrier()
        if info.is_main:
            done_file.unlink()

    log(
        f"resolution {args.resolution}, fold {args.fold}: {len(frames['train'])} train / "
        f"{len(frames['val'])} val / {len(frames['test'])} test images; "
        f"{info.world_size} process(es) on {device.type} "
        f"({info.backend or 'no process group'}); amp {rt.amp or 'off'}; lr {lr:g}"
    )
    if args.batch_size is None:
        log(describe_auto_batch(args.resolution, device, amp, args.memory_efficient, max_batch))
    log(plan.describe())
    if not plan.exact:
        log(
            f"using effective batch {plan.effective_batch} instead of {effective}: lr {requested_lr:g} x "
            f"{plan.effective_batch}/{effective} = {lr:g}"
        )

    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    model = build_model(args.weights, memory_efficient=args.memory_efficient)
    if args.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=args.lr_factor, patience=args.patience_lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp == torch.float16)
    stopper = EarlyStopping(args.patience_stop)
    history: list[dict] = []
    start_epoch = 0

    if not args.no_resume:
        start_epoch, history = resume(out, model, optimizer, scheduler, scaler, stopper, fingerprint, info)
    ddp_model = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.distributed
        else model
    )

    common = {"resolution": args.resolution, "cache_dir": args.cache, "cache_format": args.cache_format}
    train_set = CXRDataset(frames["train"], skip_bad_images=args.skip_bad_images, **common)
    val_set = CXRDataset(frames["val"], skip_bad_images=args.skip_bad_images, **common)
    sampler = StepBlockSampler(
        train_set, info.world_size, info.rank, plan.per_gpu_batch, plan.accumulation_steps, args.seed
    )
    train_loader = make_loader(train_set, plan.per_gpu_batch, sampler, workers, device, args.seed)
    val_loader = make_loader(
        val_set,
        2 * plan.per_gpu_batch,
        shard(len(val_set), info.rank, info.world_size),
        workers,
        device,
        args.seed,
    )

    reason = "max_epochs"
    skipped_total = 0
    if stopper.should_stop:
        reason = "early_stop"
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if stopper.should_stop:
            break
        epoch_start = time.time()
        sampler.set_epoch(epoch)
        lr_used = optimizer.param_groups[0]["lr"]
        augmentation = epoch_augmentation(len(train_set), args.seed, epoch)
        result = train_one_epoch(ddp_model, train_loader, optimizer, scaler, rt, epoch, augmentation)
        train_seconds = time.time() - epoch_start
        skipped_total += result["skipped_steps"]
        if result["bad_images"]:
            log(f"epoch {epoch}: {result['bad_images']} unreadable image(s) skipped (see the warnings)")
        sync_buffers(model)
        val_loss = evaluate_loss(model, val_loader, rt)
        if not math.isfinite(val_loss):
            raise NonFiniteLossError(
                f"validation loss is {val_loss} after epoch {epoch}; the model is not saved as best "
                "(lower --lr or try --amp off)"
            )
        scheduler.step(val_loss)
        improved = stopper.step(val_loss, epoch)
        if improved and not all_finite(model):
            raise NonFiniteLossError(f"epoch {epoch}: the weights contain NaN/inf; not saved as best")
        history.append(
            {
                "epoch": epoch,
                "train_loss": result["train_loss"],
                "val_loss": val_loss,
                "lr": lr_used,
                "seconds": time.time() - epoch_start,
                "img_per_s": result["images"] / max(train_seconds, 1e-9),
            }
        )
        if info.is_main:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "early_stopping": stopper.state_dict(),
                "history": history,
                "rng": capture_rng_state(),
                "args": jsonable_args(args),
                "fingerprint": fingerprint,
                "batch_plan": dataclasses.asdict(plan),
                "version": __version__,
                "torch_version": str(torch.__version__),
            }
            save_checkpoint(state, out, epoch, args.keep_checkpoints, before_rename=_checkpoint_fault(epoch))
            if improved:
                save_verified(
                    model.state_dict(), out / BEST_MODEL_NAME, {"epoch": epoch, "val_loss": val_loss}
                )
            write_csv_atomic(pd.DataFrame(history), out / "history.csv")
        cxrdist.barrier()  # nobody starts the next epoch before this one's checkpoint is complete
        log(
            f"epoch {epoch}: train_loss {result['train_loss']:.4f} val_loss {val_loss:.4f} lr {lr_used:.3g} "
            f"{history[-1]['img_per_s']:.1f} img/s {history[-1]['seconds']:.1f} s"
            + (" (best)" if improved else f" ({stopper.bad_epochs} without improvement)")
        )
        if stopper.should_stop:
            reason = "early_stop"
            log(
                f"early stop: no improvement for {stopper.bad_epochs} epochs "
                f"(best epoch {stopper.best_epoch})"
            )

    cxrdist.barrier()
    best = load_verified(out / BEST_MODEL_NAME, map_location=device)
    model.load_state_dict(best)
    for role in ("val", "test"):
        write_predictions(model, frames[role], args, rt, workers, out / f"{role}_predictions.csv")
    summary = {
        "complete": True,
        "reason": reason,
        "stopped_early": reason == "early_stop",
        "epochs_run": len(history),
        "best_epoch": stopper.best_epoch,
        "best_val_loss": stopper.best,
        "skipped_nonfinite_steps": skipped_total,
        "batch_plan": {**dataclasses.asdict(plan), "effective_batch": plan.effective_batch},
        "lr": lr,
        "lr_requested": requested_lr,
        "lr_scale": plan.lr_scale,
        "world_size": info.world_size,
        "device": str(device),
        "seconds": time.time() - started,
        "fingerprint": fingerprint,
        "args": jsonable_args(args),
        "version": __version__,
    }
    if info.is_main:
        write_text_atomic(json.dumps(summary, indent=1), done_file)
        log(f"done: best epoch {stopper.best_epoch}, val_loss {stopper.best:.4f}; files in {out}")
    cxrdist.barrier()
    return summary


def _checkpoint_fault(epoch: int):
    return lambda _tmp: fault_point("checkpoint-rename", epoch=epoch)


def resume(out, model, optimizer, scheduler, scaler, stopper, fingerprint, info) -> tuple[int, list[dict]]:
    """Load the newest good checkpoint (chosen by rank 0) into every object; (epoch, history)."""
    chosen = torch.zeros(1, dtype=torch.int64, device=info.device)
    found = None
    if info.is_main:
        found = load_latest_checkpoint(out, map_location="cpu")
        chosen[0] = found[0]["epoch"] if found else 0
    cxrdist.broadcast_(chosen, src=0)
    epoch = int(chosen.item())
    if epoch == 0:
        return 0, []
    if not info.is_main:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = load_latest_checkpoint(out, map_location="cpu", max_epoch=epoch)
    state, path = found
    if state["epoch"] != epoch:
        raise CheckpointError(
            f"rank {info.rank} read {path} (epoch {state['epoch']}), rank 0 chose epoch {epoch}"
        )
    check_fingerprint(state.get("fingerprint", {}), fingerprint, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16
        scaler.load_state_dict(state["scaler"])
    stopper.load_state_dict(state["early_stopping"])
    restore_rng_state(state["rng"])
    cxrdist.barrier()
    if info.is_main:
        for newer_epoch, newer in list_checkpoints(out):
            if newer_epoch > epoch:  # failed verification above: remove so it never shadows a good one
                sidecar_path(newer).unlink(missing_ok=True)
                newer.unlink(missing_ok=True)
        repair_best_model(out, state, model)
        write_csv_atomic(pd.DataFrame(state["history"]), out / "history.csv")
    log(f"resumed from {path.name} (epoch {epoch}, best epoch {stopper.best_epoch})")
    return epoch, list(state["history"])


def repair_best_model(out: Path, state: dict, model: nn.Module) -> None:
    """Rewrite best_model.pt from the checkpoint when a kill came between the two writes."""
    best_epoch = state["early_stopping"]["best_epoch"]
    side = sidecar_path(out / BEST_MODEL_NAME)
    recorded = json.loads(side.read_text()).get("epoch") if side.is_file() else None
    if recorded == best_epoch:
        return
    if best_epoch == state["epoch"]:
        save_verified(model.state_dict(), out / BEST_MODEL_NAME, {"epoch": best_epoch})
    else:
        warnings.warn(
            f"{out / BEST_MODEL_NAME} is from epoch {recorded}, the checkpoint's best is epoch {best_epoch}",
            stacklevel=2,
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (
        ConfigError,
        NonFiniteLossError,
        CheckpointError,
        ImageReadError,
        WeightsUnavailableError,
        FolderBusyError,
    ) as error:
        if cxrdist.env_ranks()[0] == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, ConfigError) else 1
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        if cxrdist.env_ranks()[0] == 0:
            print(
                f"error: {error}; the checkpoints written before are kept: fix this (e.g. free disk "
                "space) and run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
