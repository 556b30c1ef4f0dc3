"""The pipeline runner on two tiny stand-in notebooks: resume, provenance, parameters, failure and lock."""

import json

import nbformat
import pytest

from cxrlib import pipeline, study
from cxrlib.pipeline import PipelineError, run_lock, run_pipeline
from cxrlib.presets import resolve
from cxrlib.study import Step


def write_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('preset = "smoke"\nrun_dir = None\nfigures_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def fake_steps(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "00_first.ipynb",
        "from pathlib import Path\n(Path(run_dir) / 'first.txt').write_text(preset)",
    )
    write_notebook(
        notebooks / "01_second.ipynb",
        "from pathlib import Path\n"
        "text = (Path(run_dir) / 'first.txt').read_text()\n"
        "(Path(run_dir) / 'second.txt').write_text(text + '!')",
    )
    steps = (Step("00_first", files="run/first.txt"), Step("01_second", "00_first", "run/second.txt"))
    monkeypatch.setattr(study, "STEPS", steps)
    monkeypatch.setattr(pipeline.paths, "NOTEBOOKS_DIR", notebooks)
    return tmp_path


@pytest.mark.slow
def test_runs_in_order_then_skips_then_resumes_after_a_lost_output(fake_steps, capsys):
    run = fake_steps / "run"
    # resolutions and gpus are overridden, but these notebooks do not declare them: they are not passed
    kwargs = {"run_dir": str(run), "figures_dir": str(fake_steps / "fig"), "progress_bar": False}
    run_pipeline("smoke", resolutions=[64], gpus=1, **kwargs)
    assert (run / "second.txt").read_text() == "smoke!"
    executed = nbformat.read(run / "01_second.ipynb", as_version=4)
    provenance = executed.metadata["cxr_provenance"]
    assert provenance["step"] == "01_second" and "torch" in provenance["packages"]
    assert executed.metadata["papermill"]["parameters"].keys() == {"preset", "run_dir", "figures_dir"}
    assert provenance["parameters"] == {
        "preset": "smoke",
        "run_dir": str(run),
        "figures_dir": str(fake_steps / "fig"),
    }
    assert json.loads((run / "provenance.json").read_text())["steps"].keys() == {"00_first", "01_second"}
    capsys.readouterr()

    run_pipeline("smoke", resolutions=[64], gpus=1, **kwargs)
    assert capsys.readouterr().out.count("skipped (complete)") == 2

    (run / "second.txt").unlink()
    run_pipeline("smoke", resolutions=[64], gpus=1, **kwargs)
    out = capsys.readouterr().out
    assert "00_first" in out and out.count("skipped (complete)") == 1
    assert (run / "second.txt").read_text() == "smoke!"


@pytest.mark.slow
def test_list_names_each_steps_state_and_where_a_run_starts(fake_steps, capsys):
    run = fake_steps / "run"
    folders = {"run_dir": str(run), "figures_dir": str(fake_steps / "fig")}

    def listed():
        capsys.readouterr()
        pipeline.list_steps("smoke", **folders)
        lines = capsys.readouterr().out.splitlines()
        return [line.split()[:2] if " outputs " in line else line for line in lines]

    assert listed() == [["00_first", "not"], ["01_second", "not"], "a run starts at 00_first"]
    run_pipeline("smoke", progress_bar=False, **folders)
    assert listed() == [["00_first", "complete"], ["01_second", "complete"], "every step is complete"]
    (run / "second.txt").unlink()
    assert listed() == [["00_first", "complete"], ["01_second", "outputs"], "a run starts at 01_second"]
    write_notebook(pipeline.paths.NOTEBOOKS_DIR / "00_first.ipynb", "print('edited')")
    assert listed()[0] == ["00_first", "changed"] and listed()[-1] == "a run starts at 00_first"
    pipeline.list_steps("smoke", resolutions=[64], **folders)  # other settings: every step has changed
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[:2]] == ["changed", "changed"]


@pytest.mark.slow
def test_a_failing_step_names_its_executed_notebook_and_error(fake_steps):
    write_notebook(pipeline.paths.NOTEBOOKS_DIR / "01_second.ipynb", "raise ValueError('bad input row 7')")
    with pytest.raises(PipelineError, match=r"01_second.ipynb failed .*ValueError: bad input row 7"):
        run_pipeline(
            "smoke", run_dir=str(fake_steps / "run"), figures_dir=str(fake_steps / "f"), progress_bar=False
        )


def test_a_second_pipeline_on_the_same_run_folder_is_refused(tmp_path):
    preset = resolve("smoke", run_dir=str(tmp_path / "run"))
    with run_lock(preset), pytest.raises(PipelineError, match="another pipeline is running"):
        run_pipeline("smoke", run_dir=str(tmp_path / "run"), progress_bar=False)
    with run_lock(preset):  # released after the first holder left
        pass


def test_unknown_step_for_from_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="--from 'nope' is not a step"):
        run_pipeline("smoke", run_dir=str(tmp_path), start_from="nope", progress_bar=False)
