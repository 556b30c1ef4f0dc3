"""Throughput of the real training and inference pipeline against the model alone, per resolution.

One run on one device measures, and prints in one table with the goals of the performance issue:

* ``pipeline`` (per resolution, the trainer's per-GPU batch): training img/s model-only (a
  synthetic uint8 batch already on the device) and end-to-end (:class:`cxrlib.cache.CXRDataset`
  from the cache through the trainer's DataLoader: its workers, pinned memory, persistent workers
  and prefetch), both through the trainer's own :func:`cxrlib.train.train_one_epoch` (flip and
  rotation on the device, normalisation, autocast, channels_last, masked BCE, Adam); the ratio
  end-to-end / model-only (goal >= 0.90). The DataLoader alone (decode + pinning, no model) for the
  reason of any shortfall. Inference img/s the same two ways through the trainer's validation pass
  (:func:`cxrlib.train.evaluate_loss`, batch 2x the training batch) and the end-to-end rate over the
  paper's per-GPU rate (Table 2: 260/4, 74/4, 19/6, 4/6 img/s; goal >= 50x). Peak GPU memory.
* ``memory``: the largest resolution at per-GPU batch ``--memory-batch`` (8): peak memory
  (``torch.cuda.max_memory_allocated``) and img/s without and with ``memory_efficient`` (gradient
  checkpointing); goal <= 40 GB.
* ``saved``: bytes autograd saves for the backward pass per image (128 px, bf16 and float32, with
  and without ``memory_efficient``): the factors behind the trainer's automatic batch.
* ``cache``: :func:`cxrlib.cache.build_cache` to 256 px from native-size (about 2500 x 3056) JPEGs
  with every core (goal >= 400 img/s on 16 cores). The sources are repeated to ``--cache-images``
  rows (read from the page cache, as a warm dataset would be).
* ``compile``: ``torch.compile`` of the model for training at ``--compile-resolutions``: compile
  seconds and img/s with and without, in a child process stopped after ``--compile-timeout``.

Without ``--cache``/``--index`` the data is a native-size phantom (``--phantom-subjects``) cached
at the resolutions first (``data``). Timing: ``--warmup`` untimed steps (cuDNN autotuning), then
the clock runs, after a device synchronisation, for the timed steps (``--steps``, or enough for
about ``--seconds`` at design.md's model ceiling); end-to-end runs also skip one batch per worker
first (the burst the workers deliver together at the start). Every part runs in its own
try/except, prints its time, and each result is written at once to ``--out`` (CSV, one row per
measurement) and the JSON beside it, so a run cut short keeps what it measured. ``--device cpu``
runs the same code at tiny sizes (``--quick``) for testing; it is not a timed test.

Usage::

    python benchmarks/bench_throughput.py --device cuda --out runs/bench/throughput.csv
    python benchmarks/bench_throughput.py --device cuda --cache cache/mimic --index runs/mimic/index.csv
    python benchmarks/bench_throughput.py --device cpu --quick --out /tmp/bench/throughput.csv
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd

# Only light imports at the top: build_cache's worker processes are spawned and re-import this
# script, so torch and the trainer are imported inside the functions that use them.
from cxrlib.fileio import write_csv_atomic, write_text_atomic

# Paper, Table 2 (DGX-A100, validation): images/s over the GPUs used (4, 4, 6, 6).
PAPER_IMG_S_PER_GPU = {256: 260 / 4, 512: 74 / 4, 1024: 19 / 6, 2048: 4 / 6}
# design.md: model ceiling on an H200, bf16 + channels_last, synthetic input on the device.
CEILING_TRAIN_IMG_S = {256: 1680, 512: 553, 1024: 138, 2048: 34}
CEILING_INFER_IMG_S = {256: 7365, 512: 1930, 1024: 486, 2048: 122}
GOAL_TRAIN_RATIO = 0.90
GOAL_TIMES_PAPER = 50
GOAL_PEAK_GB = 40
GOAL_CACHE_IMG_S = 400  # on 16 cores
NATIVE_WIDTH, NATIVE_HEIGHT = 2500, 3056
PARTS = ("data", "cache", "pipeline", "memory", "saved", "compile")
COLUMNS = (
    "part", "resolution", "variant", "batch", "workers", "steps", "seconds", "img_s",
    "peak_gib", "reserved_gib", "estimate_gib", "value", "note",
)  # fmt: skip


# ----------------------------------------------------------------------------- results


class Results:
    """Measurements written to a CSV and a JSON after each one, so a run cut short keeps them."""

    def __init__(self, csv_path: Path, json_path: Path, environment: dict):
        self.csv_path, self.json_path = Path(csv_path), Path(json_path)
        self.environment = environment
        self.records: list[dict] = []
        self.part_seconds: dict[str, float] = {}

    def add(self, quiet: bool = False, **record) -> dict:
        unknown = set(record) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result field(s) {sorted(unknown)}; known: {COLUMNS}")
        record = {column: record.get(column) for column in COLUMNS}
        self.records.append(record)
        if not quiet:
            shown = {k: _short(v) for k, v in record.items() if v is not None and v != ""}
            print(f"  result: {shown}", flush=True)
        self.save()
        return record

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.records, columns=list(COLUMNS))

    def save(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(self.frame(), self.csv_path)
        payload = {
            "environment": self.environment,
            "part_seconds": self.part_seconds,
            "records": self.records,
        }
        write_text_atomic(json.dumps(payload, indent=1, default=str), self.json_path)


def _short(value):
    return round(value, 4) if isinstance(value, float) else value


def environment_info(device_name: str, args: argparse.Namespace) -> dict:
    """What the numbers were measured on: device, versions, cores, date, commit, arguments."""
    import torch

    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        commit = found.stdout.strip() or commit
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


# ----------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) before reading a clock."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedBatches:
    """The first ``warmup + steps`` batches of ``batches``, handed to the trainer's own loops.

    The clock starts, after a device synchronisation, when batch number ``warmup`` is handed out
    (every earlier step has then finished); :meth:`seconds` stops it after another one. ``sampler``
    and ``len()`` are what :func:`cxrlib.train.train_one_epoch` reads of a DataLoader.
    """

    def __init__(self, batches: Iterable, warmup: int, steps: int, device, batch_size: int):
        if warmup < 0 or steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got {warmup} and {steps}")
        self.batches, self.warmup, self.steps, self.device = batches, warmup, steps, device
        self.sampler = range((warmup + steps) * batch_size)
        self.started: float | None = None

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self) -> Iterator:
        for number, batch in enumerate(self.batches):
            if number == self.warmup:
                synchronize(self.device)
                self.started = time.perf_counter()
            yield batch
            if number + 1 == len(self):
                return

    def seconds(self) -> float:
        if self.started is None:
            raise RuntimeError(f"fewer than {self.warmup + 1} batches came; nothing was timed")
        synchronize(self.device)
        return time.perf_counter() - self.started


def expected_rate(table: dict[int, float], resolution: int) -> float:
    """design.md's ceiling at ``resolution`` (scaled by pixel count from 256 px elsewhere)."""
    return table.get(resolution, table[256] * (256 / resolution) ** 2)


