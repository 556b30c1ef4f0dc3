"""The teaching notebook's (09) helpers: the ERF of an initial DenseNet121 at several sizes, and the ERF
at a resolution chosen on a slider, at initialisation and (where the run has a model there) trained."""

import importlib.util
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display
from matplotlib.figure import Figure
from torch import nn

from . import paths, study
from .models import build_model, load_trained_model
from .plots import erf_over_image
from .presets import Preset
from .receptive_field import ERFResult, default_erf_batch, effective_receptive_field, resize_images

TEACHING_RESOLUTIONS = (32, 64, 96, 128, 192, 256)  # the slider's sides besides the trained ones


def trained_model_paths(preset: Preset, fold: int | None = None) -> dict[int, Path]:
    """Folders of the preset's finished trainings of one fold (default: the first), by resolution."""
    fold = preset.trained_folds()[0] if fold is None else fold
    dirs = {int(r): paths.fold_dir(preset.run_path, r, fold) for r in preset.resolutions}
    return {r: d for r, d in dirs.items() if (d / paths.DONE).is_file() and (d / paths.BEST_MODEL).is_file()}


@dataclass
class ERFExplorer:
    """ERF maps of ``images`` resized to any resolution, at initialisation and (where trained) after."""

    images: torch.Tensor
    init_model: nn.Module
    trained: dict[int, nn.Module | Path] = field(default_factory=dict)
    seed: int = 0
    device: torch.device | str = "cpu"
    _results: dict[tuple[int, str], ERFResult] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_preset(cls, preset: Preset, images: torch.Tensor, init_model: nn.Module) -> "ERFExplorer":
        """The preset's trained models of its first trained fold, on its analysis device."""
        return cls(images, init_model, trained_model_paths(preset), device=study.analysis_device(preset))

    @property
    def resolutions(self) -> list[int]:  # what the slider offers
        return sorted(set(TEACHING_RESOLUTIONS) | set(self.trained))

    @property
    def default_resolution(self) -> int:  # the largest trained one up to 256 px
        return max([r for r in self.trained if r <= 256], default=128)

    def image(self, resolution: int) -> torch.Tensor:
        return resize_images(self.images, [resolution])[int(resolution)]

    def results(self, resolution: int) -> dict[str, ERFResult]:
        """``{"init": ERFResult}``, plus ``"trained"`` when the run has a model at ``resolution``."""
        resolution = int(resolution)
        states = ["init"] + (["trained"] if resolution in self.trained else [])
        for state in states:
            if (resolution, state) in self._results:
                continue
            model = self.init_model if state == "init" else self.trained[resolution]
            if not isinstance(model, nn.Module):
                model = self.trained[resolution] = load_trained_model(model, map_location=self.device)
            generator = torch.Generator().manual_seed(self.seed)
            batch = default_erf_batch(resolution, resolution)
            self._results[(resolution, state)] = effective_receptive_field(
                model.to(self.device), self.image(resolution), generator=generator, batch_size=batch
            )
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
        """The first image with each ERF's discs over it, then each ERF map."""
        return erf_over_image(self.image(resolution)[0, 0].numpy(), self.results(resolution), int(resolution))

    def show(self, resolution: int) -> None:
        """Print :meth:`caption` and display :meth:`figure` (what the slider redraws)."""
        print(self.caption(resolution))
        display(self.figure(resolution))


def erf_slider(explorer: ERFExplorer, value: int | None = None):
    """A resolution slider (ipywidgets) whose output is :meth:`ERFExplorer.show`."""
    import ipywidgets

    slider = ipywidgets.SelectionSlider(
        options=explorer.resolutions, value=explorer.default_resolution if value is None else int(value),
        description="resolution", continuous_update=False,
    )  # fmt: skip
    return ipywidgets.interactive(explorer.show, resolution=slider)


def show_erf_explorer(explorer: ERFExplorer, interactive: bool = True) -> None:
    """Display the slider (``interactive`` and ipywidgets installed), else what it shows at its start."""
    if interactive and importlib.util.find_spec("ipywidgets"):
        display(erf_slider(explorer))
    else:
        explorer.show(explorer.default_resolution)


class InitialERFs(namedtuple("InitialERFs", "images model results")):
    """Phantom images at several sizes (and as cached) and one initial DenseNet121's ERF at each size."""

    def summary(self) -> pd.DataFrame:
        """Per size: the 90%-mass disc's diameter in pixels and as a fraction of the image side."""
        return pd.DataFrame(
            [(r, round(2 * e.radius90_px, 1), round(e.fraction90, 3)) for r, e in self.results.items()],
            columns=["resolution", "ERF 90% diameter (px)", "fraction of image side"],
        )


def initial_erfs(preset: Preset, sizes=(32, 64, 128, 256), images: int = 4, seed: int = 0) -> InitialERFs:
    """The ERF of a randomly initialised DenseNet121 on the preset's first images at each size."""
    ids = study.load_data(preset)[0]["dicom_id"].iloc[:images].tolist()
    largest = max(preset.resolutions)
    cached = study.example_images(preset, ids, largest)
    resized = resize_images(cached, sizes)
    torch.manual_seed(seed)
    model = build_model("none").eval()
    results = {
        r: effective_receptive_field(model, resized[r], generator=torch.Generator().manual_seed(seed))
        for r in sizes
    }
    return InitialERFs({**resized, largest: cached}, model, results)
