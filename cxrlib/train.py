"""Train DenseNet121 on one fold at one resolution, the paper's recipe, one process or torchrun DDP:
``python -m cxrlib.train --index I --folds F --cache C --resolution R --fold K --out D`` (docs/training.md)"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import __version__, models
from . import dist as cxrdist
from .cache import MANIFEST_NAME, CXRDataset, ImageReadError, cached_image_path, check_cache
from .fileio import CheckpointError, ConfigError, FolderBusyError
from .index import index_findings, read_index
from .labels import masked_bce_with_logits
from .recipe import MIN_RESOLUTION, BatchPlan, optimization, plan_training
from .run_folder import RunFolder, jsonable_args, log, run_fingerprint, run_folder_lock
from .splits import fold_ids, num_folds, read_folds

WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # one-line errors, no traceback
KEPT = "; the checkpoints are kept: fix this (e.g. free disk space) and run the same command again to resume"
MAX_ROTATION_DEGREES = 15.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


@dataclasses.dataclass
class Runtime:
    """What every step needs to know about this process and the run."""

    info: cxrdist.DistInfo
    amp: torch.dtype | None
    channels_last: bool
    plan: BatchPlan
    skip_nonfinite: bool
    show_progress: bool
    workers: int = 0  # DataLoader workers per process

    @property
    def device(self) -> torch.device:
        return self.info.device


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data").add_argument
    data("--index", required=True, type=Path, help="index.csv (python -m cxrlib.datasets)")
    data("--folds", required=True, type=Path, help="folds.csv (python -m cxrlib.splits)")
    data("--cache", required=True, type=Path, help="image cache folder (python -m cxrlib.cache)")
    data("--cache-format", default="png", choices=("png", "jpg"), help="cache file format")
    data("--resolution", required=True, type=int, help="image side in pixels (multiple of 32)")
    data("--fold", required=True, type=int, help="fold number, 0 .. K-1")
    data("--out", required=True, type=Path, help="this fold's run folder")
    data("--max-train-images", type=int, default=None, help="use only the first N train images")
    data("--workers", type=int, default=None, help="DataLoader workers per process (default: auto)")
    data("--skip-bad-images", action="store_true", help="skip unreadable images (each is reported)")
    recipe = parser.add_argument_group("recipe").add_argument
    recipe("--epochs", type=int, default=100, help="maximum number of epochs (default 100)")
    recipe("--weights", default="imagenet", help="imagenet, none, or a local weights file")
    recipe("--batch-size", type=int, default=None, help="per-process batch (default: fits memory)")
    recipe("--effective-batch", type=int, default=None, help="default: Table 1 for the resolution")
    recipe("--lr", type=float, default=None, help="initial learning rate (default: Table 1 rule)")
    recipe("--patience-lr", type=int, default=3, help="ReduceLROnPlateau patience (default 3)")
    recipe("--lr-factor", type=float, default=0.5, help="lr reduction factor (default 0.5)")
    recipe("--patience-stop", type=int, default=10, help="stop after N epochs without improvement")
    recipe("--seed", type=int, default=0, help="seed for weights, order and augmentation")
    recipe("--global-context", action="store_true", help="a global context block after dense block 3")
    system = parser.add_argument_group("system").add_argument
    system("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    system("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision")
    system("--memory-efficient", action="store_true", help="gradient checkpointing in dense blocks")
    system("--channels-last", default="auto", choices=("auto", "on", "off"), help="auto: on GPUs only")
    system("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    system("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    system("--no-cudnn-benchmark", action="store_true", help="no cuDNN autotuning (saves its start-up)")
    system("--no-resume", action="store_true", help="start over, deleting this run's files")
    system("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    system("--skip-nonfinite-steps", action="store_true", help="skip an optimizer step whose loss is NaN/inf")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """One-line :class:`ConfigError` for a wrong parameter or a missing input, before any work."""
    r = args.resolution
    if r < MIN_RESOLUTION or r % 32:
        raise ConfigError(
            f"--resolution {r}: must be a multiple of 32 and at least {MIN_RESOLUTION} (DenseNet121 reduces "
            "the image 32x)"
        )
    least = {"epochs": 1, "batch_size": 1, "effective_batch": 1, "max_train_images": 1, "keep_checkpoints": 1}
    for name, low in {**least, "patience_stop": 1, "patience_lr": 0, "workers": 0}.items():
        if (value := getattr(args, name)) is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if (args.lr is not None and not args.lr > 0) or not 0 < args.lr_factor < 1:
        raise ConfigError(f"--lr ({args.lr}) must be positive and --lr-factor ({args.lr_factor}) in (0, 1)")
    for flag, path in (("--index", args.index), ("--folds", args.folds)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: file not found")
    if not args.cache.is_dir():
        raise ConfigError(f"--cache {args.cache}: folder not found; build it with {_cache_command(args)}")
    if args.weights not in models.WEIGHT_CHOICES and not Path(args.weights).is_file():
        raise ConfigError(f"--weights {args.weights}: not imagenet, none or an existing file")
    device = models.resolve_device(args.device)
    models.amp_dtype(device, args.amp)
    if args.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)")


def _cache_command(args: argparse.Namespace) -> str:
    return (
        f"python -m cxrlib.cache --index {args.index} --resolutions {args.resolution} "
        f"--format {args.cache_format} --out {args.cache}"
    )


def fold_frames(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """The fold's train / val / test rows of the index (index order), each image checked in the cache."""
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
    frames["train"] = frames["train"].iloc[: args.max_train_images].reset_index(drop=True)  # None: all
    needed, cache, fmt = pd.concat(list(frames.values()), ignore_index=True), args.cache, args.cache_format
    if (cache / MANIFEST_NAME).is_file():
        missing = check_cache(needed, cache, args.resolution, fmt)
    else:
        ids = needed["dicom_id"].astype(str)
        missing = [d for d in ids if not cached_image_path(cache, args.resolution, d, fmt).is_file()]
    if missing:
        raise ConfigError(
            f"cached image {cached_image_path(cache, args.resolution, missing[0], fmt)} (dicom_id "
            f"{missing[0]}) is missing or incomplete ({len(missing)} of {len(needed)} needed images); "
            f"build the cache with: {_cache_command(args)}"
        )
    return frames