def planned_steps(seconds: float, rate: float, batch: int, minimum: int = 3, maximum: int = 200) -> int:
    """Timed steps for about ``seconds`` at ``rate`` img/s, within [minimum, maximum]."""
    return int(min(maximum, max(minimum, math.ceil(seconds * rate / batch))))


def synthetic_batches(batch: int, resolution: int, device, seed: int = 0) -> Iterator[tuple]:
    """The same ``(positions, images, targets, masks)`` batch forever; random uint8 images (never
    zeros, which can run faster than real data) and labels, already on the device."""
    import torch

    from cxrlib.labels import NUM_FINDINGS

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 1, resolution, resolution), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(batch, NUM_FINDINGS, generator=generator) < 0.3).float()
    positions = torch.arange(batch)
    images, targets = images.to(device), targets.to(device)
    masks = torch.ones_like(targets)
    while True:
        yield positions, images, targets, masks


# ----------------------------------------------------------------------------- the trainer's objects


class Trainee:
    """Model, optimizer, scaler and runtime set up as :func:`cxrlib.train.run` sets them up."""

    def __init__(
        self,
        resolution: int,
        batch: int,
        device,
        amp,
        memory_efficient: bool = False,
        compile_backend: str | None = None,
        compile_mode: str | None = None,
    ):
        import torch

        from cxrlib import dist as cxrdist
        from cxrlib.models import build_model
        from cxrlib.recipe import BatchPlan, default_lr
        from cxrlib.train import Runtime

        torch.manual_seed(0)
        self.rt = Runtime(
            cxrdist.DistInfo(0, 1, 0, device, None), amp, device.type == "cuda",
            BatchPlan(batch, 1, 1, batch), False, False,
        )  # fmt: skip
        model = build_model("none", memory_efficient=memory_efficient).to(device)
        if self.rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=default_lr(resolution))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        # a mode (default, max-autotune-no-cudagraphs, ...) is an inductor setting; other backends take none
        mode = compile_mode if compile_backend == "inductor" else None
        self.model = torch.compile(model, backend=compile_backend, mode=mode) if compile_backend else model

    def train(self, batches: Iterable, batch: int, warmup: int, steps: int, augmentation) -> float:
        """Timed training img/s through :func:`cxrlib.train.train_one_epoch`."""
        from cxrlib.train import train_one_epoch

        timed = TimedBatches(batches, warmup, steps, self.rt.device, batch)
        train_one_epoch(self.model, timed, self.optimizer, self.scaler, self.rt, 1, augmentation)
        return steps * batch / timed.seconds()

    def infer(self, batches: Iterable, batch: int, warmup: int, steps: int) -> float:
        """Timed inference img/s through the trainer's validation pass :func:`cxrlib.train.evaluate_loss`."""
        from cxrlib.train import evaluate_loss

        timed = TimedBatches(batches, warmup, steps, self.rt.device, batch)
        evaluate_loss(self.model, timed, self.rt)
        return steps * batch / timed.seconds()


