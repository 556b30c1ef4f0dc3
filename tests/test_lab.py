"""`make lab` (python -m cxrlib.lab): what it prints before JupyterLab starts, and how it starts it."""

import re

from cxrlib import lab, paths, pipeline


def test_the_notebooks_default_to_the_demo_preset():
    assert lab.default_preset() == "demo"


def test_without_a_finished_run_it_names_the_command_that_makes_one(tmp_path):
    lines = lab.status_lines("demo", run_dir=str(tmp_path / "demo"))
    assert lines[0] == f'The notebooks\' parameters default to preset "demo": they read {tmp_path / "demo"}/'
    assert lines[1] == (
        f"{tmp_path / 'demo'} has no finished run (from 00_data on): "
        "python -m cxrlib.pipeline --preset demo (or make demo) produces one."
    )


def test_a_complete_run_is_said_to_be_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "step_state", lambda *args: "complete")
    lines = lab.status_lines("smoke", run_dir=str(tmp_path))
    assert lines[1] == f"{tmp_path} is complete: every notebook runs as it is."


def test_main_prints_the_url_with_its_token_then_starts_jupyter_lab_on_the_notebooks(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path)  # the default run folders, not this checkout's
    started = []
    monkeypatch.setattr(lab.os, "execv", lambda program, argv: started.append(argv))
    lab.main(["--port", "0", "--no-browser"])
    out = capsys.readouterr().out
    assert 'default to preset "demo"' in out and "python -m cxrlib.pipeline --preset demo" in out
    url = re.search(r"Open http://127\.0\.0\.1:(\d+)/lab\?token=(\w+)", out)
    assert url, out
    argv = started[0]
    assert argv[1:4] == ["-m", "jupyter", "lab"]
    assert f"--ServerApp.port={url[1]}" in argv and f"--IdentityProvider.token={url[2]}" in argv
    assert f"--ServerApp.root_dir={paths.NOTEBOOKS_DIR}" in argv and argv[-1] == "--no-browser"
