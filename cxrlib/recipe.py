"""The paper's training recipe as numbers (docs/training.md, "The recipe")."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import torch

from .dist import all_reduce_min
from .fileio import ConfigError
from .models import amp_dtype

# Paper, Table 1: resolution -> (initial learning rate, effective batch size).
TABLE1: dict[int, tuple[float, int]] = {
    256: (5e-4, 512),
    512: (2.5e-4, 256),
    1024: (1.6e-4, 168),
    2048: (8.204e-5, 42),
}
MIN_RESOLUTION = 32  # DenseNet121 reduces the input 32x; smaller images have no feature map left
# Training memory per image, bf16 + channels_last on an H200: about 0.083 GiB x (R / 256)^2; float32
# keeps 1.97x the bytes saved for backward, memory_efficient 0.47x (rounded up; docs/performance.md).
GIB_PER_IMAGE_AT_256, FLOAT32_MEMORY_FACTOR, MEMORY_EFFICIENT_FACTOR = 0.083, 2.0, 0.5
AUTO_BATCH_MEMORY_FRACTION = 0.8  # of the free memory; the rest absorbs allocator fragmentation
AUTO_BATCH_RESERVED_GIB = 1.0  # weights, gradients, Adam's state, cuDNN workspace
AUTO_BATCH_CAP = 256
CPU_BATCH_SMALL, CPU_BATCH_LARGE = 16, 8  # on the CPU speed, not memory, limits the batch


def default_effective_batch(resolution: int) -> int:
    """Table 1's effective batch, log-linearly interpolated in resolution between its entries."""
    resolutions = sorted(TABLE1)
    batches = np.log([TABLE1[r][1] for r in resolutions])
    return int(round(math.exp(np.interp(math.log(resolution), np.log(resolutions), batches))))


def default_lr(resolution: int, effective_batch: int | None = None) -> float:
    """Table 1's learning rate (else 5e-4 x batch / 512), scaled linearly to ``effective_batch``."""
    base_batch = default_effective_batch(resolution)
    base_lr = TABLE1[resolution][0] if resolution in TABLE1 else 5e-4 * base_batch / 512
    return base_lr if effective_batch is None else base_lr * effective_batch / base_batch


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
        inexact = "" if self.exact else f"; {self.requested_effective_batch} asked cannot be matched exactly"
        return (
            f"effective batch {self.effective_batch} = {self.per_gpu_batch} per process x "
            f"{self.world_size} process(es) x {self.accumulation_steps} accumulation step(s){inexact}"
        )


def plan_batches(
    effective_batch: int, world_size: int, per_gpu_batch: int | None = None, max_per_gpu: int | None = None
) -> BatchPlan:
    """Accumulation steps (and per-process batch unless given) making up ``effective_batch``."""
    if per_gpu_batch is not None:
        steps = max(1, round(effective_batch / (per_gpu_batch * world_size)))
        return BatchPlan(per_gpu_batch, world_size, steps, effective_batch)
    limit = max(1, max_per_gpu or effective_batch)
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
    """GiB per image: 0.083 x (R / 256)^2, x 2 in float32 (``amp`` None), x 0.5 ``memory_efficient``."""
    per_image = GIB_PER_IMAGE_AT_256 * (resolution / 256) ** 2
    per_image *= FLOAT32_MEMORY_FACTOR if amp is None else 1.0
    return per_image * (MEMORY_EFFICIENT_FACTOR if memory_efficient else 1.0)


def default_per_gpu_batch(
    resolution: int,
    device: str | torch.device,
    memory_efficient: bool = False,
    amp: torch.dtype | None | str = "auto",
    free_bytes: int | None = None,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """Per-process batch limit: 16 or 8 on the CPU; on a GPU the largest power of two (1 .. ``cap``)
    whose estimated training memory fits ``0.8 x free - 1 GiB`` of its free memory (or ``free_bytes``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SMALL if resolution <= 128 else CPU_BATCH_LARGE
    amp = amp_dtype(device, amp) if isinstance(amp, str) else amp
    free_bytes = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    if free_bytes < 0 or cap < 1:
        raise ConfigError(f"free memory ({free_bytes} bytes) must be >= 0 and the cap ({cap}) >= 1")
    usable = AUTO_BATCH_MEMORY_FRACTION * free_bytes / 2**30 - AUTO_BATCH_RESERVED_GIB
    fits = int(usable / training_gib_per_image(resolution, amp, memory_efficient))
    return 1 if fits < 1 else min(cap, 2 ** int(math.log2(fits)))


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """A run's batch plan and its learning rate, as requested and as used (scaled to the plan)."""

    batches: BatchPlan
    requested_lr: float
    batch_limit: int | None  # the automatic per-process limit; None when --batch-size was given
    limit_reason: str = ""  # how the automatic limit was chosen

    @property
    def lr(self) -> float:
        return self.requested_lr * self.batches.lr_scale  # linear scaling when the batch is not exact

    def describe(self) -> list[str]:
        """Log lines: how the per-process batch was chosen, the plan and any learning-rate scaling."""
        plan, used, asked = self.batches, self.batches.effective_batch, self.batches.requested_effective_batch
        scaled = "" if plan.exact else f": lr {self.requested_lr:g} x {used}/{asked} = {self.lr:g}"
        return [line for line in (self.limit_reason, plan.describe() + scaled) if line]


def plan_training(
    args: argparse.Namespace, world_size: int, device: torch.device, amp: torch.dtype | None
) -> TrainingPlan:
    """The batch plan and learning rate of ``args``, the same on every process."""
    effective = args.effective_batch or default_effective_batch(args.resolution)
    requested_lr = args.lr if args.lr is not None else default_lr(args.resolution, args.effective_batch)
    limit = args.batch_size or default_per_gpu_batch(args.resolution, device, args.memory_efficient, amp)
    if not args.batch_size:  # each GPU has its own free memory: every process takes the smallest limit
        (limit,) = all_reduce_min([limit])
    plan = plan_batches(effective, world_size, args.batch_size, max_per_gpu=limit)
    mine = [plan.per_gpu_batch, plan.accumulation_steps]
    if all_reduce_min(mine + [-v for v in mine]) != mine + [-v for v in mine]:
        raise ConfigError(
            f"the processes planned different batches (this one {plan.describe()}): give them all the same "
            "--batch-size and --effective-batch"
        )
    if args.batch_size:
        return TrainingPlan(plan, requested_lr, None)
    reason = f"per-process batch limit {limit}: the CPU default at {args.resolution} px (--batch-size)"
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        per_image = training_gib_per_image(args.resolution, amp, args.memory_efficient)
        reason = (
            f"per-process batch limit {limit}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, about "
            f"{per_image:.3f} GiB per image at {args.resolution} px in {amp or 'float32'} (--batch-size)"
        )
    return TrainingPlan(plan, requested_lr, limit, reason)


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


def optimization(model: torch.nn.Module, lr: float, args: argparse.Namespace):
    """Adam, ReduceLROnPlateau and early stopping as ``args`` set them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=args.lr_factor, patience=args.patience_lr
    )
    return optimizer, scheduler, EarlyStopping(args.patience_stop)
