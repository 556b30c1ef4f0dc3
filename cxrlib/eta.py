"""Expected time of each pipeline step on this machine, from a short calibration it keeps in
``~/.cache/cxrlib/calibration.json`` (``CXR_CACHE_DIR``); how each step is modelled: docs/pipeline.md."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pandas as pd
import torch

from . import field_sweep, paths, study
from .fileio import write_text_atomic
from .models import amp_dtype, describe_cpu, use_channels_last
from .presets import Preset
from .recipe import default_per_gpu_batch
from .throughput import measure_model

KERNEL_SECONDS = 6.0  # papermill: start a kernel, import torch and cxrlib, save the notebook
TRAIN_START_SECONDS = 12.0  # torchrun, the processes' imports, the model, the first batches
MINOR_STEP_SECONDS = 30.0  # a step after training that neither trains nor scores every test image
FIELD_SWEEP_ANALYSIS_S = 60.0  # notebook 10 besides its trainings (4 arms, 128 px, 2-core AVX2 CPU)
CALIBRATION_STEPS = 2  # timed steps per resolution, after one untimed warm-up step
RATES = ("train_img_s", "infer_img_s")  # images per second of one training / inference step


def machine_label() -> str:
    """The CPU (model, cores, extensions) and the GPUs, as one line."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return describe_cpu() + (f"; GPUs: {', '.join(gpus)}" if gpus else "")


def training_settings(preset: Preset) -> list[tuple]:
    """Per resolution: (resolution, per-process batch, processes, threads, channels_last, device)."""
    processes, device = study.training_processes(preset), "cuda" if torch.cuda.is_available() else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 1 if processes > 1 else cores  # torchrun gives each of several processes one thread
    settings = []
    for resolution in preset.resolutions:
        options = preset.train_options(resolution)
        batch = options.get("batch_size") or default_per_gpu_batch(resolution, device)
        channels_last = use_channels_last(device, str(options.get("channels_last", "auto")))
        settings.append((int(resolution), int(batch), processes, threads, channels_last, device))
    return settings


def _measure(setting: tuple) -> tuple[float, float]:
    """(training, inference) images/s of one process at ``setting`` with the trainer's optimizer step."""
    resolution, batch, _, threads, layout, name = setting  # layout: channels_last
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(name)
    amp = amp_dtype(device)
    measured = measure_model(resolution, batch, device, amp, CALIBRATION_STEPS, 1, channels_last=layout)
    return measured["train_img_s"], measured["infer_img_s"]


def _measure_side_by_side(setting: tuple, pool) -> tuple[float, float]:
    """Total rates of the processes measuring at once (sharing the memory bandwidth), or one GPU's x GPUs."""
    processes, device = setting[2], setting[5]
    copies = 1 if device == "cuda" else processes
    results = pool.map(_measure, [setting] * copies, chunksize=1)
    return tuple(processes / copies * sum(r[i] for r in results) for i in (0, 1))


def calibrate(preset: Preset, progress: bool = True) -> dict[int, dict[str, float]]:
    """Training and inference images/s per resolution on this machine (kept), measured in spawned children:
    a GPU measurement leaves its memory cached in its process (90 GiB at 2048 px), lost to the trainings."""
    path = Path(os.environ.get("CXR_CACHE_DIR", Path.home() / ".cache" / "cxrlib")) / "calibration.json"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    settings, machine = training_settings(preset), [machine_label(), str(torch.__version__)]
    keys = {s: json.dumps([*machine, *s]) for s in settings}
    missing = [s for s in settings if keys[s] not in kept]
    if missing:
        children = max(1 if s[5] == "cuda" else s[2] for s in missing)
        with multiprocessing.get_context("spawn").Pool(children) as pool:
            for setting in missing:
                if progress:
                    print(f"  calibrating {setting[0]} px ...", flush=True)
                rates = dict(zip(RATES, _measure_side_by_side(setting, pool), strict=True))
                kept[keys[setting]] = {**rates, "measured": time.strftime("%F")}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(kept, indent=1), path)
    return {s[0]: {k: kept[keys[s]][k] for k in RATES} for s in settings}


