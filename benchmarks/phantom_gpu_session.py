"""The two Python parts of ``benchmarks/phantom_gpu_session.sh``, around ``python -m cxrlib.pipeline``.

* ``setup``: install the carried wheels of papermill and its kernel (``.whl/``, the requirements in
  ``benchmarks/session_wheels.txt``) into a private folder, then check in a fresh process that every
  module the pipeline imports is there (one line naming what is missing) and print the versions, the
  GPUs and where papermill comes from. With ``--dry-run`` it first writes the CPU variant of the
  preset (:func:`dry_run_settings`).
* ``pack``: tables, figures, histories, training logs, executed notebooks and ``provenance.json`` of
  the run into ``$OUT/phantom_gpu_session.tar.gz`` (under 15 MiB), with ``summary.md`` beside it:
  each step's state and time (expected and measured), test AUC with its intervals, the paired
  DeLong tests of the lowest against the highest resolution, and the ERF after training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESET = "phantom-gpu"
PACK_NAME = "phantom_gpu_session.tar.gz"
MAX_PACK_BYTES = 15 * 2**20  # files come back from $OUT up to 16 MiB each
WHEELS = ROOT / ".whl"
REQUIREMENTS = ROOT / "benchmarks" / "session_wheels.txt"
# every module the pipeline and its notebooks import beyond the standard library
MODULES = ("papermill", "nbclient", "nbformat", "ipykernel", "jupyter_client", "yaml", "tqdm", "numpy",
           "pandas", "scipy", "sklearn", "matplotlib", "seaborn", "PIL", "torch", "torchvision")  # fmt: skip
CHECK = r"""
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("missing: " + "; ".join(missing))
import jupyter_client.kernelspec, papermill, torch
jupyter_client.kernelspec.KernelSpecManager().get_kernel_spec("python3")  # the kernel papermill starts
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, papermill {papermill.__version__} "
      f"from {papermill.__file__}; GPUs: {gpus or 'none'}")
"""


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


def write_dry_run_preset(work: Path) -> Path:
    """``<work>/phantom-gpu-dry-run.yaml``: :func:`dry_run_settings` of the shipped preset."""
    import yaml

    from cxrlib.presets import PRESET_DIR

    settings = yaml.safe_load((PRESET_DIR / f"{PRESET}.yaml").read_text())
    path = work / f"{PRESET}-dry-run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dry_run_settings(settings, work.resolve()), sort_keys=False))
    return path


def install_wheels(site: Path) -> None:
    """The carried wheels into ``site`` (on ``PYTHONPATH``), unless these requirements are there already."""
    wanted = REQUIREMENTS.read_text()
    marker = site / ".requirements"
    if marker.is_file() and marker.read_text() == wanted:
        print(f"wheels: installed in {site} already", flush=True)
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--find-links", str(WHEELS), "--target", str(site),
               "-r", str(REQUIREMENTS)]  # fmt: skip
    subprocess.run(command, check=True)
    marker.write_text(wanted)
    count = sum(1 for line in wanted.splitlines() if line and not line.startswith("#"))
    print(f"wheels: {count} packages from {WHEELS} installed in {site}", flush=True)


def setup(args: argparse.Namespace) -> int:
    """``setup``: the dry run's preset, the carried wheels (when ``.whl/`` is there), the import check."""
    if args.dry_run:
        print(f"preset: {write_dry_run_preset(args.work_dir)}", flush=True)
    if WHEELS.is_dir():
        install_wheels(args.site)
    else:
        print(f"wheels: no {WHEELS.name}/ here, the installed packages are used", flush=True)
    return subprocess.run([sys.executable, "-c", CHECK, *MODULES], check=False).returncode


# ----------------------------------------------------------------------------- packing


def packed_files(preset) -> list[tuple[Path, str]]:
    """(file, name in the archive) for everything worth keeping: no images, cache or checkpoints."""
    run, figures, files = preset.run_path, preset.figures_path, []
    if run.is_dir():
        cache = preset.cache_path.resolve()
        for path in sorted(run.rglob("*")):
            if path.is_file() and cache not in path.resolve().parents and path.suffix not in (".pt", ".tmp"):
                files.append((path, f"run/{path.relative_to(run).as_posix()}"))
    if figures.is_dir():
        files += [(p, f"figures/{p.relative_to(figures).as_posix()}") for p in sorted(figures.rglob("*.png"))]
    data = preset.data_path
    files += [(data / n, f"phantom/{n}") for n in ("phantom_truth.csv", "README.txt") if (data / n).is_file()]
    return [(path, name) for path, name in files if path.name not in (".pipeline.lock", ".lock")]


