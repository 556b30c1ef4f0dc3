"""The `phantom-gpu` study on one GPU in one prepared run: every notebook, a time limit, packed results.

Run by ``benchmarks/phantom_gpu_session.sh`` (see it, and docs/performance.md, for the command a
GPU session runs). On a bare GPU machine (PyTorch and the scientific stack, no papermill, nbformat
or IPython, nothing installable) this runs the pipeline's steps in the pipeline's order with the
pipeline's parameters, executing each numbered notebook's own code cells in this process
(:mod:`notebook_runner`), so the notebooks stay the single source of truth:

1. ``phantom``: :func:`cxrlib.phantom.ensure_phantom` with every core (00_data would use at most 8;
   the bytes are the same with any number of workers, so 00_data then finds it complete);
2. ``00_data`` ... ``08_throughput`` in order (``03_train`` once per resolution), each step's
   notebook with the parameters ``python -m cxrlib.pipeline`` passes (:func:`cxrlib.pipeline.step_settings`);
   ``09_receptive_field_explained`` (the teaching notebook: it needs only the data and the cache,
   and its cost is CPU rendering) runs beside the training in a second process, started after
   ``02_downscale``; it is run in the foreground at the end instead if that failed and time allows;
3. ``compile``: ``torch.compile`` of training at 256 and 512 px against eager, modes ``default``
   and ``max-autotune-no-cudagraphs`` (``benchmarks/bench_throughput.py --parts compile``, one child
   per measurement, cold compile caches), with whatever time is left;
4. ``pack``: tables, figures, histories, logs, executed notebooks and ``session.json`` into
   ``$OUT/phantom_gpu_session.tar.gz``, plus ``session.json`` and ``summary.md`` beside it.

Time limit: ``--budget-seconds`` (540 on the GPU) counts from the start. A step is started only while
time is left; the optional ones (compile first, then the teaching notebook) only when their planned
time fits. At ``budget - reserve`` a running step is stopped (the trainer's whole process group), the
remaining steps are marked ``not reached`` and what exists is packed: a run never ends without its
results. Running the same command again resumes: a step whose outputs are complete and whose
settings and notebook are unchanged is skipped (the pipeline's own test and stamps, so
``python -m cxrlib.pipeline --preset phantom-gpu --list`` agrees), and training resumes from its
last checkpoint.

Each step's planned seconds (:func:`plan_seconds`, from the H200 rates recorded in the README and
the CPU costs measured for the preset; the preset's comments hold the same arithmetic) are printed
beside its measured wall time. ``--dry-run`` runs the same driver on the CPU on a tiny variant of
the preset (:func:`dry_run_settings`), as on a bare machine (papermill, nbformat, IPython and
ipywidgets made unimportable); ``tests/test_phantom_gpu_session.py`` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()  # the time limit counts from here, before the heavy imports
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from notebook_runner import NotebookExecutionError, execute_notebook  # noqa: E402

PRESET = "phantom-gpu"
TEACHING = "09_receptive_field_explained"
PACK_NAME = "phantom_gpu_session.tar.gz"
MAX_PACK_BYTES = 15 * 2**20  # files come back from $OUT up to 16 MiB each
BARE_MACHINE_MISSING = ("papermill", "nbformat", "IPython", "ipykernel", "ipywidgets")
COMPILE_PLAN = ((256, "default"), (512, "default"), (256, "max-autotune-no-cudagraphs"),
                (512, "max-autotune-no-cudagraphs"))  # fmt: skip

# ----------------------------------------------------------------------------- the plan
# Recorded on one H200 (README, "Performance": bf16 autocast, channels_last, end to end, img/s).
H200_TRAIN_IMG_S = {256: 2120, 512: 596, 1024: 149, 2048: 37}
H200_INFER_IMG_S = {256: 5681, 512: 1932, 1024: 486, 2048: 124}
# Small batches are launch-bound: at a batch of 32, 256 / 512 px trained at 480-532 / 378-401 img/s
# (docs/performance.md, benchmarks/phantom_gpu_quick.sh on the H200): the time of one step at most.
H200_STEP_FLOOR_S = {256: 32 / 506, 512: 32 / 390}
EPOCH1_EXTRA_S = 33.0  # epoch 1 of each run: 28-38 s more (cuDNN autotuning, worker start-up), H200
RUN_START_END_S = 12.0  # torchrun, model, workers, final predictions' set-up (estimate: ~1 min per run there)
CHECKPOINT_S = 1.0  # per epoch: checkpoint (~100 MB) and best model, with their SHA-256 (estimate)
# CPU seconds per image on one core of the 2-core AMD EPYC (AVX2) of the development machine,
# measured for this preset: rendering a phantom image capped at 2048 px (JPEG included), caching
# it at 256 / 512 / 1024 / 2048 px, and one native-size rendering (the teaching notebook's figure).
RENDER_2048_CPU_S = 0.79
CACHE_CPU_S = {"jpg": 0.122, "png": 0.325}
NATIVE_RENDER_CPU_S = 3.0
PHANTOM_MAIN_CPU_S = 0.006  # per image in the main process (planning, writing, tables)
# The GPU machine's cores are slower: its cache build cost 36.6 ms per image and process against
# 28 ms of CPU here for the same work (docs/performance.md).
GPU_MACHINE_CORE_FACTOR = 1.3
# 04_evaluate / 07_ensemble on the CPU, measured here for 981 test images, 4 resolutions and both
# ensembles: 1.2 s + 0.0101 s per bootstrap resample (CPU seconds, one thread).
EVALUATE_CPU_S = (1.2, 0.0101)
LOADER_START_S = 1.0  # a DataLoader with 8 workers (estimate)
MODEL_LOAD_S = 0.5  # a best_model.pt onto the GPU (estimate)
# ERF, float32, 8 probes, per image: measured on an H200 for 4 images (cxrlib/receptive_field.py:
# 0.4 / 0.4 / 1.3 / 5.4 s at 256 / 512 / 1024 / 2048 px, batch 1).
H200_ERF_S_PER_IMAGE = {256: 0.1, 512: 0.1, 1024: 0.325, 2048: 1.35}


@dataclass(frozen=True)
class Split:
    """Images per role of the trained fold, and what the trainer uses of them."""

    images: int
    train: int
    val: int
    test: int
    train_used: int
    batch: int
    epochs: int

    @property
    def steps(self) -> int:
        """Optimizer steps of each resolution's run (the same at every resolution)."""
        return self.epochs * math.ceil(self.train_used / self.batch)


