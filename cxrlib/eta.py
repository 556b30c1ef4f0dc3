"""Expected time of each pipeline step on this machine, from a short calibration it keeps.

Before the first training step, :func:`cxrlib.pipeline.run_pipeline` prints how long each step
should take here and when the whole run should end. Training dominates every preset, so it is
estimated from a measurement, not a guess:

* :func:`calibrate` times a few training and inference steps of DenseNet121 at every resolution
  with the preset's own settings (processes, per-process batch, channels_last, threads, device;
  on a CPU the processes run side by side, as torchrun runs them, so they share memory
  bandwidth), each in a spawned child process, so no GPU memory stays with the pipeline. About
  20-40 s on a 2-core CPU; the result is kept in ``~/.cache/cxrlib/calibration.json``
  (``CXR_CACHE_DIR``), keyed by the CPU, the torch version and those settings, so later runs on
  this machine skip it.
* :func:`estimate` turns rates into seconds per step: a training step is its epochs of training
  and validation images at the measured rates plus the final predictions and a start-up cost;
  the other steps use small cost models (images to render, cache, score) and, when this machine
  has run the step before with the same settings, that step's recorded time
  (:func:`record_step_time`), which is more accurate than any model.

The estimate is a forecast, not a promise: other jobs on the machine and early stopping change
it. The pipeline prints the actual time next to it after each step and keeps both in
``provenance.json``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .fileio import write_text_atomic
from .presets import Preset

KERNEL_SECONDS = 6.0  # papermill: start a kernel, import torch and cxrlib, save the notebook
TRAIN_START_SECONDS = 12.0  # torchrun, the processes' imports, the model, the first batches
RENDER_SECONDS_AT_256 = 0.015  # phantom: one frontal image at a 256 px long side, one core
CACHE_SECONDS_PER_IMAGE = 0.006  # decode + resize + PNG per source image and resolution, one core
BACKWARD_FACTOR = 3.0  # a gradient with respect to the input costs about 3 forward passes
FIELD_SWEEP_ANALYSIS_S = 60.0  # notebook 10 besides its trainings (4 arms, 128 px, 2-core AVX2 CPU)
CALIBRATION_STEPS = 2  # timed steps per resolution, after one untimed warm-up step


def cache_dir() -> Path:
    """``CXR_CACHE_DIR`` or ``~/.cache/cxrlib``: where calibrations and step times are kept."""
    return Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxrlib"))


@dataclass(frozen=True)
class Setting:
    """What decides the training speed at one resolution."""

    resolution: int
    batch: int
    processes: int
    threads: int
    channels_last: bool
    device: str

    def key(self, machine: str) -> str:
        import torch

        return json.dumps([machine, str(torch.__version__), *self.__dict__.values()])


def machine_label() -> str:
    """The CPU (model, cores, extensions) and the GPUs, as one line."""
    import torch

    from .models import describe_cpu

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return describe_cpu() + (f"; GPUs: {', '.join(gpus)}" if gpus else "")


def training_settings(preset: Preset) -> list[Setting]:
    """The per-resolution settings the preset's trainer will use on this machine."""
    import torch

    from .models import use_channels_last
    from .recipe import default_per_gpu_batch

    cuda = torch.cuda.is_available()
    if cuda:
        from .launch import resolve_nproc

        processes, device = resolve_nproc(preset.train.gpus), "cuda"
    else:
        processes, device = preset.train.cpu_processes, "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 1 if processes > 1 else cores  # torchrun gives each of several processes one thread
    settings = []
    for resolution in preset.resolutions:
        options = preset.train_options(resolution)
        batch = options.get("batch_size") or default_per_gpu_batch(resolution, device)
        channels_last = use_channels_last(device, str(options.get("channels_last", "auto")))
        settings.append(Setting(int(resolution), int(batch), processes, threads, channels_last, device))
    return settings


def _measure(setting: Setting) -> tuple[float, float]:
    """(training, inference) images per second of one process at ``setting`` (run in a child),
    with the trainer's own optimizer step (:func:`cxrlib.throughput.measure_model`)."""
    import torch

    from .models import amp_dtype
    from .throughput import measure_model

    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    device = torch.device(setting.device)
    measured = measure_model(
        setting.resolution,
        setting.batch,
        device,
        amp_dtype(device),
        CALIBRATION_STEPS,
        1,
        channels_last=setting.channels_last,
    )
    return measured["train_img_s"], measured["infer_img_s"]