def synthetic_augmentation(batch: int):
    """Flip and angle draws for positions 0 .. batch-1, as the trainer draws them per epoch."""
    from cxrlib.train import epoch_augmentation

    return epoch_augmentation(batch, 0, 1)


def trainer_batch(resolution: int, device, amp) -> int:
    """The per-GPU batch :func:`cxrlib.train.run` would use for one process at ``resolution``."""
    from cxrlib.recipe import default_effective_batch, default_per_gpu_batch, plan_batches

    limit = default_per_gpu_batch(resolution, device, False, amp)
    return plan_batches(default_effective_batch(resolution), 1, None, max_per_gpu=limit).per_gpu_batch


def cache_loader(dataset, batch: int, batches: int, workers: int, device):
    """The trainer's DataLoader (:func:`cxrlib.models.make_loader`) drawing ``batches`` full batches
    at random, with replacement, from ``dataset``."""
    import torch

    from cxrlib.models import make_loader

    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=batches * batch, generator=torch.Generator().manual_seed(0)
    )
    return make_loader(dataset, batch, sampler, workers, device, seed=0)


def memory_gib(device) -> tuple[float, float]:
    """(peak allocated, peak reserved) GiB since the last reset; NaN on the CPU."""
    import torch

    if device.type != "cuda":
        return math.nan, math.nan
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def attempt(results: Results, base: dict, measure: Callable[[], dict]) -> dict | None:
    """Run one measurement; on any error record it (with the error) and carry on."""
    import torch

    try:
        return results.add(**{**base, **measure()})
    except torch.cuda.OutOfMemoryError as error:
        message = f"out of GPU memory: {str(error).splitlines()[0][:200]}"
    except Exception as error:  # one failed measurement must not lose the others
        traceback.print_exc()
        message = f"failed: {type(error).__name__}: {str(error)[:300]}"
    print(f"  {base.get('variant')}: {message}", flush=True)
    return results.add(**base, note=message)


# ----------------------------------------------------------------------------- parts


def make_phantom_data(
    work: Path, subjects: int, resolutions: list[int], workers: int
) -> tuple[pd.DataFrame, Path]:
    """A native-size phantom, its index, and its cache at ``resolutions`` (png, as the trainer reads)."""
    from cxrlib.cache import build_cache
    from cxrlib.datasets import index_from_mimic
    from cxrlib.phantom import make_phantom

    root = make_phantom(work / "phantom", subjects, seed=0, max_size=None, workers=workers)
    index = index_from_mimic(root)
    cache = work / "cache"
    build_cache(index, cache, resolutions, workers=workers, progress=False)
    return index, cache


def native_sources(index: pd.DataFrame, images: int) -> tuple[pd.DataFrame, str]:
    """``images`` rows of ``index``'s native-size (about 2500 x 3056) JPEGs, repeated under new ids
    when there are fewer; and a note on what they are."""
    portrait = index[
        ((index["width"] - NATIVE_WIDTH).abs() < 50) & ((index["height"] - NATIVE_HEIGHT).abs() < 10)
    ]
    sources = portrait if len(portrait) else index
    sizes = sorted({(int(w), int(h)) for w, h in zip(sources["width"], sources["height"], strict=True)})
    repeats = math.ceil(images / len(sources))
    rows = pd.concat([sources] * repeats, ignore_index=True).iloc[:images].copy()
    rows["dicom_id"] = [f"{d}-{k}" for k, d in enumerate(rows["dicom_id"].astype(str))]
    note = f"{len(sources)} distinct source JPEG(s), sizes {sizes[:3]}, repeated to {len(rows)} rows"
    return rows, note


