"""What each numbered notebook reads from earlier steps, checked in its first cell.

A notebook opened cold in JupyterLab, or run by papermill, on a preset whose earlier steps
have not run stops at its first cell with one line that names the missing file and the
command that writes it, not with a traceback from deep inside a later cell::

    runs/demo/index.csv does not exist yet: run python -m cxrlib.pipeline --preset demo
    (or notebook 00_data first)

(one line in the notebook; wrapped here).

The files checked are the outputs the pipeline promises for the earlier steps
(:data:`cxrlib.pipeline.STEPS`), so the notebooks and the pipeline never disagree on them.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import paths
from .presets import Preset

# The earlier steps whose outputs each notebook reads.
NEEDS: dict[str, tuple[str, ...]] = {
    "00_data": (),
    "01_image_sizes": ("00_data",),
    "02_downscale": ("00_data",),
    "03_train": ("00_data", "02_downscale"),
    "04_evaluate": ("00_data", "03_train"),
    "05_receptive_field": ("00_data", "02_downscale", "03_train"),
    "06_gradcam": ("00_data", "02_downscale", "03_train"),
    "07_ensemble": ("00_data", "03_train", "04_evaluate"),
    "08_throughput": ("00_data", "02_downscale"),
    "09_receptive_field_explained": ("00_data", "02_downscale"),
    "10_field_sweep": ("00_data", "02_downscale"),
}


class MissingInputError(FileNotFoundError):
    """A notebook's input is missing. IPython shows it as its one-line message, no traceback.

    IPython (the kernel of JupyterLab and of papermill) prints what ``_render_traceback_``
    returns instead of a traceback. It is still an error: JupyterLab's "Run All" stops at it,
    and papermill fails the notebook with ``MissingInputError: <message>``.
    """

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the project when it is inside it (``runs/demo/index.csv``), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(paths.PROJECT_ROOT))
    except ValueError:
        return str(path)


def pipeline_command(preset: Preset, preset_arg: str | None = None) -> str:
    """The command that runs the preset's steps into the folder this notebook reads."""
    command = f"python -m cxrlib.pipeline --preset {preset_arg or preset.name}"
    if preset.run_dir:
        command += f" --run-dir {shown_path(preset.run_dir)}"
    return command


def missing_inputs(preset: Preset, step: str) -> list[tuple[Path, str]]:
    """Every file ``step`` reads that is not there yet, with the notebook that writes it
    (``"03_train with resolution 64"`` for a training output), in pipeline order."""
    from .pipeline import STEPS

    if step not in NEEDS:
        raise ValueError(f"unknown step {step!r}; steps are {list(NEEDS)}")
    missing = []
    for earlier in (s for s in STEPS if s.notebook in NEEDS[step]):
        resolutions = preset.resolutions if earlier.per_resolution else [None]
        for resolution in resolutions:
            writer = earlier.notebook
            if resolution is not None:
                writer += f" with resolution {resolution}"
            missing += [(p, writer) for p in earlier.outputs(preset, resolution) if not p.is_file()]
    return missing


def require_step_inputs(preset: Preset, step: str, preset_arg: str | None = None) -> None:
    """Raise :class:`MissingInputError` naming the first missing input of ``step`` and the command
    that writes it; return quietly when everything is there.

    ``preset_arg``: the preset as the notebook was given it (a name or a YAML path), for the
    command in the message (default: the preset's name). For ``00_data`` on real data, the
    data root and its label files are checked.
    """
    if step == "00_data" and preset.data.source != "phantom":
        from .datasets import check_data_root

        try:
            check_data_root(preset.data.source, preset.data_path, preset.data.csv)
        except FileNotFoundError as error:
            raise MissingInputError(
                f"{error}: set the data_root parameter to the folder of the data (or data.root in the preset)"
            ) from None
        return
    missing = missing_inputs(preset, step)
    if missing:
        path, writer = missing[0]
        raise MissingInputError(
            f"{shown_path(path)} does not exist yet: run {pipeline_command(preset, preset_arg)} "
            f"(or notebook {writer} first)"
        )