def phantom_split(preset) -> Split:
    """The split the preset's phantom will have, from its plan alone (nothing is rendered)."""
    from cxrlib import phantom, splits

    entries, _ = phantom.plan_dataset(preset.data.subjects, preset.data.seed, **preset.data.phantom_options)
    if preset.data.views != "all":
        raise ValueError(f"preset {preset.name!r}: the session's plan assumes data.views all")
    frame = {"dicom_id": [e["dicom_id"] for e in entries], "subject_id": [e["subject_id"] for e in entries]}
    import pandas as pd

    folds = splits.make_folds(
        pd.DataFrame(frame), k=preset.folds.k, seed=preset.folds.seed, val_fraction=preset.folds.val_fraction
    )
    roles = folds[f"role_{preset.trained_folds()[0]}"].value_counts()
    options = preset.train_options(preset.resolutions[0])
    train = int(roles.get("train", 0))
    used = min(train, int(options.get("max_train_images") or train))
    return Split(
        len(frame["dicom_id"]), train, int(roles.get("val", 0)), int(roles.get("test", 0)), used,
        int(options.get("effective_batch") or options.get("batch_size") or 1), int(options["epochs"]),
    )  # fmt: skip


def rate(table: dict[int, float], resolution: int) -> float:
    """``table``'s img/s at ``resolution``; other resolutions (the dry run's) scaled by pixel count."""
    return table[resolution] if resolution in table else table[256] * (256 / resolution) ** 2


def step_seconds(resolution: int, batch: int) -> float:
    """One optimizer step of ``batch`` images at ``resolution`` on the H200."""
    floor = H200_STEP_FLOOR_S.get(resolution, H200_STEP_FLOOR_S[256] if resolution < 256 else 0.0)
    return max(batch / rate(H200_TRAIN_IMG_S, resolution), floor)


