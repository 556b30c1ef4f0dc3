"""The prepared GPU session of the `phantom-gpu` preset, on the CPU: the notebook runner that replaces
papermill on a bare machine, the preset's budget arithmetic, and the whole session end to end at
tiny sizes (stopped by a tiny time limit, then resumed to every table and figure)."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cxrlib import paths
from cxrlib.pipeline import STEPS, planned_steps
from cxrlib.presets import PRESET_DIR, resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import notebook_runner as runner  # noqa: E402
import phantom_gpu_session as session  # noqa: E402

SCRIPT = paths.PROJECT_ROOT / "benchmarks" / "phantom_gpu_session.sh"


def write_notebook(path: Path, *sources: str, parameters: str = "x = 1\nname = 'default'") -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "# a notebook"}]
    cells.append(
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "source": parameters}
    )
    cells += [{"cell_type": "code", "metadata": {}, "outputs": [], "source": s} for s in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_runner_injects_parameters_and_keeps_outputs_without_ipython(tmp_path):
    before = sys.modules.get("IPython")
    source = write_notebook(
        tmp_path / "nb.ipynb",
        "%matplotlib inline\nfrom IPython.display import Markdown, display\nimport os\nprint('x is', x)",
        "display(Markdown(f'**{name}**'))\ncwd = os.getcwd()\nx * 10",
        "import sys\nsys.modules.get('IPython') is None",  # libraries still see IPython absent
    )
    output = tmp_path / "out" / "executed.ipynb"
    seconds = runner.execute_notebook(
        source, output, {"x": 4, "name": "given"}, hide_modules=("IPython",), metadata={"step": "t"}
    )
    assert seconds >= 0 and sys.modules.get("IPython") is before  # nothing hidden afterwards
    cells = code_cells(output)
    assert cells[1]["metadata"]["tags"] == ["injected-parameters"]
    assert "x = 4" in cells[1]["source"] and "name = 'given'" in cells[1]["source"]
    assert [c["execution_count"] for c in cells] == [1, 2, 3, 4, 5]
    assert cells[2]["outputs"][0]["text"] == "x is 4\n"
    third = cells[3]["outputs"]
    assert third[0]["text"] == "**given**\n" and third[1]["data"]["text/plain"] == "40"
    assert cells[4]["outputs"][0]["data"]["text/plain"] == "True"
    metadata = json.loads(output.read_text())["metadata"]["cxr_provenance"]
    assert metadata["step"] == "t" and metadata["parameters"] == {"x": 4, "name": "given"}
    assert not metadata["failed"]


def test_modules_a_notebook_calls_can_display_without_ipython_too(tmp_path):
    helper = tmp_path / "helper_display.py"
    helper.write_text("def show(value):\n    from IPython.display import display\n\n    display(value)\n")
    source = write_notebook(
        tmp_path / "nb.ipynb",
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport helper_display"
        "\nhelper_display.show(x + 1)",
    )
    output = tmp_path / "executed.ipynb"
    runner.execute_notebook(source, output, {"x": 1}, hide_modules=("IPython", "IPython.display"))
    assert code_cells(output)[2]["outputs"][0]["text"] == "2\n"


def test_a_failing_cell_is_named_stops_the_notebook_and_is_written_with_its_traceback(tmp_path):
    source = write_notebook(tmp_path / "nb.ipynb", "y = 2", "1 / 0", "print('never')")
    output = tmp_path / "executed.ipynb"
    with pytest.raises(runner.NotebookExecutionError, match=r"executed.ipynb failed in cell 4: ZeroDivision"):
        runner.execute_notebook(source, output, {})
    cells = code_cells(output)
    assert cells[3]["outputs"][-1]["ename"] == "ZeroDivisionError"
    assert cells[4]["outputs"] == [] and cells[4].get("execution_count") is None
    assert json.loads(output.read_text())["metadata"]["cxr_provenance"]["failed"]


def test_ipython_syntax_other_than_matplotlib_is_refused_by_line():
    assert "Agg here" in runner.strip_magics("  %matplotlib inline\nx = 1", "nb, cell 1")
    with pytest.raises(runner.NotebookExecutionError, match=r"nb, cell 2, line 2: .*'%timeit'"):
        runner.strip_magics("x = 1\n%timeit x", "nb, cell 2")
    with pytest.raises(runner.NotebookExecutionError, match="'!ls'"):
        runner.strip_magics("!ls", "nb, cell 3")


def test_every_committed_notebook_runs_without_ipython_syntax():
    for step in STEPS:
        notebook = paths.NOTEBOOKS_DIR / f"{step.notebook}.ipynb"
        for number, cell in enumerate(code_cells(notebook), start=1):
            compile(
                runner.strip_magics(runner.cell_source(cell), f"{notebook.name}, cell {number}"), "c", "exec"
            )


def test_the_preset_fits_the_budget_with_equal_steps_and_says_so_in_its_comments():
    preset = resolve("phantom-gpu")
    split = session.phantom_split(preset)
    plan = session.plan_seconds(preset, split)
    critical = session.critical_path(plan)
    assert critical <= 500  # the 540 s limit stops steps at 520 s
    assert plan[session.TEACHING] < sum(v for k, v in plan.items() if k.startswith("03_train"))  # beside it
    options = [preset.train_options(r) for r in preset.resolutions]
    assert all(o == options[0] for o in options)  # same batch, epochs, lr, images: equal steps
    assert options[0]["max_train_images"] % options[0]["batch_size"] == 0 and split.train_used <= split.train
    assert options[0]["weights"] == "none" and not options[0].get("memory_efficient")
    assert preset.resolutions == [256, 512, 1024, 2048] and preset.data.max_size == 2048
    lines = (PRESET_DIR / "phantom-gpu.yaml").read_text().splitlines()
    text = " ".join(line.lstrip("#").strip() for line in lines)  # comments unwrapped
    for claim in (
        f"{split.steps} optimizer steps",
        f"{split.images} frontal images",
        f"{split.test} test images",
        f"{split.val} validation, {split.train} training",
        f"first {split.train_used} are used",
        f"= {critical:.0f} s on the critical path",
    ):
        assert claim in text, f"phantom-gpu.yaml's comments no longer say {claim!r}"


def test_erf_batch_keeps_8_images_up_to_256_px_and_one_at_2048_px(monkeypatch):
    import torch

    from cxrlib import receptive_field

    assert [receptive_field.default_erf_batch(r, r) for r in (32, 128, 256, 512, 1024, 2048)] == [
        8, 8, 8, 2, 1, 1,
    ]  # fmt: skip
    assert receptive_field.default_erf_batch(256, 512) == 4
    used = {}
    monkeypatch.setattr(
        receptive_field, "effective_receptive_field", lambda model, x, **kw: used.setdefault(x.shape[-1], kw)
    )
    images = {r: torch.zeros(2, 1, r, r, dtype=torch.uint8) for r in (256, 2048)}
    receptive_field.compute_erfs({(256, "a"): None, (2048, "a"): None}, images, seed=3)
    assert used[256]["batch_size"] == 8 and used[2048]["batch_size"] == 1  # what 05 uses at each size
    receptive_field.compute_erfs({(512, "b"): None}, {512: torch.zeros(1, 1, 512, 512)}, batch_size=3)
    assert used[512]["batch_size"] == 3


def test_dry_run_settings_keep_the_preset_and_shrink_its_sizes(tmp_path):
    import yaml

    settings = yaml.safe_load((PRESET_DIR / "phantom-gpu.yaml").read_text())
    tiny = session.dry_run_settings(settings, tmp_path)
    assert tiny["resolutions"] == [32, 64] and tiny["train"]["epochs"] == 1
    assert tiny["data"]["phantom_options"] == settings["data"]["phantom_options"]
    assert tiny["folds"] == settings["folds"] and tiny["cache"]["format"] == settings["cache"]["format"]
    assert settings["train"]["epochs"] == 6  # the original is not changed


def test_a_child_past_its_time_is_stopped_with_its_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild.pid"
    command = ["bash", "-c", f"sleep 30 & echo $! > {marker}; wait"]
    started = time.monotonic()
    assert session.run_child(command, timeout=1.0) is None
    assert time.monotonic() - started < 15
    stat = Path(f"/proc/{int(marker.read_text())}/stat")
    time.sleep(0.2)
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # the sleep went with its group
    assert session.run_child(["true"], timeout=10) == 0


def run_session(out: Path, work: Path, *args: str) -> tuple[int, float, dict]:
    env = {**os.environ, "OUT": str(out), "CXR_COMMIT": "dry-run-test"}
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--work-dir", str(work), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.monotonic() - started
    assert (out / "session.log").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result.returncode, seconds, json.loads((out / "session.json").read_text())


def archive_names(out: Path) -> set[str]:
    with tarfile.open(out / session.PACK_NAME) as tar:
        return {name.removeprefix("phantom_gpu_session/") for name in tar.getnames()}


@pytest.mark.slow
def test_dry_run_stops_at_a_tiny_time_limit_with_its_results_packed_then_resumes_to_every_output(tmp_path):
    work, first, second = tmp_path / "work", tmp_path / "out1", tmp_path / "out2"
    # 1. A 30 s limit (steps stop at 25 s): the session stops itself inside a step and still packs.
    # Every step may start however little time is left, so the stop falls inside one on any CPU speed
    # (the whole dry run takes well over 25 s).
    rc, seconds, record = run_session(
        first, work, "--budget-seconds", "30", "--reserve-seconds", "5", "--min-start-seconds", "0"
    )
    assert rc == 1 and seconds < 30 + 20
    statuses = {s["name"]: s["status"] for s in record["steps"]}
    assert "stopped (time limit)" in statuses.values(), statuses
    assert statuses["compile"] == "not reached (time limit)", statuses
    names = archive_names(first)
    assert {"session.json", "summary.md"} <= names and (first / "summary.md").is_file()
    done_before = [name for name, status in statuses.items() if status == "done" and name[:2].isdigit()]

    # 2. The same command with time enough: what was complete is skipped, the rest runs.
    rc, seconds, record = run_session(
        second, work, "--budget-seconds", "600", "--max-compile-seconds", "60", "--min-compile-seconds", "5"
    )
    statuses = {s["name"]: s["status"] for s in record["steps"]}
    assert rc == 0, statuses
    assert all(statuses[name] == "skipped (complete)" for name in done_before), statuses
    preset = resolve(
        str(work / "phantom-gpu-dry-run.yaml"), run_dir=str(work / "run"), figures_dir=str(work / "figures")
    )
    for step, resolution in planned_steps(preset):
        name = step.name(resolution)
        assert statuses[name] in ("done", "skipped (complete)", "done (beside the training)"), name
    assert record["git"]["commit"] and record["machine"]["cpu_cores"] >= 1
    assert record["plan"]["03_train_res32"] > 0
    assert all(s["seconds"] is not None for s in record["steps"] if s["status"].startswith("done"))
    (compiled,) = record["compile"]
    assert compiled["status"] == "measured", compiled
    assert {row["variant"] for row in compiled["rows"]} == {"train eager", "train compiled"}

    names = archive_names(second)
    expected = {"session.json", "summary.md", "figures/phantom_examples.png", "figures/delong_pvalues.png"}
    expected |= {f"run/{n}" for n in ("provenance.json", "tables/auc_bootstrap.csv", "compile")[:2]}
    for step, resolution in planned_steps(preset):
        expected.add(f"run/{step.name(resolution)}.ipynb")
        for path in step.outputs(preset, resolution):
            if path.name == "manifest.csv":  # the cache stays on the machine
                continue
            root, prefix = (work / "figures", "figures") if path.suffix == ".png" else (work / "run", "run")
            expected.add(f"{prefix}/{path.relative_to(root).as_posix()}")
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".pt", ".jpg")) or "/cache/" in n]
    executed = json.loads((work / "run" / "04_evaluate.ipynb").read_text())
    assert executed["metadata"]["cxr_provenance"]["data_hashes"]["index.csv"]
    summary = (second / "summary.md").read_text()
    assert "## Test AUC" in summary and "32 vs 64 px" in summary and "torch.compile" in summary
