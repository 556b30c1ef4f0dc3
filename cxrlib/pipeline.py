"""Run the numbered notebooks of a preset in order with papermill, skipping complete steps (docs/pipeline.md).

python -m cxrlib.pipeline --preset demo                      # what `make demo` runs
python -m cxrlib.pipeline --preset mimic --data-root /data/mimic-cxr-jpg --gpus all
python -m cxrlib.pipeline --preset demo --list               # what is done, what is left
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import papermill
import torch

from . import __version__, eta, paths, study
from .cache import MANIFEST_NAME
from .datasets import check_data_root
from .fileio import FolderBusyError, exclusive_lock, sha256_file, write_text_atomic
from .launch import resolve_nproc
from .models import cpu_info
from .presets import Preset, resolve

LOCK = ".pipeline.lock"  # in the run folder, held while a pipeline runs there
GIT_COMMANDS = (["rev-parse", "HEAD"], ["status", "--porcelain"])


class PipelineError(RuntimeError):
    """A step failed; the message names the executed notebook that holds the error."""


# The preset's argument (a YAML path made absolute), the resolved preset, the notebooks' overrides
Run = collections.namedtuple("Run", "arg preset overrides")


def resolve_run(preset_arg: str, **overrides: Any) -> Run:
    """The preset resolved with the command line's overrides (None: the preset's value)."""
    if Path(preset_arg).suffix in (".yaml", ".yml"):
        preset_arg = str(Path(preset_arg).resolve())  # notebooks run in notebooks/, not here
    overrides = {key: value for key, value in overrides.items() if value is not None}
    preset = resolve(preset_arg, **overrides)
    overrides |= {"run_dir": str(preset.run_path), "figures_dir": str(preset.figures_path)}
    if "data_root" in overrides:
        overrides["data_root"] = preset.data.root
    return Run(preset_arg, preset, overrides)


def planned_steps(preset: Preset) -> list[tuple[study.Step, int | None]]:
    """Every (step, resolution) the preset runs, in order: its ``steps``, or every default step."""
    names = [step.notebook for step in study.STEPS]
    unknown = sorted(set(preset.steps or []) - set(names))
    if unknown:
        raise ValueError(f"preset {preset.name!r}: steps {unknown} are not notebooks; steps are {names}")
    chosen = [s for s in study.STEPS if (s.notebook in preset.steps if preset.steps else s.default)]
    return [(s, r) for s in chosen for r in (preset.resolutions if s.per_resolution else [None])]


def step_settings(run: Run, step: study.Step, resolution: int | None) -> tuple[Path, dict[str, Any], str]:
    """A step's notebook, the parameters its parameters cell declares, and its fingerprint."""
    notebook = paths.NOTEBOOKS_DIR / f"{step.notebook}.ipynb"
    declared = papermill.inspect_notebook(str(notebook))
    offered = {"preset": run.arg, **run.overrides, **step.fixed, "resolution": resolution}
    parameters = {key: value for key, value in offered.items() if key in declared and value is not None}
    cells = [(c["cell_type"], "".join(c["source"])) for c in json.loads(notebook.read_text())["cells"]]
    settings = json.dumps([run.preset.to_dict(), parameters, cells], sort_keys=True, default=str)
    return notebook, parameters, hashlib.sha256(settings.encode()).hexdigest()


def states(run: Run) -> pd.DataFrame:
    """Each planned step's state (docs/pipeline.md), its outputs there, and its seconds when it last ran."""
    rows = []
    for step, resolution in planned_steps(run.preset):
        name, fingerprint = step.name(resolution), step_settings(run, step, resolution)[2]
        try:
            recorded = json.loads((run.preset.run_path / f"{name}.ipynb").read_text())["metadata"]
        except (OSError, ValueError, KeyError):
            recorded = {}
        outputs = step.outputs(run.preset, resolution)
        there = sum(path.is_file() and path.stat().st_size > 0 for path in outputs)
        ran = recorded.get("cxr_provenance", {}).get("fingerprint")
        state = "complete" if there == len(outputs) else "outputs missing"
        state = "not run" if ran is None else state if ran == fingerprint else "changed"
        rows.append((name, state, f"{there}/{len(outputs)}", recorded.get("papermill", {}).get("duration")))
    return pd.DataFrame(rows, columns=["step", "state", "outputs", "seconds"])


