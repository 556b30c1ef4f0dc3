"""The study steps: what each notebook reads (checked in its first cell: one line naming the file and
the command to run), the analysis device (ERF, Grad-CAM, prediction) and its one-line errors."""

import json
import os
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
import torch

from cxrlib import field_sweep, metrics, models, paths, receptive_field, study, throughput
from cxrlib.fileio import save_verified
from cxrlib.models import build_model
from cxrlib.paths import fold_dir
from cxrlib.pipeline import PipelineError, execute_step
from cxrlib.presets import resolve
from cxrlib.study import MissingInputError, missing_inputs, require_inputs

NOTEBOOKS = sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def touch(*files):
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_every_step_reads_only_earlier_steps():
    names = [step.notebook for step in study.STEPS]
    for position, step in enumerate(study.STEPS):
        assert set(step.needs.split()) <= set(names[:position]), step.notebook


def test_a_missing_index_names_the_file_the_command_and_the_notebook_in_one_line(tmp_path):
    preset = resolve("smoke", run_dir=str(tmp_path / "run"))
    with pytest.raises(MissingInputError) as caught:
        require_inputs(preset, "04_evaluate")
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
    require_inputs(preset, "02_downscale")  # index and folds are all it reads
    missing = missing_inputs(preset, "06_gradcam")
    assert missing[0] == (preset.cache_path / "manifest.csv", "02_downscale")
    assert missing[1][1] == "03_train with resolution 32"
    touch(preset.cache_path / "manifest.csv")
    expected = r"res32/fold0/history.csv does not exist yet: .*or notebook 03_train with resolution 32 first"
    with pytest.raises(MissingInputError, match=expected):
        require_inputs(preset, "06_gradcam", preset_arg="smoke")


def test_the_first_notebook_on_real_data_names_a_missing_data_root(tmp_path):
    preset = resolve("kermany", data_root=str(tmp_path / "nowhere"), run_dir=str(tmp_path / "run"))
    expected = r"not found: .*nowhere has no train/ or test/ folder; download .*set the data_root parameter"
    with pytest.raises(MissingInputError, match=expected):
        require_inputs(preset, "00_data")
    require_inputs(resolve("smoke", run_dir=str(tmp_path / "run")), "00_data")  # the phantom: nothing


def test_an_unknown_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown step '10_nothing'"):
        missing_inputs(resolve("smoke", run_dir=str(tmp_path)), "10_nothing")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_opens_its_own_step_in_one_line_after_the_parameters(notebook):
    nb = nbformat.read(notebook, as_version=4)
    setup = nb.cells[[c.cell_type for c in nb.cells].index("code") + 1]
    # study.open_preset resolves the preset and checks the step's inputs before anything else runs
    assert f'\ncfg = study.open_preset("{notebook.stem}", globals())' in f"\n{setup.source}"
    assert setup.source.count("cfg = ") == 1 and setup.source.rstrip().endswith("globals())")


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


def preset_with_a_trained_model(tmp_path, device=None):
    preset = resolve("smoke", run_dir=str(tmp_path / "run"), device=device)
    torch.manual_seed(0)
    best = fold_dir(preset.run_path, 32, 0) / "best_model.pt"
    best.parent.mkdir(parents=True)
    save_verified(build_model("none").state_dict(), best, {"epoch": 1})
    return preset


def test_the_analysis_device_is_the_presets_setting_and_auto_follows_the_gpu(tmp_path):
    assert resolve("smoke").analysis.device == "auto"
    auto = study.analysis_device(resolve("smoke"))
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset_with_a_trained_model(tmp_path, device="cpu")
    assert study.analysis_device(preset) == torch.device("cpu")
    model = study.trained_model(preset, 32, 0)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training


