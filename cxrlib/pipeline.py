"""Run the numbered notebooks of a preset in order with papermill: ``python -m cxrlib.pipeline``.

Usage::

    python -m cxrlib.pipeline --preset demo                      # what `make demo` runs
    python -m cxrlib.pipeline --preset smoke                     # a minute or two, CPU
    python -m cxrlib.pipeline --preset mimic --data-root /data/mimic-cxr-jpg --gpus all
    python -m cxrlib.pipeline --preset kermany --resolutions 32 64
    python -m cxrlib.pipeline --preset kermany --kermany-split patients --folds 0 1
    python -m cxrlib.pipeline --preset demo --list               # what is done, what is left

Executed notebooks go to ``runs/<preset>/`` (``03_train`` once per resolution, as
``03_train_res<R>.ipynb``), tables to ``runs/<preset>/tables/`` and figures to
``figures/<preset>/``. A step whose outputs are complete and whose settings and notebook
are unchanged is skipped, so an interrupted run resumes where it stopped (``--force``
runs everything again). Training resumes from its last checkpoint on its own.

Provenance (settings, git commit, package versions, data and fold hashes, step times) is
written to ``runs/<preset>/provenance.json`` and into each executed notebook's metadata.
A lock file refuses a second pipeline on the same run folder while one is running.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, eta, paths
from .fileio import FolderBusyError, exclusive_lock, sha256_file, write_text_atomic
from .presets import Preset, resolve

STATE_DIR = ".pipeline"


@dataclass(frozen=True)
class Step:
    """One executed notebook: its source, its resolution (03_train) and the files it must leave."""

    notebook: str
    outputs: Callable[[Preset, int | None], list[Path]] = field(default=lambda preset, resolution: [])
    per_resolution: bool = False
    # parameters the pipeline always passes to this notebook (e.g. no widgets in a batch run)
    fixed_parameters: dict[str, Any] = field(default_factory=dict, compare=False)
    default: bool = True  # run by every preset that does not list its own steps
    trains: bool = False  # trains models: the run's time estimate is printed before it starts

    def name(self, resolution: int | None = None) -> str:
        return f"{self.notebook}_res{resolution}" if resolution is not None else self.notebook


def _data_outputs(preset: Preset, _: int | None) -> list[Path]:
    return [preset.index_path, preset.folds_path]


def _cache_outputs(preset: Preset, _: int | None) -> list[Path]:
    return [preset.cache_path / "manifest.csv"]


def _train_outputs(preset: Preset, resolution: int | None) -> list[Path]:
    outputs = []
    for fold in preset.trained_folds():
        run = paths.fold_dir(preset.run_path, resolution, fold)
        outputs += [
            run / name for name in ("history.csv", "val_predictions.csv", "test_predictions.csv", "done.json")
        ]
    return outputs


def _tables(*names: str) -> Callable[[Preset, int | None], list[Path]]:
    return lambda preset, _: [preset.tables_path / name for name in names]


def _figures_and_tables(figures: list[str], tables: list[str]) -> Callable[[Preset, int | None], list[Path]]:
    return lambda preset, _: (
        [preset.figures_path / f for f in figures] + [preset.tables_path / t for t in tables]
    )


STEPS: tuple[Step, ...] = (
    Step("00_data", _data_outputs),
    Step("01_image_sizes", _figures_and_tables(["fig3_image_sizes.png"], [])),
    Step("02_downscale", _cache_outputs),
    Step("03_train", _train_outputs, per_resolution=True, trains=True),
    Step(
        "04_evaluate",
        _figures_and_tables(
            ["auc_vs_resolution.png", "cross_resolution.png"],
            ["auc.csv", "table3.csv", "delong.csv", "cross_resolution_auc.csv"],
        ),
    ),
    Step("05_receptive_field", _figures_and_tables(["fig1_erf.png"], ["erf.csv"])),
    Step("06_gradcam", _figures_and_tables(["fig4_gradcam.png"], [])),
    Step("07_ensemble", _figures_and_tables(["fig5_ensemble_weights.png"], ["ensemble_weights.csv"])),
    Step("08_throughput", _tables("table2_throughput.csv")),
    # Interactive widgets can leave a batch kernel's last reply undelivered (nbclient waits forever).
    Step("09_receptive_field_explained", fixed_parameters={"interactive": False}),
    Step(
        "10_field_sweep",
        _figures_and_tables(["field_sweep_arms.png"], ["field_sweep.csv", "field_sweep_delong.csv"]),
        default=False,
        trains=True,
    ),
)


class PipelineError(RuntimeError):
    """A step failed; the message names the executed notebook that holds the error."""


# ----------------------------------------------------------------------------- provenance


def git_commit() -> dict[str, Any]:
    """The repository's commit and whether the working tree has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=paths.PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the results."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "cxrlib": __version__}
    for name in (
        "torch",
        "torchvision",
        "numpy",
        "pandas",
        "scikit-learn",
        "scipy",
        "pillow",
        "matplotlib",
        "seaborn",
        "papermill",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def devices() -> dict[str, Any]:
    """The CPU (model, cores, vector extensions, PyTorch's kernel level) and the visible CUDA devices.

    Results depend on the CPU's floating-point kernels, so the CPU is recorded as carefully as the GPU.
    """
    import torch

    from .models import cpu_info

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": cpu_info(),
        "cuda_devices": gpus,
    }


