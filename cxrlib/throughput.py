"""Table 2: training and inference images/s, peak memory and cache loading rate per resolution.

Each resolution is measured on the current device with the trainer's own optimizer step, batch,
precision, layout and cuDNN autotuning, on synthetic uint8 batches already on the device (the model's
ceiling); ``load_img_s`` is the trainer's DataLoader reading the cache. On a CPU the measurement is
small and the ``note`` says so. Columns: docs/method.md, "Table 2".

    python -m cxrlib.throughput --resolutions 256 512 1024 2048 --out runs/mimic/tables/table2_throughput.csv
    python -m cxrlib.throughput --resolutions 64 128 --cache cache/demo --index runs/demo/index.csv
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from .cache import CXRDataset
from .fileio import write_csv_atomic
from .labels import NUM_FINDINGS
from .models import (
    algorithm_settings,
    amp_dtype,
    autocast,
    build_model,
    default_workers,
    make_loader,
    model_input,
    resolve_device,
    use_channels_last,
)
from .recipe import BatchPlan, default_per_gpu_batch

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
    from . import dist as cxrdist
    from .train import Runtime, optimizer_step

    channels_last = device.type == "cuda" if channels_last is None else channels_last
    model = build_model("none", memory_efficient=memory_efficient).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, resolution, resolution), dtype=torch.uint8, device=device)
    targets = (torch.rand(batch, NUM_FINDINGS, device=device, generator=generator) < 0.3).float()
    angles = (torch.rand(batch, device=device, generator=generator) * 2 - 1) * 15
    draws = (angles, torch.rand(batch, device=device, generator=generator) < 0.5)
    info, plan = cxrdist.DistInfo(0, 1, 0, device, None), BatchPlan(batch, 1, 1, batch)
    rt = Runtime(info, amp, channels_last, plan, False, False)
    group = [(1, (torch.arange(batch), images, targets, torch.ones_like(targets)))]
    totals = torch.zeros(3, dtype=torch.float64)

    @torch.inference_mode()
    def infer_step() -> None:
        with autocast(device, amp):
            model(model_input(images, channels_last))

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
    return {
        "train_img_s": batch * steps / train_seconds,
        "infer_img_s": batch * steps / infer_seconds,
        "peak_mem_gib": peak,
    }


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
    batch_sizes: Sequence[int] | dict[int, int] | None = None, steps: int | None = None,
    cache_dir: str | os.PathLike | None = None, index: pd.DataFrame | None = None, amp: str = "auto",
    memory_efficient: bool = False, warmup: int | None = None, load_images: int = 256,
    channels_last: str = "auto", cudnn_benchmark: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Table 2 on ``device`` (None: the trainer's), one row per resolution, with the trainer's options."""
    device = resolve_device("auto" if device is None else str(device))
    on_gpu = device.type == "cuda"
    steps = steps or (GPU_STEPS if on_gpu else CPU_STEPS)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    dtype, layout = amp_dtype(device, amp), use_channels_last(device, channels_last)
    if isinstance(batch_sizes, Sequence):
        batch_sizes = dict(zip(resolutions, batch_sizes, strict=True))
    rows = []
    for resolution in resolutions:
        batch = (batch_sizes or {}).get(resolution) or (
            default_per_gpu_batch(resolution, device, memory_efficient, dtype) if on_gpu else CPU_BATCH
        )
        note = (
            "" if on_gpu else f"CPU: batch {batch}, {steps} timed steps; indicative only, not Table 2's GPUs"
        )
        amp_name = str(dtype).removeprefix("torch.") if dtype else "off"
        row = dict(resolution=int(resolution), device=device_name(device), batch=int(batch), amp=amp_name)
        try:
            with algorithm_settings(deterministic=False, benchmark=cudnn_benchmark):
                row |= measure_model(
                    resolution, batch, device, dtype, steps, warmup, memory_efficient, layout
                )
        except torch.cuda.OutOfMemoryError:
            row |= {"train_img_s": math.nan, "infer_img_s": math.nan, "peak_mem_gib": math.nan}
            note = f"out of GPU memory at batch {batch}"
        finally:
            if on_gpu:
                torch.cuda.empty_cache()
        row["load_img_s"] = math.nan
        if cache_dir is not None and index is not None:
            workers = default_workers(device, 1)
            row["load_img_s"] = measure_loading(
                index, cache_dir, resolution, batch, workers, device, load_images
            )
        rows.append(row | {"note": note})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_table2(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table atomically (``<run>/tables/table2_throughput.csv`` by the contract)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"throughput table lacks column(s) {missing}")
    return write_csv_atomic(frame[list(COLUMNS)], path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--resolutions", type=int, nargs="+", default=[256, 512, 1024, 2048], help="pixels")
    add("--batch-sizes", type=int, nargs="+", default=None, help="one per resolution")
    add("--steps", type=int, default=None, help="timed steps (default 20 GPU, 2 CPU)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    add("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="as the trainer")
    add("--memory-efficient", action="store_true", help="gradient checkpointing")
    add("--cache", type=Path, default=None, help="cache folder, to measure loading")
    add("--index", type=Path, default=None, help="index.csv, to measure loading")
    add("--out", type=Path, default=None, help="CSV to write (e.g. tables/table2_throughput.csv)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .index import read_index

    args = get_args_parser().parse_args(argv)
    index = read_index(args.index) if args.index else None
    frame = measure_throughput(
        args.resolutions, args.device, args.batch_sizes, args.steps, args.cache, index, args.amp,
        args.memory_efficient,
    )  # fmt: skip
    print(frame.to_string(index=False))
    if args.out:
        write_table2(frame, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