def data_hashes(preset: Preset) -> dict[str, str | None]:
    """SHA-256 of the index, the folds and the cache manifest (None where not written yet)."""
    files = {paths.INDEX: preset.index_path, paths.FOLDS: preset.folds_path}
    files[f"cache/{MANIFEST_NAME}"] = preset.cache_path / MANIFEST_NAME
    return {name: (sha256_file(path) if path.is_file() else None) for name, path in files.items()}


def new_provenance(run: Run) -> dict[str, Any]:
    """What a run records before its first step: settings, command, git commit, packages, machine."""
    options = {"cwd": paths.PROJECT_ROOT, "capture_output": True, "text": True, "timeout": 10, "check": True}
    try:
        commit, changes = (subprocess.run(["git", *a], **options).stdout.strip() for a in GIT_COMMANDS)
        git = {"commit": commit, "dirty": bool(changes)}
    except (OSError, subprocess.SubprocessError):
        git = {"commit": None, "dirty": None}
    versions = {"python": platform.python_version(), "cxrlib": __version__}
    versions |= {d.metadata["Name"]: d.version for d in metadata.distributions()}  # every installed one
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    machine = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    return {
        "preset": run.arg, "settings": run.preset.to_dict(), "overrides": run.overrides, "started": _now(),
        "command": [Path(sys.executable).name, "-m", "cxrlib.pipeline", *sys.argv[1:]],
        "git": git, "packages": versions, "steps": {},
        "machine": {**machine, "cpu": cpu_info(), "cuda_devices": gpus},
    }  # fmt: skip


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _save(provenance: dict[str, Any], preset: Preset) -> None:
    write_text_atomic(json.dumps(provenance, indent=2, default=str), preset.run_path / paths.PROVENANCE)


@contextlib.contextmanager
def run_lock(preset: Preset) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; refuse clearly if another pipeline holds it."""
    try:
        with exclusive_lock(preset.run_path / LOCK):
            yield
    except FolderBusyError as holder:
        raise PipelineError(
            f"another pipeline is running on {preset.run_path} ({holder}); wait for it "
            f"to finish or stop it, then run again"
        ) from None


def execute_step(notebook: Path, output: Path, parameters: dict[str, Any], progress_bar: bool) -> None:
    """Execute one notebook with papermill into ``output``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # waiting threads sleep: a shared CPU stays usable
    env_path = str(Path(sys.executable).parent)  # torchrun, started by notebooks, from this environment
    if env_path not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, cwd=str(paths.NOTEBOOKS_DIR),
            kernel_name="python3", progress_bar=progress_bar, request_save_on_cell_execute=True,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # the kernel's start-up warnings are noise
        )  # fmt: skip
    except papermill.PapermillExecutionError as error:
        raise PipelineError(
            f"{output.name} failed in cell {error.exec_count}: {error.ename}: "
            f"{error.evalue}\n  open {output} to see the traceback"
        ) from None


def run_step(run: Run, step: study.Step, resolution: int | None, progress: bool, provenance: dict) -> float:
    """Execute one step, check its outputs, record provenance and fingerprint in the executed notebook."""
    notebook, parameters, fingerprint = step_settings(run, step, resolution)
    name = step.name(resolution)
    output, started = run.preset.run_path / f"{name}.ipynb", time.time()
    execute_step(notebook, output, parameters, progress)
    seconds = time.time() - started
    missing = [str(p) for p in step.outputs(run.preset, resolution) if not p.is_file()]
    if missing:
        raise PipelineError(f"{name} finished but did not write {missing}; see {output}")
    provenance["data_hashes"] = data_hashes(run.preset)  # after the step: what it wrote
    executed = nbformat.read(output, as_version=4)
    record = {"step": name, "parameters": parameters, "fingerprint": fingerprint}
    executed.metadata["cxr_provenance"] = {**provenance, **record}
    write_text_atomic(nbformat.writes(executed), output)
    provenance["steps"][name] = {"seconds": round(seconds, 1), "finished": _now()}
    return seconds