def pack(run, out: Path, commit: str | None) -> Path:
    """Write ``summary.md`` and ``phantom_gpu_session.tar.gz`` into ``out`` for ``run`` (the preset
    as the pipeline resolved it: :func:`cxrlib.pipeline.resolve_run`); the largest optional files are
    left out first if the archive would exceed 15 MiB. Returns the archive's path."""
    preset = run.preset
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(summarize(run, commit))
    files = [*packed_files(preset), (summary, "summary.md")]
    optional = ("test_predictions_at", "phantom_truth.csv", "val_predictions", "test_predictions")
    archive = out / PACK_NAME
    for level in range(len(optional) + 1):
        chosen = [(p, n) for p, n in files if not any(d in n for d in optional[:level])]
        with tarfile.open(archive, "w:gz") as tar:
            for path, name in chosen:
                tar.add(path, arcname=f"phantom_gpu_session/{name}")
        if archive.stat().st_size <= MAX_PACK_BYTES:
            break
    left_out = f" (left out: {', '.join(optional[:level])})" if level else ""
    print(f"packed {len(chosen)} files into {archive} ({archive.stat().st_size / 2**20:.1f} MiB){left_out}")
    print(summary.read_text(), flush=True)
    return archive


def _markdown(frame) -> str:
    if frame is None or frame.empty:
        return "(none)\n"
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def steps_table(run):
    """Each planned step: its state (the pipeline's own test), its expected seconds (the latest run's
    estimate, ``provenance.json``) and its measured seconds (papermill's record in the executed notebook)."""
    import pandas as pd

    from cxrlib import paths, pipeline

    path = run.preset.run_path / paths.PROVENANCE
    expected = json.loads(path.read_text()).get("steps", {}) if path.is_file() else {}
    table = pipeline.states(run)
    table["expected s"] = [expected.get(name, {}).get("expected_seconds") for name in table["step"]]
    for column in ("expected s", "seconds"):
        table[column] = [f"{v:.0f}" if pd.notna(v) else "" for v in table[column]]
    return table[["step", "state", "expected s", "seconds"]]


def summarize(run, commit: str | None) -> str:
    """The run in short: each step's state and time, test AUC per finding and resolution with its
    interval, the paired lowest vs highest resolution tests, and the ERF after training."""
    import pandas as pd

    preset = run.preset
    tables = preset.tables_path
    parts = [f"# {preset.name} session\n\ncommit {commit or '?'}; run folder {preset.run_path}\n"]
    parts += ["\n## Steps\n", _markdown(steps_table(run))]
    if (tables / "auc_bootstrap.csv").is_file():
        frame = pd.read_csv(tables / "auc_bootstrap.csv")
        frame["cell"] = [
            f"{a:.3f} ({lo:.3f}-{hi:.3f})" for a, lo, hi in frame[["auc", "ci_low", "ci_high"]].values
        ]
        wide = frame.pivot_table(index="finding", columns="resolution", values="cell", aggfunc="first")
        parts += ["\n## Test AUC (95% patient-bootstrap interval)\n", _markdown(wide.reset_index())]
    low, high = (str(r) for r in (min(preset.resolutions), max(preset.resolutions)))
    if (tables / "delong.csv").is_file() and low != high:
        frame = pd.read_csv(tables / "delong.csv", dtype={"resolution_a": str, "resolution_b": str})
        pair = frame[frame[["resolution_a", "resolution_b"]].apply(set, axis=1) == {low, high}]
        keep = [c for c in ("finding", "auc_a", "auc_b", "diff", "p", "p_holm") if c in pair]
        title = f"\n## Paired DeLong clustered by patient, {low} vs {high} px (Holm over the family)\n"
        parts += [title, _markdown(pair[keep])]
    if (tables / "erf.csv").is_file():
        frame = pd.read_csv(tables / "erf.csv")
        keep = [c for c in ("resolution", "state", "erf_radius_px", "erf_fraction_of_image") if c in frame]
        parts += ["\n## Effective receptive field (90% mass)\n", _markdown(frame[keep])]
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("setup", "pack"))
    parser.add_argument("--preset", default=PRESET, help="the preset the pipeline runs (name or YAML file)")
    parser.add_argument("--run-dir", help="the pipeline's --run-dir")
    parser.add_argument("--figures-dir", help="the pipeline's --figures-dir")
    parser.add_argument("--site", type=Path, help="setup: where the carried wheels are installed")
    parser.add_argument("--dry-run", action="store_true", help="setup: write the CPU variant of the preset")
    parser.add_argument("--work-dir", type=Path, help="setup --dry-run: where it and its run go")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="pack: the results folder")
    args = parser.parse_args(argv)
    if args.part == "setup":
        return setup(args)
    from cxrlib.pipeline import resolve_run

    run = resolve_run(args.preset, run_dir=args.run_dir, figures_dir=args.figures_dir)
    pack(run, args.out, os.environ.get("CXR_COMMIT"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