def data_hashes(preset: Preset) -> dict[str, str | None]:
    """SHA-256 of the index, the folds and the cache manifest (None where not written yet)."""
    files = {
        "index.csv": preset.index_path,
        "folds.csv": preset.folds_path,
        "cache/manifest.csv": preset.cache_path / "manifest.csv",
    }
    return {name: (sha256_file(path) if path.is_file() else None) for name, path in files.items()}


# ----------------------------------------------------------------------------- step state


def notebook_source_hash(path: Path) -> str:
    """Hash of a notebook's cell sources (outputs and metadata do not count)."""
    cells = json.loads(path.read_text())["cells"]
    text = json.dumps([(c["cell_type"], "".join(c["source"])) for c in cells])
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp_path(preset: Preset, name: str) -> Path:
    return preset.run_path / STATE_DIR / f"{name}.json"


def _fingerprint(preset: Preset, notebook: Path, parameters: dict[str, Any]) -> str:
    settings = json.dumps({"preset": preset.to_dict(), "parameters": parameters}, sort_keys=True, default=str)
    return hashlib.sha256((settings + notebook_source_hash(notebook)).encode()).hexdigest()


def step_state(preset: Preset, step: Step, resolution: int | None, fingerprint: str) -> str:
    """'complete' when the step ran with these settings and wrote every output it promises;
    else 'not run', 'changed' (the settings or the notebook changed since) or 'outputs missing'."""
    name = step.name(resolution)
    stamp = _stamp_path(preset, name)
    if not stamp.is_file() or not (preset.run_path / f"{name}.ipynb").is_file():
        return "not run"
    try:
        if json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
            return "changed"
    except json.JSONDecodeError:
        return "changed"
    outputs = step.outputs(preset, resolution)
    if all(path.is_file() and path.stat().st_size > 0 for path in outputs):
        return "complete"
    return "outputs missing"


def step_is_complete(preset: Preset, step: Step, resolution: int | None, fingerprint: str) -> bool:
    """True when the step ran with these settings and every output it promises is there."""
    return step_state(preset, step, resolution, fingerprint) == "complete"


