"""Helpers of the teaching notebook: the conv-stack ERF, the resolution strip figure and the ERF explorer
behind its slider."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cxrlib import study, teaching
from cxrlib.paths import fold_dir
from cxrlib.plots import resolution_strip
from cxrlib.presets import resolve
from cxrlib.receptive_field import erf_of_conv_stack, erf_summary
from cxrlib.teaching import TEACHING_RESOLUTIONS, ERFExplorer, erf_slider, trained_model_paths


def test_conv_stack_erf_support_is_the_theoretical_field_and_grows_slower():
    maps = erf_of_conv_stack([1, 2, 4], size=25, n_images=2)
    for depth, erf in maps.items():
        rows, cols = np.nonzero(erf > 0)
        assert rows.max() - rows.min() + 1 <= 2 * depth + 1  # never beyond the theoretical field
        assert cols.max() - cols.min() + 1 <= 2 * depth + 1
    radii = [erf_summary(maps[d])["radius90_px"] for d in (1, 2, 4)]
    assert radii[0] < radii[1] < radii[2]
    # The ERF grows more slowly than the theoretical field (3 -> 9 px, three times).
    assert radii[2] / radii[0] < 3 * 0.9


@pytest.mark.parametrize("sizes", [(32,), (32, 64, 128)])
def test_resolution_strip_renders(sizes):
    images = {s: np.full((s, s), 128, dtype=np.uint8) for s in sizes}
    fig = resolution_strip(images, title="x")
    assert isinstance(fig, Figure) and len(fig.axes) == len(sizes)


def tiny_cnn(seed: int) -> torch.nn.Sequential:
    """Two 3x3 convolutions on the 3-channel input: an ERF in milliseconds."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1))


@pytest.fixture
def explorer():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8, generator=generator)
    return ERFExplorer(images, tiny_cnn(0), trained={32: tiny_cnn(1), 320: tiny_cnn(2)})


def test_the_explorer_offers_the_teaching_sizes_and_the_trained_resolutions(explorer):
    assert explorer.resolutions == sorted({*TEACHING_RESOLUTIONS, 32, 320})
    assert explorer.default_resolution == 32  # the largest trained one up to 256 px
    assert ERFExplorer(explorer.images, explorer.init_model).default_resolution == 128


def test_the_explorer_shows_the_trained_erf_where_there_is_a_model(explorer, capsys):
    trained = explorer.results(32)
    assert list(trained) == ["init", "trained"] and trained["init"].resolution == 32
    assert not np.allclose(trained["init"].erf, trained["trained"].erf)
    assert list(explorer.results(64)) == ["init"]
    assert explorer.caption(32).startswith("32 px: the ERF's 90% disc spans ")
    assert "after training" in explorer.caption(32) and "no trained model" in explorer.caption(64)
    assert len(explorer.figure(32).axes) == 3 and len(explorer.figure(64).axes) == 2  # image + maps
    explorer.show(64)
    assert capsys.readouterr().out.startswith("64 px: ")


def test_the_slider_redraws_the_explorer_at_the_chosen_resolution(explorer):
    pytest.importorskip("ipywidgets")
    widget = erf_slider(explorer)
    slider = widget.children[0]
    assert list(slider.options) == explorer.resolutions
    assert slider.value == explorer.default_resolution
    slider.value = 64
    assert widget.kwargs == {"resolution": 64} and (64, "init") in explorer._results


def test_the_explorer_runs_on_the_analysis_device_in_batches_that_fit_the_resolution(explorer, monkeypatch):
    calls = []

    def erf(model, images, **options):
        calls.append((next(model.parameters()).device.type, images.shape[-1], options["batch_size"]))
        return "an ERF"

    monkeypatch.setattr(teaching, "effective_receptive_field", erf)
    monkeypatch.setattr(study, "analysis_device", lambda preset: torch.device("meta"))  # not the CPU
    images, model = explorer.images, explorer.init_model
    on_device = ERFExplorer.from_preset(resolve("smoke"), images, model)
    on_device.trained = {2048: tiny_cnn(3)}
    on_device.results(2048)
    on_device.results(64)
    assert calls == [("meta", 2048, 1), ("meta", 2048, 1), ("meta", 64, 8)]  # (device, px, batch)


def test_trained_models_are_the_finished_trainings_of_the_first_fold(tmp_path):
    preset = resolve("smoke", run_dir=str(tmp_path))
    finished = fold_dir(tmp_path, 64, 0)
    finished.mkdir(parents=True)
    (finished / "done.json").write_text("{}")
    (finished / "best_model.pt").write_bytes(b"")
    fold_dir(tmp_path, 32, 0).mkdir(parents=True)  # started, not finished
    assert trained_model_paths(preset) == {64: finished}


@pytest.mark.slow
def test_the_slider_source_is_the_cache_at_the_largest_resolution_not_a_resized_copy(smoke_run):
    from cxrlib.study import example_images, load_data
    from cxrlib.teaching import initial_erfs

    initial = initial_erfs(smoke_run, sizes=(32, 128), images=2)
    largest = max(smoke_run.resolutions)  # 64 px: a trained model's images, not resized up and down
    ids = load_data(smoke_run)[0]["dicom_id"].iloc[:2].tolist()
    assert torch.equal(initial.images[largest], example_images(smoke_run, ids, largest))
    assert sorted(initial.results) == [32, 128] and initial.images[128].shape[-1] == 128
