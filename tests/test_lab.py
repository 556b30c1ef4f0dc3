"""`make lab` (python -m cxrlib.pipeline --lab): what it prints before JupyterLab starts, and how."""

import ast

import pandas as pd
import papermill
import pytest

from cxrlib import paths, pipeline


def test_the_pipeline_and_the_notebooks_default_to_the_same_preset():
    notebook = papermill.inspect_notebook(str(paths.NOTEBOOKS_DIR / "00_data.ipynb"))
    assert pipeline.get_args_parser().get_default("preset") == ast.literal_eval(notebook["preset"]["default"])


@pytest.mark.parametrize("complete", [False, True])
def test_lab_lists_the_run_then_becomes_jupyter_lab_on_the_notebooks(tmp_path, monkeypatch, capsys, complete):
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path)  # the default run folders, not this checkout's
    if complete:
        table = pd.DataFrame(
            {"step": ["00_data"], "state": ["complete"], "outputs": ["2/2"], "seconds": [1.0]}
        )
        monkeypatch.setattr(pipeline, "states", lambda run: table)
    started = []
    monkeypatch.setattr(pipeline.os, "execv", lambda program, argv: started.append((program, argv)))
    assert pipeline.main(["--lab", "--no-browser", "--ServerApp.port=8890"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["00_data", "complete" if complete else "not"]
    assert out[-1] == ("every step is complete" if complete else "a run starts at 00_data")
    ((program, argv),) = started
    assert program == argv[0] and argv[1:4] == ["-m", "jupyter", "lab"]
    assert f"--ServerApp.root_dir={paths.NOTEBOOKS_DIR}" in argv
    assert argv[-2:] == ["--no-browser", "--ServerApp.port=8890"]


def test_flags_the_pipeline_does_not_know_are_refused_without_lab(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--preset", "smoke", "--no-browser"])
    assert "unrecognized arguments: --no-browser" in capsys.readouterr().err
