"""The prepared GPU session of the `phantom-gpu` preset, on the CPU: its time limits add up to less
than a device call may run, the carried wheels are everything papermill and its kernel need there,
the preset's comments say what its split is, and the session runs the real pipeline end to end at
tiny sizes (stopped by a tiny time limit and packed, then resumed to every table and figure)."""

import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cxrlib import paths, pipeline, splits
from cxrlib.phantom.writer import plan_dataset
from cxrlib.presets import PRESET_DIR, resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import phantom_gpu_session as session  # noqa: E402

SCRIPT = paths.PROJECT_ROOT / "benchmarks" / "phantom_gpu_session.sh"
DEVICE_CALL_S = 600  # the longest a device call may run
# Of the packages papermill and ipykernel need, those the GPU machine's image has (docs/performance.md).
GPU_MACHINE_HAS = {"aiohttp", "attrs", "click", "packaging", "psutil", "pygments", "python-dateutil",
                   "pyyaml", "requests", "tqdm", "typing-extensions"}  # fmt: skip
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def test_every_time_limit_of_the_session_adds_up_to_less_than_a_device_call():
    script = SCRIPT.read_text()
    limits = dict(re.findall(r"(\w+_S)=(\d+)", script.split("\nDRY=")[0]))
    budget, setup, stop, pack = (int(limits[k]) for k in ("BUDGET_S", "SETUP_S", "STOP_S", "PACK_S"))
    # setup, then the pipeline until budget - elapsed - stop - pack, stopped within stop, then the pack:
    assert (
        "left=$((BUDGET_S - SECONDS - STOP_S - PACK_S))" in script
        and "((limit > left)) && limit=$left" in script
    )
    timeouts = re.findall(r"timeout (.*?) \"\$PY\"", script)
    assert timeouts == ['"$SETUP_S"', '--signal=INT --kill-after="$STOP_S" "$limit"', '"$PACK_S"'], timeouts
    assert setup + stop + pack < budget <= DEVICE_CALL_S - 10  # 10 s for the shell itself
    documented = (paths.PROJECT_ROOT / "docs" / "performance.md").read_text()
    assert 'command="CXR_COMMIT=<commit> bash benchmarks/phantom_gpu_session.sh"' in documented
    assert f'carry=[".whl"], timeout_s={DEVICE_CALL_S}' in documented


def test_the_carried_wheels_are_what_papermill_and_its_kernel_need_that_the_gpu_machine_lacks():
    needed, todo = set(), ["papermill", "ipykernel"]
    while todo:  # the requirements of what is installed here, read for the GPU machine's Python
        name = canonicalize_name(todo.pop())
        if name in needed or name in GPU_MACHINE_HAS:
            continue
        needed.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(GPU_PYTHON):
                todo.append(requirement.name)
    lines = session.REQUIREMENTS.read_text().splitlines()
    carried = {canonicalize_name(line.split("==")[0]) for line in lines if line and not line.startswith("#")}
    assert carried == needed, f"missing {sorted(needed - carried)}, not needed {sorted(carried - needed)}"
    assert all("==" in line for line in lines if line and not line.startswith("#"))  # one version each


def phantom_split(preset) -> dict[str, int]:
    """Images per role of the trained fold, from the preset's phantom plan alone (nothing rendered)."""
    entries, _ = plan_dataset(preset.data.subjects, preset.data.seed, **preset.data.phantom_options)
    frame = pd.DataFrame(
        {"dicom_id": [e["dicom_id"] for e in entries], "subject_id": [e["subject_id"] for e in entries]}
    )
    folds = splits.make_folds(
        frame, k=preset.folds.k, seed=preset.folds.seed, val_fraction=preset.folds.val_fraction
    )
    roles = folds[f"role_{preset.trained_folds()[0]}"].value_counts()
    return {"images": len(frame), **{role: int(roles.get(role, 0)) for role in ("train", "val", "test")}}