@contextlib.contextmanager
def run_lock(preset: Preset) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; refuse clearly if another pipeline holds it."""
    preset.run_path.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(preset.run_path / STATE_DIR / "lock"):
            yield
    except FolderBusyError as holder:
        raise PipelineError(
            f"another pipeline is running on {preset.run_path} ({holder}); wait for it "
            f"to finish or stop it, then run again"
        ) from None


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# ----------------------------------------------------------------------------- running


def _recorded_seconds(preset: Preset, name: str) -> float:
    """How long a complete step took when it ran (from its stamp; 0 when unknown)."""
    try:
        return float(json.loads(_stamp_path(preset, name).read_text()).get("seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def expected_times(preset: Preset, done: dict[str, float], names: list[str]) -> dict[str, float] | None:
    """Calibrate (or reuse the kept calibration), print the expected time of each step in ``names``
    (the steps this run plans); None on failure.

    An estimate is a convenience: whatever goes wrong here is reported in one line and the run goes on.
    """
    from .index import read_index
    from .splits import read_folds

    try:
        index = read_index(preset.index_path)
        folds = read_folds(preset.folds_path, index)
        rates = eta.calibrate(preset)
        estimated = eta.estimate(preset, rates, index, folds)
        expected = {name: estimated[name] for name in names if name in estimated}
    except Exception as error:  # noqa: BLE001 - a failed estimate must not stop the study
        print(f"(no time estimate: {type(error).__name__}: {error})", flush=True)
        return None
    print(eta.format_plan(expected, done, eta.machine_label()), flush=True)
    return expected


def check_before_work(preset: Preset) -> None:
    """Refuse, before anything is written, what a later step would fail on: more GPUs than this
    machine has, or a data root without its label files (checked until ``index.csv`` exists)."""
    from .datasets import check_data_root
    from .launch import check_gpus

    check_gpus(preset.train.gpus)
    if preset.data.source != "phantom" and not preset.index_path.is_file():
        check_data_root(preset.data.source, preset.data_path, preset.data.csv)


def planned_steps(preset: Preset) -> list[tuple[Step, int | None]]:
    """Every (step, resolution) the preset runs, in order: its ``steps``, or every default step."""
    names = [step.notebook for step in STEPS]
    unknown = sorted(set(preset.steps or []) - set(names))
    if unknown:
        raise ValueError(f"preset {preset.name!r}: steps {unknown} are not notebooks; steps are {names}")
    chosen = [s for s in STEPS if (s.notebook in preset.steps if preset.steps else s.default)]
    planned: list[tuple[Step, int | None]] = []
    for step in chosen:
        if step.per_resolution:
            planned += [(step, resolution) for resolution in preset.resolutions]
        else:
            planned.append((step, None))
    return planned


def notebook_parameters(
    preset_arg: str,
    preset: Preset,
    overrides: dict[str, Any],
    resolution: int | None,
    step: Step | None = None,
) -> dict[str, Any]:
    """Papermill parameters: the preset, the folders, the user's overrides, the step's fixed
    parameters and the resolution."""
    parameters = {
        "preset": preset_arg,
        "run_dir": str(preset.run_path),
        "figures_dir": str(preset.figures_path),
        **overrides,
        **(step.fixed_parameters if step else {}),
    }
    if resolution is not None:
        parameters["resolution"] = resolution
    return parameters


def step_settings(
    preset_arg: str, preset: Preset, overrides: dict[str, Any], step: Step, resolution: int | None
) -> tuple[Path, dict[str, Any], str]:
    """A planned step's source notebook, papermill parameters and fingerprint."""
    notebook = paths.NOTEBOOKS_DIR / f"{step.notebook}.ipynb"
    parameters = notebook_parameters(preset_arg, preset, overrides, resolution, step)
    return notebook, parameters, _fingerprint(preset, notebook, parameters)


def execute_step(notebook: Path, output: Path, parameters: dict[str, Any], progress_bar: bool) -> None:
    """Execute one notebook with papermill into `output`."""
    import papermill

    # Threads that sleep while waiting keep a loaded or small CPU usable (spinning OpenMP threads
    # made small-image training 10-20x slower when other processes competed for the cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env_path = str(Path(sys.executable).parent)
    if env_path not in os.environ.get("PATH", "").split(os.pathsep):
        # Subprocesses started by notebooks (torchrun) must find this environment first.
        os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            cwd=str(paths.NOTEBOOKS_DIR),
            kernel_name="python3",
            progress_bar=progress_bar,
            request_save_on_cell_execute=True,
            # The kernel's own start-up warnings (e.g. TCP on localhost) are noise in this log;
            # errors still show, and cell errors are reported by papermill.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except papermill.PapermillExecutionError as error:
        raise PipelineError(
            f"{output.name} failed in cell {error.exec_count}: {error.ename}: "
            f"{error.evalue}\n  open {output} to see the traceback"
        ) from None


def record_provenance(executed_notebook: Path, provenance: dict[str, Any]) -> None:
    """Store the provenance in an executed notebook's metadata (`cxr_provenance`)."""
    import nbformat

    executed = nbformat.read(executed_notebook, as_version=4)
    executed.metadata["cxr_provenance"] = provenance
    write_text_atomic(nbformat.writes(executed), executed_notebook)