def test_an_unknown_or_missing_analysis_device_is_one_clear_error():
    with pytest.raises(ValueError, match=r"analysis.device 'tpu' is not auto, cpu, cuda or cuda:N"):
        resolve("smoke", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"analysis.device: .*no CUDA GPU is visible"):
            study.analysis_device(resolve("smoke", device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_node_the_trained_model_is_loaded_onto_the_gpu(tmp_path):
    preset = preset_with_a_trained_model(tmp_path)  # analysis.device auto
    model = study.trained_model(preset, 32, 0)
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_a_notebook_opens_its_preset_in_one_call_and_stops_in_one_line_without_its_inputs(tmp_path, capsys):
    # a parameters cell's names, as globals(): "" and [] keep the preset's value; other names are ignored
    cell = {"preset": "smoke", "run_dir": str(tmp_path / "run"), "device": "cpu", "folds": [], "gpus": ""}
    cfg = study.open_preset("00_data", {**cell, "resolution": 64, "In": []})
    assert cfg.name == "smoke" and cfg.analysis.device == "cpu" and cfg.run_path == tmp_path / "run"
    assert cfg.trained_folds() == [0] and cfg.train.gpus == 1
    assert "preset smoke: resolutions [32, 64], folds [0] of 3" in capsys.readouterr().out
    assert study.open_preset("00_data", {**cell, "folds": [2], "resolutions": [64]}).trained_folds() == [2]
    with pytest.raises(
        MissingInputError, match=r"index.csv does not exist yet: run python -m cxrlib.pipeline"
    ):
        study.open_preset("04_evaluate", cell)


def test_table2_runs_on_the_analysis_device_with_the_trainers_settings_of_each_resolution(
    tmp_path, monkeypatch
):
    preset = resolve("phantom-gpu", run_dir=str(tmp_path / "run"), device="cpu")
    preset.train.per_resolution = {2048: {"memory_efficient": True}}
    monkeypatch.setattr(study, "load_data", lambda preset: (pd.DataFrame(), None))
    calls = []

    def measure_throughput(resolutions, device=None, **settings):
        calls.append((resolutions, device, settings))
        return pd.DataFrame([dict.fromkeys(throughput.COLUMNS, 0)])

    monkeypatch.setattr(throughput, "measure_throughput", measure_throughput)
    monkeypatch.setattr(throughput, "write_table2", lambda frame, path: path)
    assert len(study.throughput(preset)) == 4
    assert [resolutions for resolutions, _, _ in calls] == [[256], [512], [1024], [2048]]
    assert {device for _, device, _ in calls} == {torch.device("cpu")}  # the analysis device, not cuda:0
    assert [s["memory_efficient"] for _, _, s in calls] == [False, False, False, True]
    assert all(
        s["cudnn_benchmark"] is False and s["amp"] == "auto" for _, _, s in calls
    )  # as phantom-gpu trains


def test_the_resolution_matrix_loads_each_model_once_and_sizes_batches_and_workers_for_one_process(
    tmp_path, monkeypatch
):
    preset = resolve("phantom-gpu", run_dir=str(tmp_path / "run"))
    ids = ["a", "b"]
    for resolution in preset.resolutions:  # trained models (their time stamps are read)
        (fold_dir(preset.run_path, resolution, 0) / "best_model.pt").parent.mkdir(parents=True)
        (fold_dir(preset.run_path, resolution, 0) / "best_model.pt").write_bytes(b"")
    monkeypatch.setattr(study, "load_data", lambda preset: (pd.DataFrame({"dicom_id": ids}), None))
    monkeypatch.setattr(study.splits, "fold_ids", lambda folds, fold, role: ids)
    monkeypatch.setattr(study, "analysis_device", lambda preset: torch.device("cuda"))
    monkeypatch.setattr(study, "CXRDataset", lambda frame, resolution, *args, **kw: resolution)
    monkeypatch.setattr(models, "amp_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # one process scores, on one of 8 GPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    loaded, scored = [], []
    monkeypatch.setattr(
        study, "trained_model", lambda preset, resolution, fold, device: loaded.append(resolution)
    )
    monkeypatch.setattr(
        models,
        "predict_logits",
        lambda *args: scored.append(args[1:3] + args[5:]) or pd.DataFrame({"x": ids}),
    )
    monkeypatch.setattr(
        metrics, "read_predictions", lambda path, ids: pd.DataFrame({"F": [0.9, 0.1]}, index=ids)
    )
    monkeypatch.setattr(
        metrics, "labels_for", lambda index, ids, *findings: pd.DataFrame({"F": [1.0, 0.0]}, index=ids)
    )
    table = study.cross_resolution(preset, progress=False)
    assert len(table) == 16 and (table["auc"] == 1.0).all()
    assert loaded == [256, 512, 1024, 2048]  # each model once for its 3 other test resolutions
    batches = {resolution: (batch, workers) for resolution, batch, workers in scored}
    assert len(scored) == 12 and batches == {256: (64, 8), 512: (64, 8), 1024: (16, 8), 2048: (4, 8)}


def test_the_field_sweep_measures_each_erf_in_batches_that_fit_the_resolution(tmp_path, monkeypatch):
    preset = resolve("phantom-gpu", run_dir=str(tmp_path / "run"))
    ids = ["a", "b"]
    index = pd.DataFrame({"dicom_id": ids, "subject_id": ["1", "2"]})
    monkeypatch.setattr(
        metrics, "read_predictions", lambda path, ids: pd.DataFrame({"F": [0.9, 0.1]}, index=ids)
    )
    monkeypatch.setattr(
        metrics, "labels_for", lambda index, ids, *findings: pd.DataFrame({"F": [1.0, 0.0]}, index=ids)
    )
    monkeypatch.setattr(
        metrics, "bootstrap_auc_ci", lambda *args, **kw: dict(auc=1.0, ci_low=1.0, ci_high=1.0)
    )
    monkeypatch.setattr(metrics, "pairwise_delong", lambda *args: pd.DataFrame(columns=["resolution_a"]))
    monkeypatch.setattr(models, "load_trained_model", lambda folder, map_location: torch.nn.Identity())
    batches = []

    def erf(model, images, **options):
        batches.append((images.shape[-1], options["batch_size"]))
        return SimpleNamespace(fraction90=0.5)

    monkeypatch.setattr(receptive_field, "effective_receptive_field", erf)
    images = torch.zeros(2, 1, 2048, 2048, dtype=torch.uint8)
    folders = {"baseline": tmp_path / "baseline", "global-context": tmp_path / "global-context"}
    field_sweep.sweep_table(preset, folders, index, ids, images, torch.device("cpu"))
    assert batches == [(2048, 1), (2048, 1)]  # one 2048 px image per pass, not 8