def plan_seconds(preset, split: Split, cores: int = 16) -> dict[str, float]:
    """Planned wall seconds of each step on one H200 with ``cores`` CPU cores (see the constants)."""
    per_core = GPU_MACHINE_CORE_FACTOR / cores
    n_img, n_val, n_test = split.images, split.val, split.test
    resolutions = preset.resolutions
    inference = {r: 1 / rate(H200_INFER_IMG_S, r) for r in resolutions}
    analysis = preset.analysis
    evaluate = (EVALUATE_CPU_S[0] + EVALUATE_CPU_S[1] * analysis.bootstrap) * n_test / 1000
    evaluate *= GPU_MACHINE_CORE_FACTOR
    plan = {
        "setup": 5.0,  # this driver's start (the machine is probed beside the phantom)
        "phantom": n_img * (RENDER_2048_CPU_S * per_core + PHANTOM_MAIN_CPU_S * GPU_MACHINE_CORE_FACTOR) + 3,
        "00_data": 2.0,
        "01_image_sizes": 3.0,
        "02_downscale": n_img * CACHE_CPU_S[preset.cache.format] * per_core + 3,
    }
    for r in resolutions:
        plan[f"03_train_res{r}"] = (
            RUN_START_END_S
            + EPOCH1_EXTRA_S
            + split.steps * step_seconds(r, split.batch)
            + split.epochs * (n_val * inference[r] + CHECKPOINT_S)
            + (n_val + n_test) * inference[r]
        )
    others = len(resolutions) - 1
    cells = len(resolutions) * others
    plan["04_evaluate"] = (
        evaluate + 5 + n_test * others * sum(inference.values()) + cells * LOADER_START_S
        + len(resolutions) * MODEL_LOAD_S
    )  # fmt: skip
    plan["05_receptive_field"] = (
        5 + 2 * analysis.erf_images * sum(H200_ERF_S_PER_IMAGE.get(r, 0.1) for r in resolutions)
        + 2 * len(resolutions) * MODEL_LOAD_S
    )  # fmt: skip
    plan["06_gradcam"] = 5 + len(resolutions) * MODEL_LOAD_S
    plan["07_ensemble"] = evaluate + 3
    steps = analysis.throughput_steps + 3  # timed + warm-up, training and inference, auto batch
    batch = {256: 256, 512: 256, 1024: 64, 2048: 16}  # the trainer's automatic batch with ~139 GiB free
    plan["08_throughput"] = sum(
        steps * batch.get(r, 256) * (1 / rate(H200_TRAIN_IMG_S, r) + 1 / rate(H200_INFER_IMG_S, r)) + 1.5
        for r in resolutions
    )
    # 28 native-size renderings (14 findings, with and without) on one core, and small CPU ERFs.
    plan[TEACHING] = 28 * NATIVE_RENDER_CPU_S * GPU_MACHINE_CORE_FACTOR + 15
    plan["pack"] = 5.0
    return {name: round(seconds, 1) for name, seconds in plan.items()}


def critical_path(plan: dict[str, float]) -> float:
    """Planned wall seconds of the run: every step but the teaching notebook (beside the training)."""
    return sum(seconds for name, seconds in plan.items() if name != TEACHING)


# ----------------------------------------------------------------------------- dry run


def dry_run_settings(settings: dict[str, Any], root: Path) -> dict[str, Any]:
    """The preset's settings at tiny sizes for a CPU: 32 / 64 px, 40 patients, 1 epoch."""
    tiny = json.loads(json.dumps(settings))
    tiny["description"] = f"CPU dry run of {PRESET}: " + tiny.get("description", "")
    tiny["resolutions"] = [32, 64]
    tiny["data"].update(subjects=40, max_size=128, root=str(root / "phantom"))
    tiny.setdefault("cache", {})["workers"] = 2
    tiny["train"].update(epochs=1, gpus=1, per_resolution={})
    tiny["train"]["options"] = {"batch_size": 8, "effective_batch": 8, "lr": 0.001, "workers": 0}
    tiny.setdefault("analysis", {}).update(erf_images=2, bootstrap=20, throughput_steps=1, device="cpu")
    return tiny


# ----------------------------------------------------------------------------- bookkeeping


class TimeLimitReached(BaseException):
    """Raised in the running step when the session's time is up (a BaseException, like Ctrl-C)."""


_ALARM_ARMED = False  # the alarm raises only while a step's body runs


def _on_alarm(signum, frame):
    if _ALARM_ARMED:
        raise TimeLimitReached("the session's time limit was reached")


def run_child(command: list[str], timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run ``command`` in its own process group; returns its exit code, or None when stopped at
    ``timeout`` (or by the time limit): then the group gets SIGTERM, and SIGKILL 10 s later."""
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait(timeout=max(timeout, 0.01))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # bench_throughput stops its own compile child
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class StepRecord:
    name: str
    planned_s: float | None = None
    status: str = (
        "pending"  # done | skipped (complete) | skipped (time) | failed | stopped (time limit) | ...
    )
    seconds: float | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None


@dataclass
class Session:
    """Everything ``session.json`` records."""

    mode: str
    budget_seconds: float
    started: str
    preset: str
    command: list[str]
    git: dict[str, Any]
    source_sha256: str
    machine: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, float] = field(default_factory=dict)
    planned_total_s: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    compile: list[dict[str, Any]] = field(default_factory=list)
    finished: str | None = None
    elapsed_s: float | None = None

    def step(self, name: str) -> StepRecord:
        for record in self.steps:
            if record.name == name:
                return record
        record = StepRecord(name, self.plan.get(name))
        self.steps.append(record)
        return record

    def write(self, path: Path) -> None:
        from cxrlib.fileio import write_text_atomic

        write_text_atomic(json.dumps(asdict(self), indent=1, default=str) + "\n", path)


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def source_sha256() -> str:
    """One SHA-256 over the code that decides the results (the copy on the GPU machine has no .git)."""
    digest = hashlib.sha256()
    patterns = ("cxrlib/**/*.py", "cxrlib/presets/*.yaml", "notebooks/*.ipynb", "benchmarks/*.py")
    for path in sorted({p for pattern in patterns for p in ROOT.glob(pattern)}):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


MACHINE_PROBE = r"""
import json, os, platform, sys, torch, torchvision
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
        "host": platform.node(), "gpus": []}
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
print(json.dumps(info))
"""


def start_machine_probe() -> subprocess.Popen:
    """Versions, cores and GPUs, probed in a child process while the run starts (this process keeps
    CUDA uninitialised until the analysis steps, so the phantom's and the cache's worker processes
    start from a clean parent); :func:`describe_machine` collects it."""
    return subprocess.Popen(
        [sys.executable, "-c", MACHINE_PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def describe_machine(probe: subprocess.Popen) -> dict[str, Any]:
    """The probe's findings and ``nvidia-smi``'s view of the GPUs."""
    try:
        stdout, stderr = probe.communicate(timeout=120)
        info = json.loads(stdout) if probe.returncode == 0 else {"probe_error": stderr[-500:]}
    except subprocess.TimeoutExpired:
        probe.kill()
        info = {"probe_error": "no answer in 120 s"}
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


# ----------------------------------------------------------------------------- running steps


@dataclass
class Context:
    """The resolved run: the preset argument the notebooks get, the preset, the user's overrides."""

    preset_arg: str
    preset: Any
    overrides: dict[str, Any]
    hide_modules: tuple[str, ...]


