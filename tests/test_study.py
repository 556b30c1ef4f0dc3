"""The study steps' choices: the analysis device (ERF, Grad-CAM, prediction) and its one-line errors."""

import pytest
import torch

from cxrlib import study
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
