"""Table 2: training and inference images/s, peak memory and cache loading rate per resolution, with
the trainer's own step and settings on the current device: docs/method.md, "Table 2"."""

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from . import dist, models
from .cache import CXRDataset
from .fileio import write_csv_atomic
from .labels import NUM_FINDINGS
from .models import make_loader
from .recipe import BatchPlan, default_per_gpu_batch
from .train import Runtime, optimizer_step

COLUMNS = ("resolution", "device", "batch", "amp", "train_img_s", "infer_img_s", "peak_mem_gib", "load_img_s",
           "note")  # fmt: skip
CPU_BATCH, CPU_STEPS, GPU_STEPS = 4, 2, 20
LOADING_BATCHES_PER_WORKER = 4  # timed batches per DataLoader worker (at least 4 in all)


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a GPU, ``"cpu (N threads)"`` for the CPU."""
    on_gpu = device.type == "cuda"
    return torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def measure_model(
    resolution: int, batch: int, device: torch.device, amp: torch.dtype | None, steps: int, warmup: int,
    memory_efficient: bool = False, channels_last: bool | None = None,
) -> dict:  # fmt: skip
    """Training and inference images/s and peak memory with the trainer's step and forward pass."""
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = models.build_model("none", memory_efficient=memory_efficient).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, resolution, resolution), dtype=torch.uint8, device=device)
    targets = (torch.rand(batch, NUM_FINDINGS, device=device, generator=generator) < 0.3).float()
    angles = (torch.rand(batch, device=device, generator=generator) * 2 - 1) * 15
    draws = (angles, torch.rand(batch, device=device, generator=generator) < 0.5)
    info, plan = dist.DistInfo(0, 1, 0, device, None), BatchPlan(batch, 1, 1, batch)
    rt = Runtime(info, amp, channels_last, plan, False, False)
    group = [(1, (torch.arange(batch), images, targets, torch.ones_like(targets)))]
    totals = torch.zeros(3, dtype=torch.float64)

    @torch.inference_mode()
    def infer_step() -> None:
        with models.autocast(device, amp):
            model(models.model_input(images, channels_last))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_seconds = _timed(
        lambda: optimizer_step(model, group, optimizer, scaler, rt, 1, draws, totals), steps, warmup, device
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    model.eval()
    infer_seconds = _timed(infer_step, steps, warmup, device)
    timed = batch * steps  # images
    return {"train_img_s": timed / train_seconds, "infer_img_s": timed / infer_seconds, "peak_mem_gib": peak}


def measure_loading(
    index: pd.DataFrame, cache_dir: str | os.PathLike, resolution: int, batch: int, workers: int,
    device: torch.device, images: int = 256,
) -> float:  # fmt: skip
    """Images/s of the trainer's DataLoader decoding ``images`` cached images (warm, 4 batches per worker)."""
    dataset = CXRDataset(index.iloc[:images].reset_index(drop=True), resolution, cache_dir)
    order = [i % len(dataset) for i in range(LOADING_BATCHES_PER_WORKER * max(1, workers) * batch)]
    loader = make_loader(dataset, batch, order, workers, device, seed=0)
    for _ in loader:  # workers started, the files read once
        pass
    start = time.perf_counter()
    count = sum(len(b[0]) for b in loader if b is not None)
    return count / (time.perf_counter() - start)


def measure_throughput(
    resolutions: Sequence[int], device: str | torch.device | None = None,
    batch_sizes: Sequence[int] | None = None, steps: int | None = None,
    cache_dir: str | os.PathLike | None = None, index: pd.DataFrame | None = None, amp: str = "auto",
    memory_efficient: bool = False, warmup: int | None = None, load_images: int = 256,
    channels_last: str = "auto", cudnn_benchmark: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Table 2 on ``device`` (None: the trainer's), one row per resolution, with the trainer's options."""
    device = models.resolve_device("auto" if device is None else str(device))
    on_gpu = device.type == "cuda"
    steps = steps or (GPU_STEPS if on_gpu else CPU_STEPS)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    dtype, layout = models.amp_dtype(device, amp), models.use_channels_last(device, channels_last)
    rows = []
    for i, resolution in enumerate(resolutions):
        batch = batch_sizes[i] if batch_sizes else CPU_BATCH
        if on_gpu and not batch_sizes:
            batch = default_per_gpu_batch(resolution, device, memory_efficient, dtype)
        note = "" if on_gpu else f"CPU: batch {batch}, {steps} timed steps; indicative only"
        amp_name = str(dtype).removeprefix("torch.") if dtype else "off"
        row = dict(resolution=int(resolution), device=device_name(device), batch=int(batch), amp=amp_name)
        try:
            with models.algorithm_settings(deterministic=False, benchmark=cudnn_benchmark):
                row |= measure_model(
                    resolution, batch, device, dtype, steps, warmup, memory_efficient, layout
                )
        except torch.cuda.OutOfMemoryError:
            row |= {"train_img_s": math.nan, "infer_img_s": math.nan, "peak_mem_gib": math.nan}
            note = f"out of GPU memory at batch {batch}"
        finally:
            torch.cuda.empty_cache()  # nothing to do without a GPU
        row["load_img_s"] = math.nan
        if cache_dir is not None and index is not None:
            workers = models.default_workers(device, 1)
            row["load_img_s"] = measure_loading(
                index, cache_dir, resolution, batch, workers, device, load_images
            )
        rows.append(row | {"note": note})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_table2(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table atomically (``<run>/tables/table2_throughput.csv`` by the contract)."""
    if missing := [c for c in COLUMNS if c not in frame.columns]:
        raise ValueError(f"throughput table lacks column(s) {missing}")
    return write_csv_atomic(frame[list(COLUMNS)], path)