def test_the_preset_trains_equal_steps_and_its_comments_say_its_split():
    preset = resolve("phantom-gpu")
    options = [preset.train_options(r) for r in preset.resolutions]
    assert all(o == options[0] for o in options)  # same batch, epochs, lr, images: equal steps
    used, batch = options[0]["max_train_images"], options[0]["batch_size"]
    split, steps = phantom_split(preset), options[0]["epochs"] * used // batch
    assert used % batch == 0 and used <= split["train"] and options[0]["weights"] == "none"
    assert preset.resolutions == [256, 512, 1024, 2048] and preset.data.max_size == 2048
    assert not preset.train.cudnn_benchmark and preset.data.views == "all"
    text = " ".join(
        line.lstrip("#").strip() for line in (PRESET_DIR / "phantom-gpu.yaml").read_text().splitlines()
    )
    for claim in (
        f"{steps} optimizer steps",
        f"{split['images']} frontal images",
        f"{split['test']} test images",
        f"{split['val']} validation, {split['train']} training",
        f"first {used} are used",
    ):
        assert claim in text, f"phantom-gpu.yaml's comments no longer say {claim!r}"


def test_dry_run_settings_keep_the_preset_and_shrink_its_sizes(tmp_path):
    path = session.write_dry_run_preset(tmp_path)
    settings, tiny = resolve("phantom-gpu"), resolve(str(path))
    assert tiny.resolutions == [32, 64] and tiny.train.epochs == 1 and tiny.analysis.device == "cpu"
    assert tiny.data.phantom_options == settings.data.phantom_options and tiny.folds == settings.folds
    assert tiny.cache.format == settings.cache.format and tiny.data_path == tmp_path / "phantom"
    assert tiny.train.cudnn_benchmark == settings.train.cudnn_benchmark and settings.train.epochs == 6


def run_session(out: Path, work: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "OUT": str(out), "CXR_COMMIT": "dry-run-test"}
    command = ["bash", str(SCRIPT), "--dry-run", "--work-dir", str(work), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=2700, check=False)
    assert (out / "session.log").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result.returncode, (out / "session.log").read_text()


def archive_names(out: Path) -> set[str]:
    with tarfile.open(out / session.PACK_NAME) as tar:
        return {name.removeprefix("phantom_gpu_session/") for name in tar.getnames()}


@pytest.mark.slow
def test_the_dry_run_runs_the_pipeline_stops_at_its_limit_with_its_results_packed_then_resumes(tmp_path):
    work, first, second = tmp_path / "work", tmp_path / "out1", tmp_path / "out2"
    # 1. The pipeline is stopped at a tiny time limit (SIGINT, as on the GPU); what exists is packed.
    rc, log = run_session(first, work, "--pipeline-seconds", "10")
    assert rc in (124, 137) and "the pipeline was stopped at its time limit" in log, log[-3000:]
    assert "summary.md" in archive_names(first) and "## Steps" in (first / "summary.md").read_text()

    # 2. The same command with time enough (a busy CPU may need more than the GPU's budget): the real
    # pipeline, through papermill, to every output.
    rc, log = run_session(second, work, "--budget-seconds", "2400")
    assert rc == 0, log[-5000:]
    assert "python -m cxrlib.pipeline --preset" in log and "all 11 steps complete" in log
    if session.WHEELS.is_dir():  # the carried wheels, not this environment's papermill
        assert f"papermill {metadata.version('papermill')} from {work / 'site'}" in log
    run = pipeline.resolve_run(
        str(work / "phantom-gpu-dry-run.yaml"), run_dir=str(work / "run"), figures_dir=str(work / "figures")
    )
    names, expected = (
        archive_names(second),
        {"summary.md", "run/provenance.json", "run/tables/auc_bootstrap.csv"},
    )
    assert set(pipeline.states(run)["state"]) == {"complete"}
    for step, resolution in pipeline.planned_steps(run.preset):
        expected.add(f"run/{step.name(resolution)}.ipynb")
        for path in step.outputs(run.preset, resolution):
            if path.name != "manifest.csv":  # the cache stays on the machine
                root, prefix = (
                    (work / "figures", "figures") if path.suffix == ".png" else (work / "run", "run")
                )
                expected.add(f"{prefix}/{path.relative_to(root).as_posix()}")
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".pt", ".jpg")) or "/cache/" in n]
    provenance = json.loads((work / "run" / "provenance.json").read_text())
    assert provenance["packages"]["papermill"] and provenance["data_hashes"]["index.csv"]
    summary = (second / "summary.md").read_text()
    assert "commit dry-run-test" in summary and "| 03_train_res64 | complete |" in summary
    assert "## Test AUC" in summary and "32 vs 64 px" in summary