def resolve_run(
    preset_arg: str,
    data_root: str | None = None,
    resolutions: list[int] | None = None,
    folds: list[int] | None = None,
    gpus: str | int | None = None,
    run_dir: str | None = None,
    figures_dir: str | None = None,
    fold_split: str | None = None,
) -> tuple[str, Preset, dict[str, Any]]:
    """The preset as the notebooks will see it, and the user's overrides passed to each of them."""
    if Path(preset_arg).suffix in (".yaml", ".yml"):
        preset_arg = str(Path(preset_arg).resolve())  # notebooks run in notebooks/, not here
    preset = resolve(
        preset_arg,
        data_root=data_root,
        resolutions=resolutions,
        folds=folds,
        gpus=gpus,
        run_dir=run_dir,
        figures_dir=figures_dir,
        fold_split=fold_split,
    )
    overrides = {
        "data_root": data_root and preset.data.root,
        "resolutions": resolutions,
        "folds": folds,
        "gpus": gpus,
        "fold_split": fold_split,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return preset_arg, preset, overrides


def first_forced_step(
    steps: list[tuple[Step, int | None]], start_from: str | None, force: bool
) -> int | None:
    """Index of the first step to run again whatever its state (``--from`` / ``--force``), or None."""
    if start_from is None:
        return 0 if force else None
    names = [step.name(resolution) for step, resolution in steps]
    matches = [i for i, (step, _) in enumerate(steps) if start_from in (step.notebook, names[i])]
    if not matches:
        raise PipelineError(f"--from {start_from!r} is not a step; steps are {names}")
    return matches[0]


def new_provenance(preset_arg: str, preset: Preset, overrides: dict[str, Any]) -> dict[str, Any]:
    """What a run records before its first step: settings, command, git commit, packages, machine."""
    return {
        "preset": preset_arg,
        "settings": preset.to_dict(),
        "overrides": overrides,
        "command": [Path(sys.executable).name, "-m", "cxrlib.pipeline", *sys.argv[1:]],
        "started": _now(),
        "git": git_commit(),
        "packages": package_versions(),
        "machine": devices(),
        "steps": {},
    }


def record_step(preset: Preset, step: Step, resolution: int | None, run: dict[str, Any]) -> None:
    """After a step: check its outputs, write its provenance, its stamp and the run's provenance.

    ``run`` holds the step's ``output`` notebook, ``parameters``, ``fingerprint``, ``seconds``, the
    run's ``provenance`` (updated here) and the ``expected`` seconds (or None).
    """
    name, output, seconds = step.name(resolution), run["output"], run["seconds"]
    missing = [str(p) for p in step.outputs(preset, resolution) if not p.is_file()]
    if missing:
        raise PipelineError(f"{name} finished but did not write {missing}; see {output}")
    provenance = run["provenance"]
    # Hashed after the step, so a step that writes the index or folds records what it wrote.
    hashes = data_hashes(preset)
    record_provenance(
        output, {**provenance, "step": name, "parameters": run["parameters"], "data_hashes": hashes}
    )
    stamp = {"fingerprint": run["fingerprint"], "finished": _now(), "seconds": round(seconds, 1)}
    write_text_atomic(json.dumps(stamp), _stamp_path(preset, name))
    provenance["steps"][name] = {"seconds": round(seconds, 1), "finished": _now()}
    if run["expected"] and name in run["expected"]:
        provenance["steps"][name]["expected_seconds"] = round(run["expected"][name], 1)
    provenance["data_hashes"] = hashes
    write_text_atomic(json.dumps(provenance, indent=2, default=str), preset.run_path / paths.PROVENANCE)


def run_pipeline(
    preset_arg: str,
    *,
    data_root: str | None = None,
    resolutions: list[int] | None = None,
    folds: list[int] | None = None,
    gpus: str | None = None,
    run_dir: str | None = None,
    figures_dir: str | None = None,
    fold_split: str | None = None,
    force: bool = False,
    start_from: str | None = None,
    progress_bar: bool | None = None,
) -> Preset:
    """Run (or resume) every step of a preset; returns the resolved preset."""
    preset_arg, preset, overrides = resolve_run(
        preset_arg, data_root, resolutions, folds, gpus, run_dir, figures_dir, fold_split
    )
    progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    steps = planned_steps(preset)
    force_from = first_forced_step(steps, start_from, force)
    check_before_work(preset)
    with run_lock(preset):
        provenance = new_provenance(preset_arg, preset, overrides)
        provenance_path = preset.run_path / paths.PROVENANCE
        write_text_atomic(json.dumps(provenance, indent=2, default=str), provenance_path)
        rerun_rest, t_start = False, time.time()
        done: dict[str, float] = {}  # step -> seconds, of this run or of the run that completed it
        expected: dict[str, float] | None = None
        for i, (step, resolution) in enumerate(steps):
            name = step.name(resolution)
            notebook, parameters, fingerprint = step_settings(preset_arg, preset, overrides, step, resolution)
            output = preset.run_path / f"{name}.ipynb"
            forced = rerun_rest or (force_from is not None and i >= force_from)
            prefix = f"[{i + 1}/{len(steps)}] {name:<32}"
            if not forced and step_is_complete(preset, step, resolution, fingerprint):
                print(f"{prefix} skipped (complete)", flush=True)
                done[name] = _recorded_seconds(preset, name)
                continue
            if step.trains and expected is None:  # before the long work
                expected = expected_times(preset, done, [s.name(r) for s, r in steps])
            known = expected is not None and name in expected
            left = sum(s for n, s in expected.items() if n not in done) if expected else 0.0
            hint = (
                f" (expected {eta.clock(expected[name])}; whole run about {eta.clock(left)} left)"
                if known
                else ""
            )
            print(f"{prefix} running ...{hint}", flush=True)
            t0 = time.time()
            execute_step(notebook, output, parameters, progress_bar)
            done[name] = seconds = time.time() - t0
            eta.record_step_time(preset, name, seconds)
            record_step(preset, step, resolution, {
                "output": output, "parameters": parameters, "fingerprint": fingerprint, "seconds": seconds,
                "provenance": provenance, "expected": expected,
            })  # fmt: skip
            versus = f" (expected {eta.clock(expected[name])})" if known else ""
            print(f"{prefix} done in {_elapsed(seconds)}{versus}", flush=True)
            rerun_rest = True  # later steps read what this one wrote
        provenance["finished"], provenance["data_hashes"] = _now(), data_hashes(preset)
        write_text_atomic(json.dumps(provenance, indent=2, default=str), provenance_path)
        if expected:
            print("\n" + eta.format_comparison(expected, done), flush=True)
        print(
            f"\nall {len(steps)} steps complete in {_elapsed(time.time() - t_start)}\n"
            f"  figures:   {preset.figures_path}\n"
            f"  tables:    {preset.tables_path}\n"
            f"  notebooks: {preset.run_path}",
            flush=True,
        )
    return preset


def list_steps(
    preset_arg: str,
    data_root: str | None = None,
    resolutions: list[int] | None = None,
    folds: list[int] | None = None,
    gpus: str | int | None = None,
    run_dir: str | None = None,
    figures_dir: str | None = None,
    fold_split: str | None = None,
) -> None:
    """Print each step's state (complete, changed, outputs missing, not run) and where a run
    would start: the first step that is not complete, and every step after it."""
    preset_arg, preset, overrides = resolve_run(
        preset_arg, data_root, resolutions, folds, gpus, run_dir, figures_dir, fold_split
    )
    first_to_run = None
    for step, resolution in planned_steps(preset):
        name = step.name(resolution)
        fingerprint = step_settings(preset_arg, preset, overrides, step, resolution)[2]
        state = step_state(preset, step, resolution, fingerprint)
        outputs = step.outputs(preset, resolution)
        done = sum(p.is_file() for p in outputs)
        print(f"{name:<34} {state:<16} outputs {done}/{len(outputs)}")
        if state != "complete" and first_to_run is None:
            first_to_run = name
    print(f"a run starts at {first_to_run}" if first_to_run else "every step is complete")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        required=True,
        help="smoke, demo, phantom-gpu, kermany, mimic, nih, or a path to a preset YAML file",
    )
    parser.add_argument("--data-root", help="folder of the data (MIMIC-CXR-JPG, CheXpert, CSV images)")
    parser.add_argument("--resolutions", type=int, nargs="+", help="override the preset's resolutions")
    parser.add_argument(
        "--folds", type=int, nargs="+", help="folds to train and evaluate (default: preset's)"
    )
    parser.add_argument("--gpus", help="'all' or a number of processes per node for training")
    parser.add_argument("--run-dir", help="where executed notebooks and tables go (default runs/<preset>)")
    parser.add_argument("--figures-dir", help="where figures go (default figures/<preset>)")
    parser.add_argument(
        "--kermany-split",
        choices=("official", "patients"),
        help="official: the data's official test images are the one test fold, never trained on; "
        "patients: K folds by patient (default: the preset's folds.split)",
    )
    parser.add_argument("--force", action="store_true", help="run every step again, even if complete")
    parser.add_argument(
        "--from",
        dest="start_from",
        metavar="STEP",
        help="run again from this step (e.g. 04_evaluate or 03_train_res256)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="show each step (complete, changed, outputs missing, not run) and where a run would start; "
        "run nothing",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    gpus: str | int | None = args.gpus
    if gpus is not None and gpus != "all":
        if not gpus.isdigit() or int(gpus) < 1:
            print(f"error: --gpus must be 'all' or a positive number, got {gpus!r}", file=sys.stderr)
            return 2
        gpus = int(gpus)
    selection = {
        "data_root": args.data_root,
        "resolutions": args.resolutions,
        "folds": args.folds,
        "gpus": gpus,
        "run_dir": args.run_dir,
        "figures_dir": args.figures_dir,
        "fold_split": args.kermany_split,
    }
    try:
        if args.list:
            list_steps(args.preset, **selection)
            return 0
        run_pipeline(args.preset, force=args.force, start_from=args.start_from, **selection)
    except (PipelineError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