def measure_cache_build(index: pd.DataFrame, images: int, workers: int, work: Path) -> dict:
    """build_cache to 256 px from native JPEGs: img/s of wall time (worker start included)."""
    from bench_cache import cpu_seconds

    from cxrlib.cache import build_cache

    rows, note = native_sources(index, images)
    out = work / "cache_rate"
    shutil.rmtree(out, ignore_errors=True)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    build_cache(rows, out, [256], workers=workers, progress=False)
    seconds = time.perf_counter() - started
    cpu_ms = 1000 * (cpu_seconds() - cpu_started) / len(rows)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "resolution": 256,
        "variant": "build_cache from native JPEGs",
        "workers": workers,
        "steps": len(rows),
        "seconds": seconds,
        "img_s": len(rows) / seconds,
        "value": cpu_ms,
        "note": f"{note}; value = CPU ms per image (all processes)",
    }


def measure_pipeline(resolution: int, dataset, device, amp, args, results: Results) -> None:
    """Model-only and end-to-end training and inference at one resolution (see module docs)."""
    from cxrlib.models import PREFETCH_BATCHES, default_workers
    from cxrlib.recipe import training_gib_per_image

    batch = args.batch_size or trainer_batch(resolution, device, amp)
    workers = args.workers if args.workers is not None else default_workers(device, 1)
    train_steps = args.steps or planned_steps(
        args.seconds, expected_rate(CEILING_TRAIN_IMG_S, resolution), batch, args.min_steps
    )
    infer_batch = 2 * batch  # the trainer's validation batch
    infer_steps = args.steps or planned_steps(
        args.seconds, expected_rate(CEILING_INFER_IMG_S, resolution), infer_batch, args.min_steps
    )
    skip = args.warmup + workers  # warm-up steps plus the workers' first burst
    estimate = training_gib_per_image(resolution, amp) * batch if device.type == "cuda" else None
    print(f"  {resolution} px: batch {batch}, {workers} workers, {train_steps} / {infer_steps} timed steps")
    reset_memory(device)
    trainee = Trainee(resolution, batch, device, amp)
    base = {"part": "pipeline", "resolution": resolution}

    def train_model_only() -> dict:
        rate = trainee.train(
            synthetic_batches(batch, resolution, device), batch, args.warmup, train_steps,
            synthetic_augmentation(batch),
        )  # fmt: skip
        peak, reserved = memory_gib(device)
        return {"img_s": rate, "peak_gib": peak, "reserved_gib": reserved, "estimate_gib": estimate}

    def train_end_to_end() -> dict:
        from cxrlib.train import epoch_augmentation

        loader = cache_loader(dataset, batch, skip + train_steps, workers, device)
        rate = trainee.train(loader, batch, skip, train_steps, epoch_augmentation(len(dataset), 0, 1))
        peak, reserved = memory_gib(device)
        return {"img_s": rate, "peak_gib": peak, "reserved_gib": reserved, "estimate_gib": estimate}

    def loading_only() -> dict:
        # No model consumes the batches: skip every batch the workers can have ready at the start.
        ready = workers * PREFETCH_BATCHES
        steps = max(train_steps, 2 * workers)
        loader = cache_loader(dataset, batch, ready + steps, workers, device)
        timed = TimedBatches(loader, ready, steps, device, batch)
        for _ in timed:
            pass
        return {"steps": steps, "img_s": steps * batch / timed.seconds()}

    def infer_model_only() -> dict:
        rate = trainee.infer(
            synthetic_batches(infer_batch, resolution, device), infer_batch, args.warmup, infer_steps
        )
        return {"img_s": rate, "value": rate / PAPER_IMG_S_PER_GPU.get(resolution, math.nan)}

    def infer_end_to_end() -> dict:
        loader = cache_loader(dataset, infer_batch, skip + infer_steps, workers, device)
        rate = trainee.infer(loader, infer_batch, skip, infer_steps)
        return {"img_s": rate, "value": rate / PAPER_IMG_S_PER_GPU.get(resolution, math.nan)}

    train_base = {**base, "batch": batch, "steps": train_steps}
    infer_base = {**base, "batch": infer_batch, "steps": infer_steps}
    attempt(results, {**train_base, "variant": "train model-only", "workers": 0}, train_model_only)
    reset_memory(device)
    attempt(results, {**train_base, "variant": "train end-to-end", "workers": workers}, train_end_to_end)
    gc.collect()  # ends the persistent workers of the loader just used
    attempt(results, {**base, "batch": batch, "variant": "loading only", "workers": workers}, loading_only)
    gc.collect()
    attempt(results, {**infer_base, "variant": "infer model-only", "workers": 0}, infer_model_only)
    attempt(results, {**infer_base, "variant": "infer end-to-end", "workers": workers}, infer_end_to_end)
    trainee = None  # frees the model before the next resolution
    reset_memory(device)


