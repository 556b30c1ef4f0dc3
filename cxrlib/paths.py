"""Project folders in one place: data/, runs/<preset>/, figures/<preset>/ and the run layout.

Every module that reads or writes an artifact of the contract (README, "Artifacts")
asks this module for its path, so the layout is defined once.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", PROJECT_ROOT / "data"))
RUNS_DIR = Path(os.environ.get("CXR_RUNS_DIR", PROJECT_ROOT / "runs"))
FIGURES_DIR = Path(os.environ.get("CXR_FIGURES_DIR", PROJECT_ROOT / "figures"))
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


def run_dir(preset: str, runs_root: str | os.PathLike | None = None) -> Path:
    """Folder of one preset's run: ``runs/<preset>/``."""
    return Path(runs_root or RUNS_DIR) / preset


def figures_dir(preset: str, figures_root: str | os.PathLike | None = None) -> Path:
    """Folder of one preset's figures: ``figures/<preset>/``."""
    return Path(figures_root or FIGURES_DIR) / preset


def tables_dir(run: str | os.PathLike) -> Path:
    """``<run>/tables/``: auc.csv, table3.csv, ensemble_weights.csv, erf.csv, table2_throughput.csv."""
    return Path(run) / "tables"


def fold_dir(run: str | os.PathLike, resolution: int, fold: int) -> Path:
    """``<run>/res<R>/fold<k>/``: checkpoint, history.csv and prediction files of one training run."""
    return Path(run) / f"res{int(resolution)}" / f"fold{int(fold)}"


def cross_predictions_path(run: str | os.PathLike, resolution: int, fold: int, test_resolution: int) -> Path:
    """``<run>/res<R>/fold<k>/test_predictions_at<T>.csv``: the model trained at R scored at T px."""
    return fold_dir(run, resolution, fold) / f"test_predictions_at{int(test_resolution)}.csv"