def _measure_side_by_side(setting: Setting, pool) -> tuple[float, float]:
    """Total rates of ``setting.processes`` children of ``pool`` measuring at once (CPU: they share
    the memory bandwidth as torchrun's processes do), or of one child's GPU times the GPUs."""
    copies = 1 if setting.device == "cuda" else setting.processes
    results = pool.map(_measure, [setting] * copies, chunksize=1)
    scale = setting.processes / copies
    return scale * sum(r[0] for r in results), scale * sum(r[1] for r in results)


def calibrate(preset: Preset, progress: bool = True) -> dict[int, dict[str, float]]:
    """Training and inference images/s per resolution for this preset on this machine (kept).

    Every measurement runs in a spawned child process, never in the caller's: a GPU measurement
    leaves the memory it used cached by PyTorch's allocator in its process (about 90 GiB after
    2048 px on an H200), which the trainings that follow could then not have.
    """
    path = cache_dir() / "calibration.json"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    machine = machine_label()
    settings = training_settings(preset)
    missing = [s for s in settings if s.key(machine) not in kept]
    if missing:
        children = max(1 if s.device == "cuda" else s.processes for s in missing)
        with multiprocessing.get_context("spawn").Pool(children) as pool:
            for setting in missing:
                if progress:
                    print(f"  calibrating {setting.resolution} px ...", flush=True)
                train, infer = _measure_side_by_side(setting, pool)
                kept[setting.key(machine)] = {
                    "train_img_s": train, "infer_img_s": infer, "measured": time.strftime("%Y-%m-%d")
                }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(kept, indent=1), path)
    rates = ("train_img_s", "infer_img_s")
    return {s.resolution: {k: kept[s.key(machine)][k] for k in rates} for s in settings}


# ----------------------------------------------------------------------------- step times


def _settings_digest(preset: Preset) -> str:
    settings = json.dumps(
        preset.to_dict() | {"run_dir": None, "figures_dir": None}, sort_keys=True, default=str
    )
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _times_path() -> Path:
    return cache_dir() / "step_times.json"


def recorded_step_times(preset: Preset) -> dict[str, float]:
    """Seconds of each step the last time this machine ran it with these settings."""
    try:
        kept = json.loads(_times_path().read_text())
    except (OSError, ValueError):
        return {}
    return kept.get(f"{machine_label()}|{_settings_digest(preset)}", {})


def record_step_time(preset: Preset, step: str, seconds: float) -> None:
    """Keep a finished step's time for the next estimate on this machine."""
    path = _times_path()
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    kept.setdefault(f"{machine_label()}|{_settings_digest(preset)}", {})[step] = round(seconds, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(kept, indent=1), path)


# ----------------------------------------------------------------------------- the estimate


def _roles(index: pd.DataFrame, folds: pd.DataFrame, fold: int) -> dict[str, int]:
    counts = folds[f"role_{fold}"].value_counts()
    return {role: int(counts.get(role, 0)) for role in ("train", "val", "test")}


def training_seconds(
    preset: Preset, rates: dict[str, float], roles: dict[str, int], resolution: int
) -> float:
    """One fold at one resolution: its epochs (training + validation), final predictions, start-up."""
    options = preset.train_options(resolution)
    train = min(roles["train"], options.get("max_train_images") or roles["train"])
    epochs = int(options.get("epochs", preset.train.epochs))
    per_epoch = train / rates["train_img_s"] + roles["val"] / rates["infer_img_s"]
    final = (roles["val"] + roles["test"]) / rates["infer_img_s"]
    return TRAIN_START_SECONDS + epochs * per_epoch + final