def measure_memory(resolution: int, batch: int, device, amp, args, results: Results) -> None:
    """Peak memory and img/s of training at ``batch`` without and with memory_efficient."""
    from cxrlib.recipe import training_gib_per_image

    steps = args.steps or planned_steps(
        args.seconds, expected_rate(CEILING_TRAIN_IMG_S, resolution), batch, args.min_steps
    )
    for memory_efficient in (False, True):
        reset_memory(device)

        def train(memory_efficient=memory_efficient) -> dict:
            trainee = Trainee(resolution, batch, device, amp, memory_efficient=memory_efficient)
            rate = trainee.train(
                synthetic_batches(batch, resolution, device), batch, args.warmup, steps,
                synthetic_augmentation(batch),
            )  # fmt: skip
            peak, reserved = memory_gib(device)
            estimate = training_gib_per_image(resolution, amp, memory_efficient) * batch
            return {
                "img_s": rate, "peak_gib": peak, "reserved_gib": reserved,
                "estimate_gib": estimate if device.type == "cuda" else None,
                "value": peak * 2**30 / 1e9,
                "note": "value = peak GB (1e9 bytes)",
            }  # fmt: skip

        variant = "train memory_efficient" if memory_efficient else "train"
        attempt(
            results,
            {"part": "memory", "resolution": resolution, "batch": batch, "steps": steps, "variant": variant},
            train,
        )
    reset_memory(device)


def saved_gib_per_image(resolution: int, batch: int, device, amp, memory_efficient: bool) -> float:
    """GiB per image of the tensors autograd saves for backward (distinct storages, counted once)."""
    import torch

    from cxrlib.models import autocast, build_model

    model = build_model("none", memory_efficient=memory_efficient).to(device).train()
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, 3, resolution, resolution, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(device, amp):
        model(x)
    return sum(storages.values()) / batch / 2**30


def measure_saved(device, results: Results, resolution: int = 128, batch: int = 2) -> None:
    import torch

    for amp in (torch.bfloat16, None):
        for memory_efficient in (False, True):
            name = ("bf16" if amp else "float32") + (" memory_efficient" if memory_efficient else "")

            def count(amp=amp, memory_efficient=memory_efficient) -> dict:
                gib = saved_gib_per_image(resolution, batch, device, amp, memory_efficient)
                return {"value": gib, "note": "value = GiB saved for backward per image"}

            attempt(
                results,
                {"part": "saved", "resolution": resolution, "batch": batch, "variant": f"saved {name}"},
                count,
            )


def measure_compile(resolution: int, device, amp, backend: str, args, results: Results) -> None:
    """Training img/s eager and compiled, and the seconds of the compiled model's first step."""
    batch = args.batch_size or trainer_batch(resolution, device, amp)
    steps = args.steps or planned_steps(
        args.seconds, expected_rate(CEILING_TRAIN_IMG_S, resolution), batch, args.min_steps
    )
    base = {"part": "compile", "resolution": resolution, "batch": batch, "steps": steps}
    augmentation = synthetic_augmentation(batch)
    eager_rate = math.nan

    def eager() -> dict:
        nonlocal eager_rate
        trainee = Trainee(resolution, batch, device, amp)
        eager_rate = trainee.train(
            synthetic_batches(batch, resolution, device), batch, args.warmup, steps, augmentation
        )
        return {"img_s": eager_rate}

    def compiled() -> dict:
        trainee = Trainee(
            resolution, batch, device, amp, compile_backend=backend, compile_mode=args.compile_mode
        )
        started = time.perf_counter()
        trainee.train(synthetic_batches(batch, resolution, device), batch, 0, 1, augmentation)
        first_step = time.perf_counter() - started  # compilation + one step
        rate = trainee.train(
            synthetic_batches(batch, resolution, device), batch, args.warmup, steps, augmentation
        )
        return {
            "img_s": rate,
            "value": first_step - batch / rate,
            "note": f"backend {backend}, mode {args.compile_mode or 'default'}; value = compile seconds "
            "(first step less a compiled step); "
            f"{rate / eager_rate - 1:+.1%} vs eager",
        }

    attempt(results, {**base, "variant": "train eager"}, eager)
    reset_memory(device)
    attempt(results, {**base, "variant": "train compiled"}, compiled)
    reset_memory(device)