def resolve_context(args: argparse.Namespace) -> Context:
    """The preset (or its dry-run variant, written as a YAML file) and the run's folders."""
    import yaml

    from cxrlib.pipeline import resolve_run
    from cxrlib.presets import _preset_file

    folders: dict[str, str | None] = {"run_dir": None, "figures_dir": None}
    preset_arg = args.preset
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        folders = {"run_dir": str(work / "run"), "figures_dir": str(work / "figures")}
        if args.dry_run:
            settings = yaml.safe_load(_preset_file(args.preset).read_text())
            tiny = dry_run_settings(settings, work)
            preset_file = work / f"{Path(str(args.preset)).stem}-dry-run.yaml"
            preset_file.parent.mkdir(parents=True, exist_ok=True)
            preset_file.write_text(yaml.safe_dump(tiny, sort_keys=False))
            preset_arg = str(preset_file)
    elif args.dry_run:
        raise SystemExit("error: --dry-run needs --work-dir (the tiny run is written there)")
    preset_arg, preset, overrides = resolve_run(preset_arg, **folders)
    hide = BARE_MACHINE_MISSING if args.dry_run else ()
    return Context(preset_arg, preset, overrides, hide)


def run_notebook_step(ctx: Context, step, resolution: int | None, provenance: dict[str, Any]) -> float:
    """Execute one step's notebook as the pipeline would and record it as the pipeline does."""
    from cxrlib.fileio import write_text_atomic
    from cxrlib.pipeline import PipelineError, _stamp_path, data_hashes, step_settings

    preset = ctx.preset
    name = step.name(resolution)
    notebook, parameters, fingerprint = step_settings(ctx.preset_arg, preset, ctx.overrides, step, resolution)
    output = preset.run_path / f"{name}.ipynb"
    env_path = str(Path(sys.executable).parent)
    if env_path not in os.environ.get("PATH", "").split(os.pathsep):  # torchrun finds this Python
        os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    record = {**provenance, "step": name, "parameters": parameters}
    seconds = execute_notebook(notebook, output, parameters, hide_modules=ctx.hide_modules, metadata=record)
    missing = [str(p) for p in step.outputs(preset, resolution) if not p.is_file()]
    if missing:
        raise PipelineError(f"{name} finished but did not write {missing}; see {output}")
    executed = json.loads(output.read_text())
    executed["metadata"]["cxr_provenance"]["data_hashes"] = data_hashes(preset)
    write_text_atomic(json.dumps(executed, indent=1, default=str) + "\n", output)
    stamp = {"fingerprint": fingerprint, "finished": now(), "seconds": round(seconds, 1)}
    write_text_atomic(json.dumps(stamp), _stamp_path(preset, name))
    return seconds


def is_complete(ctx: Context, step, resolution: int | None) -> bool:
    from cxrlib.pipeline import step_is_complete, step_settings

    fingerprint = step_settings(ctx.preset_arg, ctx.preset, ctx.overrides, step, resolution)[2]
    return step_is_complete(ctx.preset, step, resolution, fingerprint)


