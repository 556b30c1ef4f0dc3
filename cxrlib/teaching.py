"""The "try it yourself" part of the teaching notebook (09): the ERF at a resolution chosen on a slider.

:class:`ERFExplorer` measures the effective receptive field (eq. 1) of a randomly initialised
DenseNet121 on the same phantom images at any resolution and, where the preset's run has a
trained model at that resolution, of that model too. :meth:`ERFExplorer.show` prints one line
and draws one figure; the slider of :func:`show_erf_explorer` calls the same method, so the
figure in JupyterLab is the one an executed notebook (``interactive = False``) shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from . import paths
from .paths import fold_dir
from .plots import erf_over_image
from .presets import Preset
from .receptive_field import ERFResult, default_erf_batch, effective_receptive_field, resize_images

# Image sides the slider offers besides the preset's trained resolutions: seconds each on a CPU.
TEACHING_RESOLUTIONS = (32, 64, 96, 128, 192, 256)


def trained_model_paths(preset: Preset, fold: int | None = None) -> dict[int, Path]:
    """Folders of the preset's finished trainings (``done.json`` and ``best_model.pt``) of one fold,
    by resolution; the resolutions not trained yet are left out."""
    fold = preset.trained_folds()[0] if fold is None else fold
    found = {}
    for resolution in preset.resolutions:
        run = fold_dir(preset.run_path, resolution, fold)
        if (run / paths.DONE).is_file() and (run / paths.BEST_MODEL).is_file():
            found[int(resolution)] = run
    return found


@dataclass
class ERFExplorer:
    """ERF maps at any resolution, at initialisation and (where trained) after training.

    ``images``: uint8 ``[N, 1, S, S]`` phantom images, resized to each chosen resolution;
    ``init_model``: the randomly initialised network; ``trained``: the trained model of each
    resolution, or its run folder (loaded on first use); ``device``: where the ERFs are computed
    (the preset's analysis device), in batches that fit the resolution
    (:func:`cxrlib.receptive_field.default_erf_batch`). Results are kept, so going back to a
    resolution is instant.
    """

    images: torch.Tensor
    init_model: nn.Module
    trained: dict[int, nn.Module | Path] = field(default_factory=dict)
    seed: int = 0
    device: torch.device | str = "cpu"
    _results: dict[tuple[int, str], ERFResult] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_preset(cls, preset: Preset, images: torch.Tensor, init_model: nn.Module) -> ERFExplorer:
        """An explorer offering the preset's trained models of its first trained fold, on its analysis
        device."""
        from .study import analysis_device

        return cls(images, init_model, trained_model_paths(preset), device=analysis_device(preset))

    @property
    def resolutions(self) -> list[int]:
        """What the slider offers: the teaching sizes and every trained resolution."""
        return sorted(set(TEACHING_RESOLUTIONS) | set(self.trained))

    @property
    def default_resolution(self) -> int:
        """The largest trained resolution up to 256 px, else 128 px."""
        trained = [r for r in self.trained if r <= 256]
        return max(trained) if trained else 128

    def image(self, resolution: int) -> torch.Tensor:
        """The images at ``resolution``: uint8 ``[N, 1, R, R]``."""
        return resize_images(self.images, [resolution])[int(resolution)]

    def trained_model(self, resolution: int) -> nn.Module:
        """The trained model at ``resolution`` (loaded from its run folder the first time)."""
        from .models import load_trained_model

        model = self.trained[int(resolution)]
        if not isinstance(model, nn.Module):
            model = self.trained[int(resolution)] = load_trained_model(model, map_location=self.device)
        return model

    def results(self, resolution: int) -> dict[str, ERFResult]:
        """``{"init": ERFResult}``, plus ``"trained"`` when the run has a model at ``resolution``."""
        resolution = int(resolution)
        states = ["init"] + (["trained"] if resolution in self.trained else [])
        for state in states:
            if (resolution, state) not in self._results:
                model = self.init_model if state == "init" else self.trained_model(resolution)
                generator = torch.Generator().manual_seed(self.seed)
                self._results[(resolution, state)] = effective_receptive_field(
                    model.to(self.device), self.image(resolution), generator=generator,
                    batch_size=default_erf_batch(resolution, resolution),
                )  # fmt: skip
        return {state: self._results[(resolution, state)] for state in states}

    def caption(self, resolution: int) -> str:
        """One line: how much of the image side the ERF's 90%-mass disc spans at ``resolution``."""
        results = self.results(resolution)
        line = f"{int(resolution)} px: the ERF's 90% disc spans {100 * results['init'].fraction90:.0f}% "
        line += "of the image side at initialisation"
        if "trained" in results:
            return line + f", {100 * results['trained'].fraction90:.0f}% after training"
        return line + " (the run has no trained model at this resolution)"

    def figure(self, resolution: int) -> Figure:
        """The first image at ``resolution`` with each ERF's discs over it, then each ERF map
        (:func:`cxrlib.plots.erf_over_image`)."""
        return erf_over_image(self.image(resolution)[0, 0].numpy(), self.results(resolution), int(resolution))

    def show(self, resolution: int) -> None:
        """Print :meth:`caption` and display :meth:`figure` (what the slider redraws)."""
        from IPython.display import display

        print(self.caption(resolution))
        display(self.figure(resolution))


def erf_slider(explorer: ERFExplorer, value: int | None = None):
    """An ipywidgets ``interactive``: a resolution slider over :attr:`ERFExplorer.resolutions` whose
    output is :meth:`ERFExplorer.show` (redrawn when the slider is released). Needs ipywidgets."""
    import ipywidgets

    slider = ipywidgets.SelectionSlider(
        options=explorer.resolutions,
        value=explorer.default_resolution if value is None else int(value),
        description="resolution",
        continuous_update=False,
    )
    return ipywidgets.interactive(explorer.show, resolution=slider)


def show_erf_explorer(explorer: ERFExplorer, interactive: bool = True) -> None:
    """Display the slider (``interactive`` and ipywidgets installed), else the default resolution's
    caption and figure: the same output the slider shows at its start."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        interactive = False
    if interactive:
        from IPython.display import display

        display(erf_slider(explorer))
    else:
        explorer.show(explorer.default_resolution)


@dataclass
class InitialERFs:
    """Section 3 of the teaching notebook: the same phantom images at several sizes and the ERF of
    one randomly initialised DenseNet121 at each."""

    images: dict[int, torch.Tensor]  # uint8 [N, 1, R, R] per size, and as cached at the largest resolution
    model: nn.Module
    results: dict[int, ERFResult]

    def summary(self) -> pd.DataFrame:
        """Per size: the 90%-mass disc's diameter in pixels and as a fraction of the image side."""
        sizes = list(self.results)
        return pd.DataFrame({
            "resolution": sizes,
            "ERF 90% diameter (px)": [round(2 * self.results[r].radius90_px, 1) for r in sizes],
            "fraction of image side": [round(self.results[r].fraction90, 3) for r in sizes],
        })  # fmt: skip


def initial_erfs(preset: Preset, sizes=(32, 64, 128, 256), images: int = 4, seed: int = 0) -> InitialERFs:
    """The ERF of a randomly initialised DenseNet121 on the first ``images`` phantom images of the
    preset, resized from its largest cached resolution to each of ``sizes`` (seconds on a CPU).
    ``images`` also holds the cached ones at that resolution: the source to resize for a trained
    model (a trained model's ERF differs on images blurred by resizing up and down again)."""
    from .models import build_model
    from .study import example_images, load_data

    index, _ = load_data(preset)
    ids = index["dicom_id"].iloc[:images].tolist()
    largest = max(preset.resolutions)
    cached = example_images(preset, ids, largest)
    resized = resize_images(cached, sizes)
    torch.manual_seed(seed)
    model = build_model("none").eval()
    results = {
        r: effective_receptive_field(model, resized[r], generator=torch.Generator().manual_seed(seed))
        for r in sizes
    }
    return InitialERFs({**resized, largest: cached}, model, results)