def run_compile_child(args, results: Results, timeout: float) -> None:
    """The compile part in a child process (its own session), killed with its compile workers
    after ``timeout`` seconds; its records join ``results``."""
    work = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    child_csv = work / "compile.csv"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--compile-child", "--device", args.device,
        "--resolutions", *map(str, args.compile_resolutions), "--compile-backend", args.compile_backend,
        "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps),
        "--amp", args.amp, "--out", str(child_csv),
    ]  # fmt: skip
    if args.compile_mode:
        command += ["--compile-mode", args.compile_mode]
    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value:
            command += [flag, str(value)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    process = subprocess.Popen(command, start_new_session=True)
    note = None
    try:
        returncode = process.wait(timeout=timeout)
        if returncode:
            note = f"compile child exited with {returncode} (see its output above)"
    except subprocess.TimeoutExpired:
        note = f"skipped: compiling took longer than {timeout:.0f} s"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the child and its compile workers
            process.wait()
    if child_csv.is_file():
        records = pd.read_csv(child_csv).to_dict("records")
        for record in records:  # printed by the child already
            clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
            results.add(quiet=True, **clean)
        print(f"  compile: {len(records)} result(s) from the child process", flush=True)
    if note:
        print(f"  compile: {note}", flush=True)
        results.add(part="compile", variant="status", note=note)
    shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- the table


def _value(frame: pd.DataFrame, part: str, variant: str, resolution=None, column: str = "img_s") -> float:
    rows = frame[(frame["part"] == part) & (frame["variant"] == variant)]
    if resolution is not None:
        rows = rows[rows["resolution"] == resolution]
    values = pd.to_numeric(rows[column], errors="coerce").dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _gib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} GiB ({value * 2**30 / 1e9:.1f} GB)"


def _met(value: float, ok: bool) -> str:
    return "n/a" if math.isnan(value) else ("met" if ok else "NOT met")


def pipeline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per resolution: batch, training img/s (model-only, end-to-end, ratio), loading img/s,
    inference img/s (model-only, end-to-end), the paper's per-GPU rate and the multiple of it."""
    rows = []
    pipeline = frame[frame["part"] == "pipeline"]
    for resolution in sorted(pd.to_numeric(pipeline["resolution"]).dropna().astype(int).unique()):
        model = _value(frame, "pipeline", "train model-only", resolution)
        e2e = _value(frame, "pipeline", "train end-to-end", resolution)
        infer = _value(frame, "pipeline", "infer end-to-end", resolution)
        paper = PAPER_IMG_S_PER_GPU.get(resolution, math.nan)
        ratio, times = e2e / model, infer / paper
        rows.append(
            {
                "px": resolution,
                "batch": _value(frame, "pipeline", "train model-only", resolution, "batch"),
                "train model": model,
                "train e2e": e2e,
                "e2e/model": ratio,
                f">={GOAL_TRAIN_RATIO}": _met(ratio, ratio >= GOAL_TRAIN_RATIO),
                "load only": _value(frame, "pipeline", "loading only", resolution),
                "infer model": _value(frame, "pipeline", "infer model-only", resolution),
                "infer e2e": infer,
                "paper/GPU": paper,
                "x paper": times,
                f">={GOAL_TIMES_PAPER}x": _met(times, times >= GOAL_TIMES_PAPER),
                "peak GiB": _value(frame, "pipeline", "train model-only", resolution, "peak_gib"),
            }
        )
    return pd.DataFrame(rows)