class StepBlockSampler(DistributedSampler):
    """DistributedSampler dealing each optimizer step's images in blocks (docs/training.md)."""

    def __init__(
        self, dataset, num_replicas: int, rank: int, per_gpu_batch: int, accumulation_steps: int, seed: int
    ):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=False)
        self.block = per_gpu_batch * accumulation_steps
        full, rest = divmod(len(dataset), self.block * num_replicas)
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


def training_loaders(
    frames: dict[str, pd.DataFrame], args: argparse.Namespace, info, plan, workers: int
) -> tuple[DataLoader, DataLoader]:
    """The training loader and this process's share of the validation images (twice the batch)."""
    common = {"resolution": args.resolution, "cache_dir": args.cache, "cache_format": args.cache_format}
    train_set = CXRDataset(frames["train"], skip_bad_images=args.skip_bad_images, **common)
    val_set = CXRDataset(frames["val"], skip_bad_images=args.skip_bad_images, **common)
    batch, steps = plan.per_gpu_batch, plan.accumulation_steps
    sampler = StepBlockSampler(train_set, info.world_size, info.rank, batch, steps, args.seed)
    train_loader = models.make_loader(train_set, batch, sampler, workers, info.device, args.seed)
    val_share = list(range(info.rank, len(val_set), info.world_size))
    val_loader = models.make_loader(
        val_set, 2 * batch, val_share, workers, info.device, args.seed, persistent=False
    )
    return train_loader, val_loader


