"""What the trainer feeds the model: the fold's images, the sampler, the loaders and the augmentation draws.

* :func:`validate_args` and :func:`fold_frames`: the trainer's parameters and input files checked
  before any work, and the fold's train / val / test rows of the index, checked against the folds
  and the cache (one-line :class:`cxrlib.runtime.ConfigError` naming what is missing).
* :class:`StepBlockSampler`: a DistributedSampler that deals each optimizer step's images to the
  processes in contiguous blocks, so N processes and one process with N times the accumulation
  train identically; :func:`shard` splits evaluation images without padding.
* :func:`make_loader`: DataLoader workers only decode cached uint8 images; pinned memory, persistent
  workers and prefetching on GPUs (:func:`default_workers`, :func:`prefetch_batches`).
* :func:`epoch_augmentation` / :func:`augment_batch`: each image's flip and rotation angle for an
  epoch, drawn from ``(seed, epoch)`` and applied on the device in batches, so the draws do not
  depend on the number of processes, the batch size or a resume.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .cache import MANIFEST_NAME, CXRDataset, cached_image_path, check_cache, collate_skip_none
from .index import read_index
from .models import WEIGHT_CHOICES
from .recipe import MIN_RESOLUTION
from .runtime import ConfigError, amp_dtype, resolve_device
from .splits import fold_ids, num_folds, read_folds
from .transforms import MAX_ROTATION_DEGREES, normalize, rotate_flip_batch

PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead, at most
LOADER_SHARED_BYTES = 2**30  # of shared memory one loader's prepared batches may hold, per process


class IndexedDataset(Dataset):
    """Wraps a dataset so each item starts with its position: ``(i, image, target, mask)``.

    Items the wrapped dataset returns as ``None`` (skipped bad images) stay ``None``, so
    :func:`cxrlib.cache.collate_skip_none` drops them and the positions say which are left.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, *item)


def validate_args(args: argparse.Namespace) -> None:
    """One-line :class:`ConfigError` for a wrong parameter or a missing input, before any work."""
    if args.resolution < MIN_RESOLUTION or args.resolution % 32:
        raise ConfigError(
            f"--resolution {args.resolution}: must be a multiple of 32 and at least {MIN_RESOLUTION} "
            "(DenseNet121 reduces the image 32x)"
        )
    if args.tiles < 1 or args.resolution % (32 * args.tiles):
        raise ConfigError(
            f"--tiles {args.tiles}: the {args.resolution} px image must split into tiles whose side is a "
            "multiple of 32 (resolution divisible by 32 x tiles)"
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
    dataset, batch_size: int, sampler, workers: int, device: torch.device, seed: int, persistent: bool = True
) -> DataLoader:
    """The trainer's DataLoader: ``workers`` decode, prepare :func:`prefetch_batches` batches each
    ahead and stay between epochs (``persistent``); batches are pinned for a GPU."""
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=prefetch_batches(workers, batch_size, dataset.resolution) if workers > 0 else None,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )


def default_workers(device: torch.device, local_world_size: int | None = None) -> int:
    """DataLoader workers per process: on a GPU the node's cores shared among its processes, less one
    for the process itself, at least 2 where its share allows and at most 8; none on the CPU, where
    decoding tiny images in the main process is cheaper. The processes of this node:
    ``local_world_size``, else torchrun's ``LOCAL_WORLD_SIZE``, else one per GPU."""
    if device.type != "cuda":
        return 0
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, local_world_size))
    return max(min(2, share), min(8, share - 1))


def prefetch_batches(workers: int, batch_size: int, resolution: int) -> int:
    """Batches each worker prepares ahead: 4, or fewer (at least 1) where the uint8 batches of all
    ``workers`` would hold more than :data:`LOADER_SHARED_BYTES` of shared memory (large images)."""
    batch_bytes = batch_size * int(resolution) ** 2
    return max(1, min(PREFETCH_BATCHES, LOADER_SHARED_BYTES // max(1, workers * batch_bytes)))


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


def training_loaders(
    frames: dict[str, pd.DataFrame], args: argparse.Namespace, info, plan, workers: int
) -> tuple[DataLoader, DataLoader]:
    """The training loader (a :class:`StepBlockSampler`, ``set_epoch`` per epoch) and this process's
    unpadded share of the validation images (twice the batch: no gradients), whose workers end after
    each validation, so that the two loaders' batches never hold shared memory at once."""
    common = {"resolution": args.resolution, "cache_dir": args.cache, "cache_format": args.cache_format}
    train_set = CXRDataset(frames["train"], skip_bad_images=args.skip_bad_images, **common)
    val_set = CXRDataset(frames["val"], skip_bad_images=args.skip_bad_images, **common)
    batch, steps = plan.per_gpu_batch, plan.accumulation_steps
    sampler = StepBlockSampler(train_set, info.world_size, info.rank, batch, steps, args.seed)
    train_loader = make_loader(train_set, batch, sampler, workers, info.device, args.seed)
    val_share = shard(len(val_set), info.rank, info.world_size)
    val_loader = make_loader(val_set, 2 * batch, val_share, workers, info.device, args.seed, persistent=False)
    return train_loader, val_loader