def goal_lines(frame: pd.DataFrame) -> list[str]:
    """One line each for the memory, cache, compile and saved-bytes results."""
    lines = []
    measured = frame[frame["variant"] != "status"]
    memory = measured[measured["part"] == "memory"]
    if len(memory):
        resolution = int(pd.to_numeric(memory["resolution"]).max())
        batch = _value(frame, "memory", "train", resolution, "batch")
        plain = [_value(frame, "memory", "train", resolution, c) for c in ("peak_gib", "img_s")]
        checkpointed = "train memory_efficient"
        saving = [_value(frame, "memory", checkpointed, resolution, c) for c in ("peak_gib", "img_s")]
        best = min((p for p in (plain[0], saving[0]) if not math.isnan(p)), default=math.nan)
        lines.append(
            f"memory ({resolution} px, batch {batch:.0f}): peak {_gib(plain[0])} at {plain[1]:.1f} img/s; "
            f"memory_efficient {_gib(saving[0])} at {saving[1]:.1f} img/s ({saving[1] / plain[1] - 1:+.0%}); "
            f"goal <= {GOAL_PEAK_GB} GB: {_met(best, best * 2**30 / 1e9 <= GOAL_PEAK_GB)}"
        )
    cache_rate = _value(frame, "cache", "build_cache from native JPEGs")
    if not math.isnan(cache_rate):
        workers = _value(frame, "cache", "build_cache from native JPEGs", column="workers")
        lines.append(
            f"cache build to 256 px from native JPEGs, {workers:.0f} processes: {cache_rate:.0f} img/s "
            f"(goal >= {GOAL_CACHE_IMG_S} on 16 cores: {_met(cache_rate, cache_rate >= GOAL_CACHE_IMG_S)}"
            f"{'' if workers >= 16 else f'; only {workers:.0f} cores here'})"
        )
    compiled = frame[(frame["part"] == "compile") & (frame["variant"] == "train compiled")]
    for resolution in pd.to_numeric(compiled["resolution"]).dropna().astype(int).unique():
        eager, rate, seconds = (
            _value(frame, "compile", variant, resolution, column)
            for variant, column in (
                ("train eager", "img_s"),
                ("train compiled", "img_s"),
                ("train compiled", "value"),
            )
        )
        batch = _value(frame, "compile", "train compiled", resolution, "batch")
        lines.append(
            f"torch.compile ({resolution} px, batch {batch:.0f}): eager {eager:.1f} img/s, compiled "
            f"{rate:.1f} img/s ({rate / eager - 1:+.0%}), compile {seconds:.0f} s"
        )
    saved = measured[measured["part"] == "saved"]
    if len(saved):
        base = _value(frame, "saved", "saved bf16", column="value")
        parts = [
            f"{v.removeprefix('saved ')} x{_value(frame, 'saved', v, column='value') / base:.2f}"
            for v in saved["variant"]
            if v != "saved bf16"
        ]
        lines.append(f"saved for backward per image: bf16 {base:.4f} GiB at 128 px; " + ", ".join(parts))
    for record in frame[frame["variant"] == "status"].to_dict("records"):
        lines.append(f"{record['part']}: {record['note']}")
    failed = measured[measured["note"].astype(str).str.startswith(("failed", "out of GPU memory"))]
    for record in failed.to_dict("records"):
        lines.append(f"FAILED {record['part']} {record['resolution']} {record['variant']}: {record['note']}")
    return lines


def format_report(frame: pd.DataFrame, environment: dict) -> str:
    table = pipeline_table(frame)
    text = "(no pipeline rows)"
    if len(table):
        text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    header = (
        f"device: {environment.get('device')} | torch {environment.get('torch')} | "
        f"{environment.get('cpu_cores')} CPU cores | {environment.get('date_utc')} | "
        f"commit {environment.get('commit')}"
    )
    return "\n".join([header, text, *goal_lines(frame)])


# ----------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 256 512 1024 2048")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: about --seconds)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds each (default 2)")
    parser.add_argument("--min-steps", type=int, default=5, help="fewest timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: trainer's)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: trainer's)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="as trainer")
    parser.add_argument("--cache", type=Path, default=None, help="an existing cache (with --index)")
    parser.add_argument("--index", type=Path, default=None, help="index.csv of the cache's images")
    parser.add_argument("--phantom-subjects", type=int, default=24, help="phantom patients when no --cache")
    parser.add_argument("--cache-images", type=int, default=2400, help="images for the cache build rate")
    parser.add_argument("--memory-batch", type=int, default=8, help="batch of the memory part (default 8)")
    parser.add_argument(
        "--compile-resolutions", type=int, nargs="+", default=[256], help="torch.compile at (default 256)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--compile-mode", default=None, help="inductor mode, e.g. default or max-autotune-no-cudagraphs"
    )
    parser.add_argument("--compile-timeout", type=float, default=150.0, help="seconds (default 150)")
    parser.add_argument("--time-limit", type=float, default=None, help="skip parts that start after N s")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the CPU: 64 128 px, 2 steps")
    parser.add_argument("--work-dir", type=Path, default=None, help="phantom and caches (default: temp)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/throughput.csv"), help="results CSV")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default: --out as .json)")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: the same code paths at tiny sizes, for the CPU."""
    if not args.quick:
        return
    args.resolutions = args.resolutions or [64, 128]
    args.steps = args.steps or 2
    args.batch_size = args.batch_size or 4
    args.memory_batch = min(args.memory_batch, 4)
    args.threads = args.threads or 1  # on a small shared CPU, threads waiting on each other cost most
    args.warmup = min(args.warmup, 1)
    args.phantom_subjects = min(args.phantom_subjects, 1)
    args.cache_images = min(args.cache_images, 8)
    args.workers = 1 if args.workers is None else args.workers  # exercise the worker path too
    args.compile_resolutions = [min(args.resolutions)]
    if args.compile_backend == "inductor" and args.device == "cpu":
        args.compile_backend = "eager"  # traces with dynamo; inductor on 2 CPU cores takes minutes