def epoch_augmentation(num_images: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training image's (rotation in degrees, horizontal flip) for an epoch, from (seed, epoch)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(mixed)
    angles = (torch.rand(num_images, generator=generator) * 2 - 1) * MAX_ROTATION_DEGREES
    flips = torch.rand(num_images, generator=generator) < 0.5
    return angles, flips


def rotate_flip_batch(images: torch.Tensor, angles_deg: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """torchvision's ``hflip`` (where ``flips``) then ``rotate(angle, BILINEAR, fill=0)``, batched."""
    batch, _, height, width = images.shape
    angles = angles_deg.to(images.device, torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(angles), torch.sin(angles)
    sign = torch.where(flips.to(images.device), -1.0, 1.0)
    aspect = height / width
    # Output pixel -> input pixel in normalised coordinates (x right, y down):
    # inverse rotation, then the flip (x -> -x) applied before the rotation.
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = sign * cos
    theta[:, 0, 1] = -sign * sin * aspect
    theta[:, 1, 0] = sin / aspect
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    # A ones channel sampled alongside gives torchvision's border weighting for the black fill.
    with_mask = torch.cat([images.float(), images.new_ones(batch, 1, height, width, dtype=torch.float32)], 1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


def augment_batch(
    images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``[B, 1, R, R]`` on the device -> flipped, rotated, normalised float ``[B, 3, R, R]``."""
    return models.model_input(rotate_flip_batch(images.float().div_(255.0), angles, flips), channels_last)


def optimizer_step(model, group: list, optimizer, scaler, rt: Runtime, epoch: int, draws, totals) -> bool:
    """One optimizer step over ``group``'s micro-batches; True when skipped (non-finite loss)."""
    device, (angles, flips) = rt.device, draws
    known = sum(batch[3].sum() for _, batch in group).to(device, torch.float64).reshape(1)
    known = cxrdist.all_reduce_sum(known).clamp_min(1.0)
    scale = rt.info.world_size / known
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
            with models.autocast(device, rt.amp):
                logits = model(x)
            targets, masks = targets.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            batch_loss = masked_bce_with_logits(logits, targets, masks, "sum")
            scaler.scale(batch_loss * scale.to(batch_loss.dtype)).backward()
        loss_sum += batch_loss.detach().double()
        nonfinite[j] = (~torch.isfinite(batch_loss.detach())).double()
    images_count = torch.tensor([sum(len(batch[0]) for _, batch in group)], device=device)
    # one all-reduce per step: loss sum, image count, and which micro-batches were not finite
    step = cxrdist.all_reduce_sum(torch.cat([loss_sum.reshape(1), images_count.double(), nonfinite])).cpu()
    bad = torch.nonzero(step[2:]).flatten()
    if len(bad):
        message = (
            f"non-finite training loss (NaN or inf) in epoch {epoch}, batch {group[int(bad[0])][0]} "
            f"(the optimizer step of batches {group[0][0]}-{group[-1][0]})"
        )
        if not rt.skip_nonfinite:
            raise NonFiniteLossError(message + "; lower --lr, try --amp off, or pass --skip-nonfinite-steps")
        optimizer.zero_grad(set_to_none=True)
        log(message + ": step skipped (--skip-nonfinite-steps)")
        return True
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    totals += torch.stack([step[0], known.cpu()[0], step[1]])
    return False


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rt: Runtime,
    epoch: int,
    augmentation: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """One pass over this process's training images: global loss, images, skipped steps, bad images."""
    model.train()
    # on the device once per epoch, so no batch waits on a host-to-device copy of its draws
    draws = tuple(d.to(rt.device) for d in augmentation)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, known labels, images (all processes)
    skipped, group = 0, []
    shown = rt.show_progress and rt.info.is_main
    interval = 1.0 if sys.stderr.isatty() else 10.0
    progress = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", disable=not shown,
                    mininterval=interval, leave=False)  # fmt: skip
    for batch_number, batch in enumerate(loader, start=1):
        progress.update(1)
        if batch is None:  # every image of this micro-batch was unreadable (--skip-bad-images)
            if rt.info.world_size > 1:
                raise ImageReadError(
                    f"every image of batch {batch_number} (epoch {epoch}, rank {rt.info.rank}) is unreadable;"
                    " with several processes such a batch cannot be skipped: fix or rebuild the cache"
                )
            continue
        group.append((batch_number, batch))
        if len(group) == rt.plan.accumulation_steps:
            skipped += optimizer_step(model, group, optimizer, scaler, rt, epoch, draws, totals)
            group = []
    if group:
        skipped += optimizer_step(model, group, optimizer, scaler, rt, epoch, draws, totals)
    progress.close()
    images = int(totals[2].item())
    expected = len(loader.sampler) * rt.info.world_size
    return {
        "train_loss": float(totals[0] / totals[1]) if totals[1] > 0 else math.nan,
        "images": images,
        "skipped_steps": skipped,
        "bad_images": max(0, expected - images) if not skipped else None,
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
        with models.autocast(rt.device, rt.amp):
            logits = model(models.model_input(images.to(rt.device, non_blocking=True), rt.channels_last))
        targets, masks = targets.to(rt.device, non_blocking=True), masks.to(rt.device, non_blocking=True)
        totals[0] += masked_bce_with_logits(logits, targets, masks, "sum").double()
        totals[1] += masks.sum().double()
    cxrdist.all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def run(args: argparse.Namespace) -> dict:
    """Train one fold at one resolution; returns the summary written to done.json."""
    validate_args(args)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    frames = fold_frames(args)
    info = cxrdist.init_distributed(None if args.device == "auto" else args.device)
    try:
        settings = models.algorithm_settings(args.deterministic, benchmark=not args.no_cudnn_benchmark)
        with run_folder_lock(args.out, info.is_main), settings:
            return train(args, frames, info)
    finally:
        if cxrdist.is_dist():
            torch.distributed.destroy_process_group()


def train(args: argparse.Namespace, frames: dict[str, pd.DataFrame], info: cxrdist.DistInfo) -> dict:
    """One fold at one resolution, from setup (or resume) through the epochs to done.json."""
    started, device = time.time(), info.device
    amp = models.amp_dtype(device, args.amp)
    schedule = plan_training(args, info.world_size, device, amp)
    workers = args.workers if args.workers is not None else models.default_workers(device)
    channels_last = models.use_channels_last(device, args.channels_last)
    rt = Runtime(info, amp, channels_last, schedule.batches, args.skip_nonfinite_steps, True, workers)
    folder = RunFolder(args.out, info.is_main, run_fingerprint(args, rt.plan.requested_effective_batch))
    folder.prepare(start_over=args.no_resume)
    if not args.no_resume and (done := folder.finished(args.epochs)) is not None:
        return done
    log(
        f"resolution {args.resolution}, fold {args.fold}: {len(frames['train'])} train / "
        f"{len(frames['val'])} val / {len(frames['test'])} test images; {info.world_size} process(es) on "
        f"{device.type} ({info.backend or 'no process group'}); amp {amp or 'off'}; lr {schedule.lr:g}"
    )
    for line in schedule.describe():
        log(line)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    num_classes = len(index_findings(frames["train"]))  # the head: one output per finding of the index
    model = models.build_model(args.weights, num_classes, args.memory_efficient, args.global_context)
    if args.sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer, scheduler, stopper = optimization(model, schedule.lr, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    objects = (model, optimizer, scheduler, scaler, stopper)
    start_epoch, history = (0, []) if args.no_resume else folder.resume(*objects, info)
    loaders = training_loaders(frames, args, info, rt.plan, workers)
    skipped = fit(args, rt, folder, objects, loaders, start_epoch, history)

    folder.load_best(model, device)
    for split in ("val", "test"):
        folder.write_predictions(model, frames[split], split, args, rt)
    plan, reason = rt.plan, "early_stop" if stopper.should_stop else "max_epochs"
    summary = {
        "complete": True, "reason": reason, "stopped_early": reason == "early_stop",
        "epochs_run": len(history), "best_epoch": stopper.best_epoch, "best_val_loss": stopper.best,
        "skipped_nonfinite_steps": skipped,
        "batch_plan": {**dataclasses.asdict(plan), "effective_batch": plan.effective_batch},
        "lr": schedule.lr, "lr_requested": schedule.requested_lr, "lr_scale": plan.lr_scale,
        "world_size": info.world_size, "device": str(device), "seconds": time.time() - started,
        "fingerprint": folder.fingerprint, "args": jsonable_args(args), "version": __version__,
    }  # fmt: skip
    log(f"done: best epoch {stopper.best_epoch}, val_loss {stopper.best:.4f}; files in {args.out}")
    folder.write_done(summary)
    return summary


def fit(args, rt: Runtime, folder: RunFolder, objects, loaders, start_epoch: int, history: list[dict]) -> int:
    """The epochs after ``start_epoch`` until ``--epochs`` or early stopping; returns the skipped steps."""
    model, optimizer, scheduler, scaler, stopper = objects
    (train_loader, val_loader), info = loaders, rt.info
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    ddp_model = DistributedDataParallel(model, device_ids=device_ids) if info.world_size > 1 else model
    skipped = 0
    for epoch in range(start_epoch + 1, args.epochs + 1):
        if stopper.should_stop:
            break
        epoch_start = time.time()
        train_loader.sampler.set_epoch(epoch)
        lr_used = optimizer.param_groups[0]["lr"]
        augmentation = epoch_augmentation(len(train_loader.dataset), args.seed, epoch)
        result = train_one_epoch(ddp_model, train_loader, optimizer, scaler, rt, epoch, augmentation)
        train_seconds = time.time() - epoch_start
        skipped += result["skipped_steps"]
        if result["bad_images"]:
            log(f"epoch {epoch}: {result['bad_images']} unreadable image(s) skipped (see the warnings)")
        if info.world_size > 1:  # rank 0's BatchNorm statistics, as DDP uses them
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        val_loss = evaluate_loss(model, val_loader, rt)
        if not math.isfinite(val_loss):
            raise NonFiniteLossError(
                f"validation loss {val_loss} after epoch {epoch}, not saved as best (lower --lr or --amp off)"
            )
        scheduler.step(val_loss)
        improved = stopper.step(val_loss, epoch)
        weights = (p for p in model.state_dict().values() if p.is_floating_point())
        if improved and not all(bool(torch.isfinite(p).all()) for p in weights):
            raise NonFiniteLossError(f"epoch {epoch}: the weights contain NaN/inf; not saved as best")
        history.append({
            "epoch": epoch, "train_loss": result["train_loss"], "val_loss": val_loss, "lr": lr_used,
            "seconds": time.time() - epoch_start, "img_per_s": result["images"] / max(train_seconds, 1e-9),
        })  # fmt: skip
        folder.save_epoch(objects, history, args, rt.plan, improved)
        log(
            f"epoch {epoch}: train_loss {result['train_loss']:.4f} val_loss {val_loss:.4f} lr {lr_used:.3g} "
            f"{history[-1]['img_per_s']:.1f} img/s {history[-1]['seconds']:.1f} s"
            + (" (best)" if improved else f" ({stopper.bad_epochs} without improvement)")
        )
        if stopper.should_stop:
            log(f"early stop: {stopper.bad_epochs} epochs without improvement (best {stopper.best_epoch})")
    return skipped


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrlib.train``: train, and turn every expected failure into one line (exit 1 or 2)."""
    errors = (ConfigError, NonFiniteLossError, CheckpointError, ImageReadError, FolderBusyError)
    try:
        run(get_args_parser().parse_args(argv))
    except (*errors, models.WeightsUnavailableError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in WRITE_FAILURES:
            raise
        if cxrdist.env_ranks()[0] == 0:
            print(f"error: {error}{KEPT if isinstance(error, OSError) else ''}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