class Runner:
    """Runs the steps in order under the time limit and keeps ``session.json`` current."""

    def __init__(self, args: argparse.Namespace, ctx: Context, out: Path):
        from cxrlib.pipeline import git_commit, package_versions

        self.args, self.ctx, self.out = args, ctx, out
        self.t0 = STARTED
        self.budget = float(args.budget_seconds)
        self.reserve = float(args.reserve_seconds)
        git = {**git_commit(), "CXR_COMMIT": os.environ.get("CXR_COMMIT")}  # the copy may have no .git
        git["commit"] = git["commit"] or git["CXR_COMMIT"]
        self.session = Session(
            mode="CPU dry run" if args.dry_run else "GPU",
            budget_seconds=self.budget,
            started=now(),
            preset=ctx.preset_arg,
            command=[Path(sys.executable).name, *sys.argv],
            git=git,
            source_sha256=source_sha256(),
        )
        self.provenance = {
            "preset": ctx.preset_arg,
            "settings": ctx.preset.to_dict(),
            "overrides": ctx.overrides,
            "command": self.session.command,
            "started": self.session.started,
            "git": git,
            "packages": package_versions(),
            "steps": {},
        }
        self.rerun_rest = False
        self.stopped = False
        self.background: subprocess.Popen | None = None
        self.background_started = 0.0

    # -- time
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds until the point where running steps are stopped (the budget less the reserve)."""
        return self.budget - self.reserve - self.elapsed()

    def save(self) -> None:
        self.session.elapsed_s = round(self.elapsed(), 1)
        self.session.write(self.out / "session.json")
        if self.ctx.preset.run_path.is_dir():
            from cxrlib.fileio import write_text_atomic

            self.provenance["machine"] = self.session.machine
            path = self.ctx.preset.run_path / "provenance.json"
            write_text_atomic(json.dumps(self.provenance, indent=2, default=str), path)

    def banner(self, index: int, total: int, name: str, text: str) -> None:
        print(f"=== [{index}/{total}] {name:<30} {text} (at {self.elapsed():.0f} s)", flush=True)

    # -- one step
    def run(self, name: str, body, optional: bool = False, index: int = 0, total: int = 0) -> bool:
        """Run ``body`` as step ``name`` under the time limit; True when it finished."""
        record = self.session.step(name)
        planned = record.planned_s or 0.0
        if self.stopped:
            record.status = "not reached (time limit)"
            return False
        if self.left() < (planned if optional else self.args.min_start_seconds):
            record.status = "skipped (time limit)"
            self.banner(index, total, name, f"skipped: {self.left():.0f} s left, planned {planned:.0f} s")
            self.save()
            return False
        self.banner(index, total, name, f"running, planned {planned:.0f} s")
        record.started, record.status = now(), "running"
        self.save()
        started = time.monotonic()
        global _ALARM_ARMED
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        _ALARM_ARMED = True
        try:
            body()
            record.status = "done"
        except TimeLimitReached:
            record.status, self.stopped = "stopped (time limit)", True
        except KeyboardInterrupt:
            record.status, self.stopped = "interrupted", True
        except Exception as error:  # one failed step must not lose the others
            traceback.print_exc()
            record.status, record.error = "failed", f"{type(error).__name__}: {str(error)[:800]}"
        finally:
            _ALARM_ARMED = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        record.seconds, record.finished = round(time.monotonic() - started, 1), now()
        self.provenance["steps"][name] = {"seconds": record.seconds, "finished": record.finished}
        self.banner(index, total, name, f"{record.status} after {record.seconds:.0f} s")
        self.save()
        return record.status == "done"

    def notebook(self, step, resolution: int | None, index: int, total: int) -> None:
        name = step.name(resolution)
        if not self.rerun_rest and is_complete(self.ctx, step, resolution):
            self.session.step(name).status = "skipped (complete)"
            self.banner(index, total, name, "skipped (complete)")
            return
        ran = self.run(name, lambda: run_notebook_step(self.ctx, step, resolution, self.provenance), False,
                       index, total)  # fmt: skip
        self.rerun_rest = self.rerun_rest or ran  # later steps read what this one wrote

    # -- the teaching notebook beside the training
    def start_background_teaching(self, step) -> None:
        if not self.rerun_rest and is_complete(self.ctx, step, None):
            self.session.step(TEACHING).status = "skipped (complete)"
            return
        log = self.ctx.preset.run_path / f"{TEACHING}.log"
        command = [sys.executable, str(Path(__file__).resolve()), *self.args.argv_for_child, "--run-step",
                   TEACHING]  # fmt: skip
        if shutil.which("nice"):
            command = ["nice", "-n", "10", *command]  # the trainer's data loading comes first
        env = {**os.environ, "OMP_NUM_THREADS": "2"}  # beside the trainer: two threads for its small ERFs
        with open(log, "w") as handle:
            self.background = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.background_started = time.monotonic()
        record = self.session.step(TEACHING)
        record.started, record.status = now(), "running beside the training"
        print(
            f"=== {TEACHING}: started beside the training (pid {self.background.pid}, log {log})", flush=True
        )
        self.save()

    def join_background_teaching(self, step, index: int, total: int) -> None:
        record = self.session.step(TEACHING)
        if self.background is None:
            if record.status == "pending" and not self.stopped:  # not started (02 not run): foreground
                self.run(TEACHING, lambda: run_notebook_step(self.ctx, step, None, self.provenance), True,
                         index, total)  # fmt: skip
            return
        returncode = None
        try:
            returncode = self.background.wait(timeout=max(self.left(), 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(self.background.pid, signal.SIGKILL)
            self.background.wait()
        record.seconds = round(time.monotonic() - self.background_started, 1)
        record.finished = now()
        self.provenance["steps"][TEACHING] = {"seconds": record.seconds, "finished": record.finished}
        log = self.ctx.preset.run_path / f"{TEACHING}.log"
        if returncode == 0:
            record.status = "done (beside the training)"
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
            record.status = "stopped (time limit)" if returncode is None else "failed"
            record.error = " | ".join(tail)[-800:]
        self.banner(index, total, TEACHING, f"{record.status} after {record.seconds:.0f} s")
        self.background = None
        self.save()
        if record.status == "failed" and not self.stopped:
            print(f"=== {TEACHING}: failed beside the training; once more in the foreground", flush=True)
            record.status = "pending"
            self.run(TEACHING, lambda: run_notebook_step(self.ctx, step, None, self.provenance), True,
                     index, total)  # fmt: skip

    # -- torch.compile
    def measure_compile(self) -> None:
        """Each (resolution, mode) of :data:`COMPILE_PLAN` in its own child, while time is left."""
        results = self.ctx.preset.run_path / "compile"
        results.mkdir(parents=True, exist_ok=True)
        plan = ((32, "default"),) if self.args.dry_run else COMPILE_PLAN
        for resolution, mode in plan:
            label = f"compile {resolution} px {mode}"
            left = self.left()
            if left < self.args.min_compile_seconds:
                self.session.compile.append({"resolution": resolution, "mode": mode,
                                             "status": f"skipped: {left:.0f} s left"})  # fmt: skip
                print(f"=== {label}: skipped, {left:.0f} s left", flush=True)
                continue
            limit = min(left - 5, self.args.max_compile_seconds)
            csv = results / f"compile_{resolution}_{mode}.csv"
            command = [
                sys.executable, str(ROOT / "benchmarks" / "bench_throughput.py"), "--parts", "compile",
                "--resolutions", str(resolution), "--compile-resolutions", str(resolution),
                "--compile-mode", mode, "--compile-timeout", f"{limit:.0f}", "--out", str(csv),
            ]  # fmt: skip
            command += ["--device", "cpu", "--quick"] if self.args.dry_run else ["--device", "cuda"]
            with tempfile.TemporaryDirectory(prefix="cold_compile_") as cold:
                # cold caches: a compile time measured from a warm cache of an earlier try means nothing
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cold}/inductor",
                       "TRITON_CACHE_DIR": f"{cold}/triton"}  # fmt: skip
                print(f"=== {label}: up to {limit:.0f} s", flush=True)
                started = time.monotonic()
                returncode = run_child(command, limit + 30, env)  # + start-up and the eager run
                status = "stopped (time limit)" if returncode is None else f"exit code {returncode}"
            rows = []
            if csv.is_file():
                import pandas as pd

                rows = [
                    {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                    for row in pd.read_csv(csv).to_dict("records")
                ]
                notes = [str(r.get("note")) for r in rows if r.get("variant") == "status"]
                compiled = [
                    r for r in rows if r.get("variant") == "train compiled" and r.get("img_s") is not None
                ]
                status = "measured" if compiled and not notes else "; ".join(notes) or status
            entry = {"resolution": resolution, "mode": mode, "status": status,
                     "seconds": round(time.monotonic() - started, 1), "rows": rows}  # fmt: skip
            self.session.compile.append(json.loads(json.dumps(entry, default=str)))
            self.save()

    # -- the whole session
    def main(self) -> int:
        """Every step, then the pack (also after an error or Ctrl-C); 0 when every step was done."""
        try:
            self.steps()
        finally:
            if self.background is not None:  # stopped before the teaching step was reached
                os.killpg(self.background.pid, signal.SIGKILL)
                self.background.wait()
            self.session.finished = now()
            self.save()
            pack(self.ctx, self.out, self.session)
        fine = ("done", "skipped (complete)", "skipped (--no-compile)")
        not_done = [s.name for s in self.session.steps if not s.status.startswith(fine)]
        print(f"=== session over after {self.elapsed():.0f} s; not done: {not_done or 'none'}", flush=True)
        return 1 if not_done else 0

    def steps(self) -> None:
        from cxrlib.phantom import ensure_phantom
        from cxrlib.pipeline import planned_steps, run_lock

        preset = self.ctx.preset
        probe = start_machine_probe()
        split = phantom_split(preset) if preset.data.source == "phantom" else None
        if split:
            self.session.split = {**asdict(split), "steps_per_resolution": split.steps}
            self.session.plan = plan_seconds(preset, split)
            self.session.planned_total_s = round(critical_path(self.session.plan), 1)
        print(
            f"=== phantom_gpu_session ({self.session.mode}): preset {self.ctx.preset_arg}, budget "
            f"{self.budget:.0f} s (steps stop at {self.budget - self.reserve:.0f} s), results in {self.out}\n"
            f"    split: {self.session.split}\n"
            f"    plan (H200 rates, s): {self.session.plan}\n"
            f"    critical path {self.session.planned_total_s} s (09 runs beside the training)",
            flush=True,
        )
        setup = self.session.step("setup")
        setup.status, setup.seconds = "done", round(self.elapsed(), 1)
        self.save()
        steps = planned_steps(preset)
        total = len(steps) + 2
        with run_lock(preset):
            if preset.data.source == "phantom":
                data = preset.data
                self.run(
                    "phantom",
                    lambda: ensure_phantom(
                        preset.data_path,
                        data.subjects,
                        data.seed,
                        data.max_size,
                        workers=os.cpu_count(),
                        **data.phantom_options,
                    ),  # fmt: skip
                    False,
                    1,
                    total,
                )
            self.session.machine = describe_machine(probe)  # probed while the phantom was written
            print(f"    machine: {json.dumps(self.session.machine)}", flush=True)
            self.save()
            for i, (step, resolution) in enumerate(steps, start=2):
                if step.notebook == TEACHING:
                    self.join_background_teaching(step, i, total)
                    continue
                self.notebook(step, resolution, i, total)
                cached = ("done", "skipped (complete)")
                if step.notebook == "02_downscale" and self.session.step(step.notebook).status in cached:
                    teaching = next(s for s, _ in steps if s.notebook == TEACHING)
                    self.start_background_teaching(teaching)
            if self.args.compile:
                self.run("compile", self.measure_compile, True, total, total)
            else:
                self.session.step("compile").status = "skipped (--no-compile)"


# ----------------------------------------------------------------------------- packing


def packed_files(ctx: Context) -> list[tuple[Path, str]]:
    """(file, name in the archive) for everything worth keeping: no images, cache or checkpoints."""
    preset = ctx.preset
    run, figures = preset.run_path, preset.figures_path
    files: list[tuple[Path, str]] = []
    if run.is_dir():
        cache = preset.cache_path.resolve()
        for path in sorted(run.rglob("*")):
            if not path.is_file() or cache in path.resolve().parents:
                continue
            if path.suffix in (".pt", ".tmp", ".lock") or path.name in ("lock", ".lock"):
                continue
            files.append((path, f"run/{path.relative_to(run).as_posix()}"))
    if figures.is_dir():
        files += [(p, f"figures/{p.relative_to(figures).as_posix()}") for p in sorted(figures.rglob("*.png"))]
    data = preset.data_path
    for name in ("phantom_truth.csv", "README.txt", "phantom_settings.json"):
        if (data / name).is_file():
            files.append((data / name, f"phantom/{name}"))
    return files


def pack(ctx: Context, out: Path, session: Session | None) -> Path:
    """Write ``$OUT/phantom_gpu_session.tar.gz`` (under 15 MiB: the largest optional files are
    left out first) and ``summary.md``; returns the archive's path."""
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(summarize(ctx, session))
    files = packed_files(ctx)
    extra = [(out / "session.json", "session.json"), (summary, "summary.md")]
    files += [item for item in extra if item[0].is_file()]
    optional = ("test_predictions_at", "phantom_truth.csv", "val_predictions", "test_predictions")
    archive = out / PACK_NAME
    for level in range(len(optional) + 1):
        dropped = optional[:level]
        chosen = [(p, n) for p, n in files if not any(d in n for d in dropped)]
        with tarfile.open(archive, "w:gz") as tar:
            for path, name in chosen:
                tar.add(path, arcname=f"phantom_gpu_session/{name}")
        if archive.stat().st_size <= MAX_PACK_BYTES:
            break
    size = archive.stat().st_size / 2**20
    note = f" (left out: {', '.join(dropped)})" if dropped else ""
    print(f"=== packed {len(chosen)} files into {archive} ({size:.1f} MiB){note}", flush=True)
    print(summary.read_text(), flush=True)
    return archive


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _markdown(frame) -> str:
    if frame is None or frame.empty:
        return "(none)\n"
    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(ctx: Context, session: Session | None) -> str:
    """The run in short: each step's time, test AUC per finding and resolution with intervals, the
    paired 256 px vs top-resolution tests, and the ERF after training."""
    import pandas as pd

    tables = ctx.preset.tables_path
    parts = [f"# {PRESET} session ({session.mode if session else 'packed'})\n"]
    if session:
        gpu = ", ".join(g["name"] for g in session.machine.get("gpus", [])) or "no GPU"
        parts.append(
            f"{session.started} .. {session.finished}; {gpu}; commit {session.git.get('commit')}; "
            f"sources {session.source_sha256[:12]}; split {session.split}\n"
        )
        steps = pd.DataFrame(
            [(s.name, s.status, _seconds(s.planned_s), _seconds(s.seconds)) for s in session.steps],
            columns=["step", "status", "planned s", "seconds"],
        )
        parts += ["\n## Steps\n", _markdown(steps)]
    boot = tables / "auc_bootstrap.csv"
    if boot.is_file():
        frame = pd.read_csv(boot)
        frame["cell"] = frame.apply(
            lambda r: f"{r['auc']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})", axis=1
        )
        wide = frame.pivot_table(index="finding", columns="resolution", values="cell", aggfunc="first")
        parts += ["\n## Test AUC (95% patient-bootstrap interval)\n", _markdown(wide.reset_index())]
    delong = tables / "delong.csv"
    resolutions = sorted(ctx.preset.resolutions)
    if delong.is_file() and len(resolutions) >= 2:
        frame = pd.read_csv(delong)
        low, high = str(resolutions[0]), str(resolutions[-1])
        a, b = frame["resolution_a"].astype(str), frame["resolution_b"].astype(str)
        pair = frame[((a == low) & (b == high)) | ((a == high) & (b == low))]
        if not pair.empty:
            keep = ["finding", "resolution_a", "resolution_b", "auc_a", "auc_b", "diff", "p", "p_holm"]
            title = f"\n## Paired DeLong clustered by patient, {low} vs {high} px (Holm over the family)\n"
            parts += [title, _markdown(pair[[c for c in keep if c in pair.columns]])]
    erf = tables / "erf.csv"
    if erf.is_file():
        frame = pd.read_csv(erf)
        keep = [c for c in ("resolution", "state", "erf_radius_px", "erf_fraction_of_image") if c in frame]
        parts += ["\n## Effective receptive field (90% mass)\n", _markdown(frame[keep])]
    if session and session.compile:
        rows = []
        for entry in session.compile:
            for row in entry.get("rows") or [{}]:
                rows.append((entry["resolution"], entry["mode"], entry["status"][:80], row.get("variant"),
                             row.get("img_s"), row.get("value")))  # fmt: skip
        frame = pd.DataFrame(rows, columns=["px", "mode", "status", "variant", "img/s", "compile s"])
        parts += ["\n## torch.compile (training)\n", _markdown(frame)]
    return "".join(parts)