def run_pipeline(
    preset_arg: str, *, force: bool = False, start_from: str | None = None, progress_bar: bool | None = None,
    **overrides: Any,
) -> Preset:  # fmt: skip
    """Run the steps from the first one not complete (or ``--from``, ``--force``) on; returns the preset."""
    run = resolve_run(preset_arg, **overrides)
    preset, steps = run.preset, planned_steps(run.preset)
    names = [step.name(resolution) for step, resolution in steps]
    starts = [i for i, (step, _) in enumerate(steps) if start_from in (step.notebook, names[i])]
    if start_from is not None and not starts:
        raise PipelineError(f"--from {start_from!r} is not a step; steps are {names}")
    forced = starts[:1] if start_from else [0] if force else []  # run again whatever its state
    resolve_nproc(preset.train.gpus, strict=True)  # refused before anything is written: too many GPUs,
    if preset.data.source != "phantom" and not preset.index_path.is_file():  # or a data root without labels
        check_data_root(preset.data.source, preset.data_path, preset.data.csv)
    with run_lock(preset):
        table = states(run)
        first = min([*table.index[table["state"] != "complete"], len(steps), *forced])
        done = dict(zip(names[:first], table["seconds"][:first].fillna(0.0), strict=True))
        provenance, started, expected = new_provenance(run), time.time(), None
        progress = sys.stderr.isatty() if progress_bar is None else progress_bar
        _save(provenance, preset)
        for i, ((step, resolution), name) in enumerate(zip(steps, names, strict=True)):
            prefix = f"[{i + 1}/{len(steps)}] {name:<32}"
            if i < first:
                print(f"{prefix} skipped (complete)", flush=True)
                continue
            if step.trains and expected is None:  # before the long work
                expected = eta.forecast(preset, done, names) or {}
            known = bool(expected) and name in expected
            left = eta.clock(sum(s for n, s in expected.items() if n not in done)) if known else ""
            hint = f" (expected {eta.clock(expected[name])}; whole run about {left} left)" if known else ""
            print(f"{prefix} running ...{hint}", flush=True)
            done[name] = run_step(run, step, resolution, progress, provenance)
            if known:
                provenance["steps"][name]["expected_seconds"] = round(expected[name], 1)
            _save(provenance, preset)
            versus = f" (expected {eta.clock(expected[name])})" if known else ""
            print(f"{prefix} done in {eta.clock(done[name])}{versus}", flush=True)
        provenance["finished"], provenance["data_hashes"] = _now(), data_hashes(preset)
        _save(provenance, preset)
    print(f"\nall {len(steps)} steps complete in {eta.clock(time.time() - started)}", flush=True)
    print(f"  figures:   {preset.figures_path}\n  tables:    {preset.tables_path}", flush=True)
    print(f"  notebooks: {preset.run_path}", flush=True)
    return preset


def list_steps(preset_arg: str, **overrides: Any) -> str | None:
    """Print each step's state and outputs and where a run would start; returns that step (None: all done)."""
    table = states(resolve_run(preset_arg, **overrides))
    for name, state, outputs, _ in table.itertuples(index=False):
        print(f"{name:<34} {state:<16} outputs {outputs}")
    pending = table["step"][table["state"] != "complete"]
    first = pending.iloc[0] if len(pending) else None
    print(f"a run starts at {first}" if first else "every step is complete", flush=True)
    return first


def lab_command(*extra: str, root_dir: str | os.PathLike = paths.NOTEBOOKS_DIR) -> list[str]:
    """``jupyter lab`` from this environment on ``notebooks/`` (``--allow-root`` as root: it asks for it)."""
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={root_dir}", *root, *extra]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    option = parser.add_argument
    option("--preset", default="demo", help="smoke, demo (default), phantom-gpu, kermany, mimic, nih, YAML")
    option("--data-root", help="folder of the data (MIMIC-CXR-JPG, CheXpert, NIH, Kermany, CSV images)")
    option("--resolutions", type=int, nargs="+", help="override the preset's resolutions")
    option("--folds", type=int, nargs="+", help="folds to train and evaluate (default: preset's)")
    option("--gpus", help="'all' or a number of processes per node for training")
    option("--run-dir", help="where executed notebooks and tables go (default runs/<preset>)")
    option("--figures-dir", help="where figures go (default figures/<preset>)")
    split = "official: the data's test images are the one test fold, never trained on; patients: K folds"
    option("--kermany-split", dest="fold_split", choices=("official", "patients"), help=split)
    option("--force", action="store_true", help="run every step again, even if complete")
    option("--from", dest="start_from", metavar="STEP", help="run again from this step (e.g. 04_evaluate)")
    option("--list", action="store_true", help="each step's state and where a run would start; run nothing")
    option("--lab", action="store_true", help="--list, then JupyterLab on notebooks/ (other flags go to it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.lab:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    overrides = {key: value for key, value in vars(args).items() if key in study.OVERRIDES}
    try:
        if args.list or args.lab:
            list_steps(args.preset, **overrides)
        else:
            run_pipeline(args.preset, force=args.force, start_from=args.start_from, **overrides)
    except (PipelineError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if args.lab:  # this process becomes JupyterLab
        os.execv(sys.executable, lab_command(*extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
