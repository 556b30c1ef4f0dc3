"""Each notebook checks its step's inputs first: one line naming the file and the command to run."""

import json

import nbformat
import pytest

from cxrlib import paths
from cxrlib.pipeline import STEPS, PipelineError, execute_step
from cxrlib.prerequisites import NEEDS, MissingInputError, missing_inputs, require_step_inputs
from cxrlib.presets import resolve

NOTEBOOKS = sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def touch(*files):
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_every_step_says_what_it_reads():
    assert list(NEEDS) == [step.notebook for step in STEPS]


def test_a_missing_index_names_the_file_the_command_and_the_notebook_in_one_line(tmp_path):
    preset = resolve("smoke", run_dir=str(tmp_path / "run"))
    with pytest.raises(MissingInputError) as caught:
        require_step_inputs(preset, "04_evaluate")
    message = str(caught.value)
    assert message == (
        f"{tmp_path / 'run' / 'index.csv'} does not exist yet: run python -m cxrlib.pipeline "
        f"--preset smoke --run-dir {tmp_path / 'run'} (or notebook 00_data first)"
    )
    assert caught.value._render_traceback_() == [message]  # what IPython shows instead of a traceback
    assert isinstance(caught.value, FileNotFoundError)


def test_the_first_missing_input_is_named_in_pipeline_order(tmp_path):
    preset = resolve("smoke", run_dir=str(tmp_path / "run"))
    touch(preset.index_path, preset.folds_path)
    assert missing_inputs(preset, "01_image_sizes") == []
    require_step_inputs(preset, "02_downscale")  # index and folds are all it reads
    missing = missing_inputs(preset, "06_gradcam")
    assert missing[0] == (preset.cache_path / "manifest.csv", "02_downscale")
    assert missing[1][1] == "03_train with resolution 32"
    touch(preset.cache_path / "manifest.csv")
    expected = r"res32/fold0/history.csv does not exist yet: .*or notebook 03_train with resolution 32 first"
    with pytest.raises(MissingInputError, match=expected):
        require_step_inputs(preset, "06_gradcam", preset_arg="smoke")


def test_the_first_notebook_on_real_data_names_a_missing_data_root(tmp_path):
    preset = resolve("kermany", data_root=str(tmp_path / "nowhere"), run_dir=str(tmp_path / "run"))
    expected = r"not found: .*nowhere has no train/ or test/ folder; download .*set the data_root parameter"
    with pytest.raises(MissingInputError, match=expected):
        require_step_inputs(preset, "00_data")
    require_step_inputs(resolve("smoke", run_dir=str(tmp_path / "run")), "00_data")  # the phantom: nothing


def test_an_unknown_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown step '10_nothing'"):
        missing_inputs(resolve("smoke", run_dir=str(tmp_path)), "10_nothing")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_checks_its_own_step_in_its_first_cell_after_the_parameters(notebook):
    nb = nbformat.read(notebook, as_version=4)
    setup = nb.cells[[c.cell_type for c in nb.cells].index("code") + 1]
    # study.open_preset resolves the preset and checks the step's inputs before anything else runs
    assert f'cfg = study.open_preset(\n    "{notebook.stem}",\n    preset,' in setup.source
    assert setup.source.rstrip().endswith(")") and setup.source.count("\ncfg = ") == 1


@pytest.mark.slow
def test_papermill_fails_the_notebook_with_the_one_line_message(tmp_path):
    output = tmp_path / "04_evaluate.ipynb"
    parameters = {"preset": "smoke", "run_dir": str(tmp_path / "run"), "figures_dir": str(tmp_path / "fig")}
    with pytest.raises(PipelineError) as caught:
        execute_step(paths.NOTEBOOKS_DIR / "04_evaluate.ipynb", output, parameters, progress_bar=False)
    assert "MissingInputError: " in str(caught.value)
    assert "index.csv does not exist yet: run python -m cxrlib.pipeline --preset smoke" in str(caught.value)
    outputs = [out for cell in json.loads(output.read_text())["cells"] for out in cell.get("outputs", [])]
    errors = [out for out in outputs if out["output_type"] == "error"]
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1
    assert errors[0]["traceback"][0].endswith("(or notebook 00_data first)")