# ----------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder ($OUT)")
    parser.add_argument("--preset", default=PRESET, help=f"preset name or YAML file (default {PRESET})")
    parser.add_argument("--budget-seconds", type=float, default=540.0, help="the whole run's limit (540)")
    parser.add_argument(
        "--reserve-seconds", type=float, default=20.0, help="kept for stopping and packing (default 20)"
    )
    parser.add_argument(
        "--min-start-seconds", type=float, default=5.0, help="no step starts with less left (default 5)"
    )
    parser.add_argument(
        "--min-compile-seconds", type=float, default=90.0, help="no compile child with less left (90)"
    )
    parser.add_argument(
        "--max-compile-seconds", type=float, default=240.0, help="limit of one compile measurement (240)"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--work-dir", type=Path, default=None, help="run, figures and data here")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny sizes")
    parser.add_argument("--pack-only", action="store_true", help="only pack what exists into --out")
    parser.add_argument("--run-step", default=None, help=argparse.SUPPRESS)  # the teaching child
    return parser


def child_argv(args: argparse.Namespace) -> list[str]:
    """Arguments that make the teaching child resolve the same run."""
    argv = ["--out", str(args.out), "--preset", str(args.preset)]
    if args.work_dir:
        argv += ["--work-dir", str(args.work_dir)]
    if args.dry_run:
        argv.append("--dry-run")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.out is None:
        print("error: give --out or set OUT (the folder that receives the results)", file=sys.stderr)
        return 2
    args.out = Path(args.out).resolve()
    if args.dry_run:
        args.min_compile_seconds = min(args.min_compile_seconds, 10.0)
    ctx = resolve_context(args)
    if args.run_step:  # the teaching notebook beside the training (same settings, no lock)
        from cxrlib.pipeline import planned_steps

        step = next(s for s, _ in planned_steps(ctx.preset) if s.notebook == args.run_step)
        seconds = run_notebook_step(ctx, step, None, {"preset": ctx.preset_arg, "beside_training": True})
        print(f"{args.run_step} done in {seconds:.0f} s", flush=True)
        return 0
    if args.pack_only:
        session_file = args.out / "session.json"
        print(f"packing what exists (session.json {'found' if session_file.is_file() else 'missing'})")
        pack(ctx, args.out, None)
        return 0
    args.argv_for_child = child_argv(args)
    runner = Runner(args, ctx, args.out)
    try:
        return runner.main()
    except NotebookExecutionError as error:  # raised outside a step: should not happen
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