def _roles(folds: pd.DataFrame, fold: int) -> dict[str, int]:
    counts = folds[f"role_{fold}"].value_counts()
    return {role: int(counts.get(role, 0)) for role in ("train", "val", "test")}


def training_seconds(preset: Preset, rates: dict, roles: dict[str, int], resolution: int) -> float:
    """One fold at one resolution: its epochs (training + validation), final predictions, start-up."""
    options = preset.train_options(resolution)
    train = min(roles["train"], options.get("max_train_images") or roles["train"])
    per_epoch = train / rates["train_img_s"] + roles["val"] / rates["infer_img_s"]
    final = (roles["val"] + roles["test"]) / rates["infer_img_s"]
    return TRAIN_START_SECONDS + int(options["epochs"]) * per_epoch + final


def estimate(preset: Preset, rates: dict[int, dict[str, float]], folds: pd.DataFrame) -> dict[str, float]:
    """Expected seconds of each step from the first training on (the earlier ones ran before), in order."""
    roles, res = [_roles(folds, f) for f in preset.trained_folds()], preset.resolutions
    expected = {f"03_train_res{r}": sum(training_seconds(preset, rates[r], x, r) for x in roles) for r in res}
    tests = sum(x["test"] for x in roles)  # 04_evaluate scores each model's test images at the others
    expected["04_evaluate"] = sum(tests / rates[t]["infer_img_s"] for r in res for t in res if t != r)
    expected |= dict.fromkeys(("05_receptive_field", "06_gradcam", "07_ensemble"), MINOR_STEP_SECONDS)
    expected |= dict.fromkeys(("08_throughput", "09_receptive_field_explained"), MINOR_STEP_SECONDS)
    expected["10_field_sweep"] = field_sweep_seconds(preset, rates, roles)
    return {name: KERNEL_SECONDS + seconds for name, seconds in expected.items()}


def field_sweep_seconds(preset: Preset, rates: dict[int, dict], roles: list[dict[str, int]]) -> float:
    """Notebook 10: each arm's epochs still to train (after the arm it continues), at the model's rate."""
    resolution = field_sweep.sweep_resolution(preset)
    if resolution not in rates:
        return FIELD_SWEEP_ANALYSIS_S
    arms, epochs = preset.field_sweep.arms, int(preset.train_options(resolution)["epochs"])
    runs = {arm: int(settings.get("epochs", epochs)) for arm, settings in arms.items()}
    trainings = 0.0
    for fold, role in zip(preset.trained_folds(), roles, strict=True):
        one = training_seconds(preset, rates[resolution], role, resolution) / epochs
        for arm, folder in field_sweep.arm_folders(preset, fold).items():
            if not (folder / paths.DONE).is_file():  # an arm continuing another runs its extra epochs
                trainings += one * (runs[arm] - runs.get(arms[arm].get("continue_from"), 0))
    return trainings + FIELD_SWEEP_ANALYSIS_S


def clock(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``40s``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def forecast(preset: Preset, done: dict[str, float], names: list[str]) -> dict[str, float] | None:
    """Print and return the expected seconds of each step in ``names``; None (said) on a failure."""
    try:
        known = done | estimate(preset, calibrate(preset), study.load_data(preset)[1])
        expected = {name: known[name] for name in names if name in known}
        machine = machine_label()
    except Exception as error:  # noqa: BLE001 - a failed estimate must not stop the study
        print(f"(no time estimate: {type(error).__name__}: {error})", flush=True)
        return None
    print(f"expected time on this machine ({machine}):")
    for n, s in expected.items():
        print(f"  {n:<32} {clock(done.get(n, s)):>8}{'  (done)' if n in done else ''}")
    left = sum(s for n, s in expected.items() if n not in done)
    ends = time.strftime("%H:%M", time.localtime(time.time() + left))
    total = clock(sum(done.get(n, s) for n, s in expected.items()))
    print(f"  {'whole run':<32} {total:>8}  ({clock(left)} left, ends about {ends})", flush=True)
    return expected