def _terminate(signum, _frame):
    # DataLoader's SIGCHLD handler would raise again as its workers, signalled too, stop.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise SystemExit(128 + signum)  # runs the finally blocks that stop child processes and save


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    apply_quick(args)
    args.resolutions = args.resolutions or [256, 512, 1024, 2048]
    if (args.cache is None) != (args.index is None):
        raise SystemExit("error: give --cache and --index together (or neither, for a phantom)")
    import torch

    from cxrlib.cache import CXRDataset
    from cxrlib.index import read_index
    from cxrlib.models import algorithm_settings, amp_dtype
    from cxrlib.throughput import device_name

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible (use --device cpu)")
    device = torch.device(args.device)
    amp = amp_dtype(device, args.amp)
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = args.json or args.out.with_suffix(".json")
    results = Results(args.out, json_path, environment_info(device_name(device), args))
    if args.compile_child:
        return compile_child(args, device, amp, results)

    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    cores = results.environment["cpu_cores"]
    work = Path(tempfile.mkdtemp(prefix="bench_throughput_", dir=args.work_dir))
    print(
        f"bench_throughput: {results.environment['device']}, amp {amp}, {cores} CPU cores, "
        f"resolutions {args.resolutions}, parts {args.parts}",
        flush=True,
    )
    data: dict = {}

    def run_part(name: str, body: Callable[[], None]) -> None:
        if name not in args.parts:
            return
        elapsed = time.perf_counter() - started
        if args.time_limit is not None and elapsed > args.time_limit:
            print(f"[{name}] skipped: {elapsed:.0f} s gone of the {args.time_limit:.0f} s limit", flush=True)
            results.add(part=name, variant="status", note=f"skipped: time limit {args.time_limit:.0f} s")
            return
        print(f"[{name}] starting at {elapsed:.0f} s", flush=True)
        part_started = time.perf_counter()
        try:
            body()
        except Exception as error:  # one failed part must not lose the others
            traceback.print_exc()
            note = f"failed: {type(error).__name__}: {str(error)[:300]}"
            results.add(part=name, variant="status", note=note)
        spent = results.part_seconds.get(name, 0) + time.perf_counter() - part_started
        results.part_seconds[name] = round(spent, 1)
        results.save()
        print(f"[{name}] done in {time.perf_counter() - part_started:.1f} s", flush=True)

    def prepare_data() -> None:
        if args.cache is not None:
            data["index"], data["cache"] = read_index(args.index), args.cache
        else:
            made = make_phantom_data(work, args.phantom_subjects, args.resolutions, cores)
            data["index"], data["cache"] = made
        print(f"  data: {len(data['index'])} images, cache {data['cache']}", flush=True)

    try:
        needs_data = {"data", "cache", "pipeline"} & set(args.parts)
        if needs_data:
            args.parts = list(dict.fromkeys(["data", *args.parts]))
        run_part("data", prepare_data)
        run_part("cache", lambda: results.add(
            part="cache", **measure_cache_build(data["index"], args.cache_images, cores, work)
        ))  # fmt: skip
        with algorithm_settings(False):  # the trainer's settings: cuDNN autotuning on
            for resolution in args.resolutions:

                def pipeline(resolution=resolution) -> None:
                    dataset = CXRDataset(data["index"], resolution, data["cache"])
                    measure_pipeline(resolution, dataset, device, amp, args, results)

                run_part("pipeline", pipeline)
            largest = max(args.resolutions)
            run_part("memory", lambda: measure_memory(largest, args.memory_batch, device, amp, args, results))
            run_part("saved", lambda: measure_saved(device, results))
        left = math.inf if args.time_limit is None else args.time_limit - (time.perf_counter() - started)
        timeout = min(args.compile_timeout, max(left, 1.0))
        run_part("compile", lambda: run_compile_child(args, results, timeout))
    finally:  # also when stopped (SIGTERM): the table of what was measured so far
        shutil.rmtree(work, ignore_errors=True)
        try:
            results.save()
            write_report(results, args.out.with_suffix(".txt"), time.perf_counter() - started)
        except Exception:  # the results written before this stay valid
            traceback.print_exc()
    return 0


def compile_child(args: argparse.Namespace, device, amp, results: Results) -> int:
    """The child process of the ``compile`` part: compile and time each resolution, then exit."""
    from cxrlib.models import algorithm_settings

    with algorithm_settings(False):
        for resolution in args.resolutions:
            measure_compile(resolution, device, amp, args.compile_backend, args, results)
    return 0


def write_report(results: Results, path: Path, seconds: float) -> None:
    """Print the table and goal lines, and write them to ``path``."""
    report = format_report(results.frame(), results.environment)
    print("\n" + report, flush=True)
    write_text_atomic(report + "\n", path)
    print(f"\nwrote {results.csv_path}, {results.json_path} and {path} ({seconds:.0f} s in all)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