def estimate(
    preset: Preset, rates: dict[int, dict[str, float]], index: pd.DataFrame, folds: pd.DataFrame
) -> dict[str, float]:
    """Expected seconds of every step (``03_train_res<R>`` per resolution), in pipeline order."""
    folds_trained = preset.trained_folds()
    roles = [_roles(index, folds, f) for f in folds_trained]
    resolutions = preset.resolutions
    workers = preset.cache.workers or os.cpu_count() or 1
    images = len(index)
    size = preset.data.max_size or 3056
    tests = sum(r["test"] for r in roles)
    infer = {r: rates[r]["infer_img_s"] for r in resolutions}
    grad = {r: infer[r] / BACKWARD_FACTOR for r in resolutions}
    expected: dict[str, float] = {}
    render = (
        images * RENDER_SECONDS_AT_256 * (size / 256) ** 2 / workers if preset.data.source == "phantom" else 0
    )
    expected["00_data"] = KERNEL_SECONDS + render + 2
    expected["01_image_sizes"] = KERNEL_SECONDS + 3
    expected["02_downscale"] = KERNEL_SECONDS + images * len(resolutions) * CACHE_SECONDS_PER_IMAGE / workers
    for r in resolutions:
        expected[f"03_train_res{r}"] = KERNEL_SECONDS + sum(
            training_seconds(preset, rates[r], role, r) for role in roles
        )
    cross = sum(tests / infer[t] for r in resolutions for t in resolutions if t != r)
    expected["04_evaluate"] = KERNEL_SECONDS + 10 + cross
    probes = 8  # random translations per image (receptive_field.effective_receptive_field)
    erf = sum(2 * preset.analysis.erf_images * probes / grad[r] for r in resolutions)
    expected["05_receptive_field"] = KERNEL_SECONDS + 3 + erf
    cams = len(preset.analysis.gradcam_findings)
    expected["06_gradcam"] = KERNEL_SECONDS + 3 + sum(cams * 4 / grad[r] for r in resolutions)
    expected["07_ensemble"] = KERNEL_SECONDS + 10
    steps = preset.analysis.throughput_steps
    expected["08_throughput"] = KERNEL_SECONDS + sum(
        steps * 16 * (2 / rates[r]["train_img_s"] + 1 / infer[r]) for r in resolutions
    )
    expected["09_receptive_field_explained"] = KERNEL_SECONDS + 40
    expected["10_field_sweep"] = field_sweep_seconds(preset, rates, roles)
    recorded = recorded_step_times(preset)
    return {name: recorded.get(name, seconds) for name, seconds in expected.items()}


def field_sweep_seconds(
    preset: Preset, rates: dict[int, dict[str, float]], roles: list[dict[str, int]]
) -> float:
    """Notebook 10: each arm it still has to train (an arm costs what the plain model does at the same
    resolution, per epoch it runs; one that continues another runs only its extra epochs) and its
    analysis (ERF and tests per arm)."""
    from . import field_sweep, paths

    resolution = field_sweep.sweep_resolution(preset)
    if resolution not in rates:
        return KERNEL_SECONDS + FIELD_SWEEP_ANALYSIS_S
    arms, epochs = preset.field_sweep.arms, int(preset.train_options(resolution)["epochs"])
    trainings = 0.0
    for fold, role in zip(preset.trained_folds(), roles, strict=True):
        for arm, folder in field_sweep.arm_folders(preset, fold).items():
            if (folder / paths.DONE).is_file():
                continue
            runs = int(arms[arm].get("epochs", epochs))
            source = arms[arm].get("continue_from")
            done_before = int(arms[source].get("epochs", epochs)) if source else 0
            trainings += (
                training_seconds(preset, rates[resolution], role, resolution) * (runs - done_before) / epochs
            )
    return KERNEL_SECONDS + trainings + FIELD_SWEEP_ANALYSIS_S


def clock(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``40s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_plan(expected: dict[str, float], done: dict[str, float], machine: str) -> str:
    """The table printed before the long work: each step's expected (or actual) time and the total."""
    lines = [f"expected time on this machine ({machine}):"]
    for name, seconds in expected.items():
        if name in done:
            lines.append(f"  {name:<32} {clock(done[name]):>8}  (done)")
        else:
            lines.append(f"  {name:<32} {clock(seconds):>8}")
    total = sum(done.get(name, seconds) for name, seconds in expected.items())
    left = sum(seconds for name, seconds in expected.items() if name not in done)
    lines.append(f"  {'whole run':<32} {clock(total):>8}  ({clock(left)} left, ends about "
                 f"{time.strftime('%H:%M', time.localtime(time.time() + left))})")  # fmt: skip
    return "\n".join(lines)


def format_comparison(expected: dict[str, float], actual: dict[str, float]) -> str:
    """Expected against actual seconds of the steps that ran, and of the whole run."""
    lines = [f"  {'step':<32} {'expected':>8} {'actual':>8}"]
    for name, seconds in expected.items():
        if name in actual:
            lines.append(f"  {name:<32} {clock(seconds):>8} {clock(actual[name]):>8}")
    shared = [name for name in expected if name in actual]
    total_expected, total_actual = (sum(d[n] for n in shared) for d in (expected, actual))
    lines.append(f"  {'whole run':<32} {clock(total_expected):>8} {clock(total_actual):>8}")
    return "time per step, as expected before training and as it was:\n" + "\n".join(lines)
