"""The study steps' choices: the analysis device (ERF, Grad-CAM, prediction) and its one-line errors."""

import os
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cxrlib import field_sweep, metrics, models, receptive_field, study, throughput
from cxrlib.fileio import save_verified
from cxrlib.models import build_model
from cxrlib.paths import fold_dir
from cxrlib.presets import resolve


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
    from cxrlib.prerequisites import MissingInputError

    cfg = study.open_preset("00_data", "smoke", run_dir=str(tmp_path / "run"), device="cpu")
    assert cfg.name == "smoke" and cfg.analysis.device == "cpu"
    assert "preset smoke: resolutions [32, 64]" in capsys.readouterr().out
    with pytest.raises(
        MissingInputError, match=r"index.csv does not exist yet: run python -m cxrlib.pipeline"
    ):
        study.open_preset("04_evaluate", "smoke", run_dir=str(tmp_path / "run"))


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
