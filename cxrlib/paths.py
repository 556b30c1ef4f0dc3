"""Every artifact folder and file name of the project, in one place (docs/pipeline.md, "Artifacts")."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", PROJECT_ROOT / "data"))
RUNS_DIR = Path(os.environ.get("CXR_RUNS_DIR", PROJECT_ROOT / "runs"))
FIGURES_DIR = Path(os.environ.get("CXR_FIGURES_DIR", PROJECT_ROOT / "figures"))
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"

INDEX, FOLDS, PROVENANCE, TABLES = "index.csv", "folds.csv", "provenance.json", "tables"
# A trained fold (runs/<preset>/res<R>/fold<k>/)
HISTORY = "history.csv"  # one row per epoch
DONE = "done.json"  # written last: the training is complete
BEST_MODEL = "best_model.pt"  # (+ its .json sidecar, see cxrlib.fileio)
LOCK = ".lock"  # held by rank 0 while a training writes the folder
TRAIN_LOG = "train.log"
PREDICTIONS = {"val": "val_predictions.csv", "test": "test_predictions.csv"}
FOLD_RESULTS = (HISTORY, PREDICTIONS["val"], PREDICTIONS["test"], DONE)


def tables_dir(run: str | os.PathLike) -> Path:
    """``<run>/tables/``."""
    return Path(run) / TABLES


def fold_dir(run: str | os.PathLike, resolution: int, fold: int) -> Path:
    """``<run>/res<R>/fold<k>/``: checkpoints, history and predictions of one training."""
    return Path(run) / f"res{int(resolution)}" / f"fold{int(fold)}"


def variant_dir(run: str | os.PathLike, resolution: int, fold: int, arm: str = "baseline") -> Path:
    """:func:`fold_dir` for notebook 10's ``baseline`` arm, ``<run>/res<R>-<arm>/fold<k>/`` for another."""
    if arm == "baseline":
        return fold_dir(run, resolution, fold)
    return Path(run) / f"res{int(resolution)}-{arm}" / f"fold{int(fold)}"


def predictions_path(run: str | os.PathLike, resolution: int, fold: int, split: str = "test") -> Path:
    """``<run>/res<R>/fold<k>/<split>_predictions.csv`` (split ``val`` or ``test``)."""
    return fold_dir(run, resolution, fold) / PREDICTIONS[split]


def cross_predictions_path(run: str | os.PathLike, resolution: int, fold: int, test_resolution: int) -> Path:
    """``<run>/res<R>/fold<k>/test_predictions_at<T>.csv``: the model trained at R scored at T px."""
    return fold_dir(run, resolution, fold) / f"test_predictions_at{int(test_resolution)}.csv"
