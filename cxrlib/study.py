"""The steps of the paper's study for one preset: what each numbered notebook runs.

Each function takes a resolved :class:`cxrlib.presets.Preset`, calls the modules that do
the work and writes the artifacts of the contract, so a notebook cell is one call plus
display, and the same step can be run (and tested) without a notebook.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import datasets, splits
from .fileio import write_text_atomic
from .presets import Preset

PHANTOM_SETTINGS = "phantom_settings.json"


# ----------------------------------------------------------------------------- 00_data


def phantom_settings(preset: Preset) -> dict[str, Any]:
    """The settings that decide the phantom's bytes (regenerated when they change)."""
    data = preset.data
    return {
        "subjects": data.subjects,
        "seed": data.seed,
        "max_size": data.max_size,
        "options": data.phantom_options,
    }


def ensure_phantom(preset: Preset, workers: int | None = None) -> Path:
    """Write the preset's phantom unless the same phantom is already complete on disk."""
    from .phantom import make_phantom

    root = preset.data_path
    marker = root / PHANTOM_SETTINGS
    wanted = phantom_settings(preset)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    make_phantom(
        root,
        preset.data.subjects,
        seed=preset.data.seed,
        max_size=preset.data.max_size,
        workers=workers,
        **preset.data.phantom_options,
    )
    write_text_atomic(json.dumps(wanted, indent=2), marker)  # written last: marks the phantom complete
    return root


def build_index(preset: Preset) -> pd.DataFrame:
    """The image index of the preset's data source (labels mapped by the preset's policy)."""
    data = preset.data
    common = {
        "policy": data.policy,
        "blank": data.blank,
        "views": None if data.views == "all" else data.views,
    }
    if data.source in ("phantom", "mimic"):
        if data.source == "phantom":
            ensure_phantom(preset)
        return datasets.index_from_mimic(preset.data_path, **common)
    if data.source == "chexpert":
        return datasets.index_from_chexpert(preset.data_path, csv=data.csv or "train.csv", **common)
    if data.source == "csv":
        if not data.csv:
            raise ValueError(
                f"preset {preset.name!r}: data.csv must name the label file of a csv data source"
            )
        csv = Path(data.csv)
        csv = csv if csv.is_absolute() else preset.data_path / csv
        return datasets.index_from_csv(csv, root=preset.data_path, **{**data.csv_options, **common})
    raise ValueError(f"preset {preset.name!r}: unknown data source {data.source!r}")


def prepare_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (or re-build) ``index.csv`` and ``folds.csv`` of the preset; returns both."""
    index = build_index(preset)
    datasets.write_index(index, preset.index_path)
    folds = splits.make_folds(
        index, k=preset.folds.k, seed=preset.folds.seed, val_fraction=preset.folds.val_fraction
    )
    splits.write_folds(folds, preset.folds_path)
    return index, folds


def load_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the preset's index and folds (the folds are checked for leakage against the index)."""
    for path, step in ((preset.index_path, "00_data"), (preset.folds_path, "00_data")):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist yet: run notebook {step} first "
                f"(python -m cxrlib.pipeline --preset {preset.name})"
            )
    index = datasets.read_index(preset.index_path)
    return index, splits.read_folds(preset.folds_path, index)


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Images and subjects per role in each fold."""
    rows = []
    for k in range(splits.num_folds(folds)):
        role = folds[f"role_{k}"]
        for name in splits.ROLES:
            member = role == name
            rows.append(
                {
                    "fold": k,
                    "role": name,
                    "images": int(member.sum()),
                    "subjects": int(folds.loc[member, "subject_id"].nunique()),
                }
            )
    return pd.DataFrame(rows).pivot(index="fold", columns="role", values=["images", "subjects"])


# ----------------------------------------------------------------------------- 02_downscale


def prepare_cache(preset: Preset, index: pd.DataFrame | None = None, progress: bool = True):
    """Write every image at every resolution of the preset into its cache; raise on unreadable images."""
    from .cache import build_cache

    index = datasets.read_index(preset.index_path) if index is None else index
    report = build_cache(
        index,
        preset.cache_path,
        preset.resolutions,
        workers=preset.cache.workers,
        mode=preset.cache.mode,
        fmt=preset.cache.format,
        progress=progress,
    )
    if not report.ok:
        raise RuntimeError(report.error_message())
    return report


# ----------------------------------------------------------------------------- 03_train


def train_resolution(
    preset: Preset, resolution: int, folds: list[int] | None = None, echo: bool = True
) -> list[Path]:
    """Train every fold of the preset at one resolution with torchrun; returns the fold folders.

    A finished fold is not trained again and an interrupted one resumes from its checkpoint
    (the trainer's automatic resume).
    """
    from .launch import launch

    preset_resolutions = preset.resolutions
    if int(resolution) not in preset_resolutions:
        raise ValueError(f"resolution {resolution} is not one of the preset's {preset_resolutions}")
    load_data(preset)  # fails early, with the step to run, when data or folds are missing
    processes = preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes
    runs = []
    for fold in folds if folds is not None else preset.trained_folds():
        set_aside_stale_run(preset, resolution, fold)
        runs.append(
            launch(
                int(resolution),
                int(fold),
                run_dir=preset.run_path,
                index=preset.index_path,
                folds=preset.folds_path,
                cache=preset.cache_path,
                gpus=processes,
                nnodes=preset.train.nnodes,
                echo=echo,
                cache_format=preset.cache.format,
                **preset.train_options(resolution),
            )
        )
    return runs


def set_aside_stale_run(preset: Preset, resolution: int, fold: int) -> Path | None:
    """Move a finished run made from another index or fold file aside (never delete it).

    When the data of a preset changes (a new phantom, another data root), the old run's
    results no longer belong to it; they are renamed ``fold<k>.stale-<time>`` so that the
    new run starts clean and nothing is lost. Returns the new name, or None.
    """
    from .fileio import sha256_file
    from .paths import fold_dir

    run = fold_dir(preset.run_path, resolution, fold)
    done = run / "done.json"
    if not done.is_file():
        return None
    saved = json.loads(done.read_text()).get("fingerprint", {})
    current = {"index_sha256": sha256_file(preset.index_path), "folds_sha256": sha256_file(preset.folds_path)}
    if all(saved.get(key) == value for key, value in current.items()):
        return None
    stale = run.with_name(f"{run.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    run.rename(stale)
    warnings.warn(f"{run} was trained on another index or fold file; moved it to {stale}", stacklevel=2)
    return stale


def histories(preset: Preset) -> dict[tuple[int, int], pd.DataFrame]:
    """``history.csv`` of every trained (resolution, fold) that has one."""
    from .paths import fold_dir

    out = {}
    for resolution in preset.resolutions:
        for fold in preset.trained_folds():
            path = fold_dir(preset.run_path, resolution, fold) / "history.csv"
            if path.is_file():
                out[(resolution, fold)] = pd.read_csv(path)
    return out


# ----------------------------------------------------------------------------- 04_evaluate, 07_ensemble


@dataclass
class Evaluation:
    """Everything 04_evaluate and 07_ensemble show; the tables are also written to ``tables/``."""

    auc: pd.DataFrame  # long: finding, resolution, fold, auc, n_pos, n_neg, reason
    table3: pd.DataFrame
    bootstrap: pd.DataFrame  # pooled over folds: finding, resolution, auc, ci_low, ci_high, ...
    delong: pd.DataFrame  # pooled over folds: every pair of resolutions / ensembles per finding
    ensembles: Any  # cxrlib.ensemble.FoldEnsembles, or None with a single resolution
    weights: pd.DataFrame | None  # ensemble_weights.csv


def evaluate(preset: Preset) -> Evaluation:
    """Per-finding test AUC per resolution and fold, the two ensembles, Table 3, CIs and DeLong tests.

    Writes ``tables/auc.csv``, ``table3.csv``, ``ensemble_weights.csv``, ``auc_bootstrap.csv``,
    ``delong.csv`` and ``ensemble_convergence.csv``.
    """
    from . import ensemble, metrics
    from .fileio import write_csv_atomic

    index, _ = load_data(preset)
    run, resolutions, folds = preset.run_path, preset.resolutions, preset.trained_folds()
    test = metrics.load_predictions(run, resolutions, folds, split="test")
    scored: dict = dict(test)
    ensembles = weights = None
    if len(resolutions) >= 2:
        val = metrics.load_predictions(run, resolutions, folds, split="val")
        ensembles = ensemble.fit_fold_ensembles(val, test, index, resolutions, folds)
        scored.update(ensembles.predictions)
        weights = ensemble.ensemble_weights_table(ensembles.weights)
        ensemble.write_ensemble_weights(run, ensembles.weights)
        write_csv_atomic(ensembles.convergence, preset.tables_path / "ensemble_convergence.csv")
    auc_long = metrics.auc_table(scored, index)
    metrics.write_auc_tables(run, auc_long)
    pooled = metrics.pool_folds(scored)
    bootstrap = metrics.bootstrap_table(pooled, index, n_boot=preset.analysis.bootstrap)
    write_csv_atomic(bootstrap, preset.tables_path / "auc_bootstrap.csv")
    delong = metrics.pairwise_delong(pooled, index) if len(pooled) >= 2 else pd.DataFrame()
    write_csv_atomic(delong, preset.tables_path / "delong.csv")
    return Evaluation(auc_long, metrics.table3(auc_long), bootstrap, delong, ensembles, weights)


CROSS_RESOLUTION_COLUMNS = ("train_resolution", "test_resolution", "fold", "finding", "auc")


def cross_resolution(preset: Preset, progress: bool = True) -> pd.DataFrame:
    """Every trained model scored on its test fold at every resolution of the preset.

    Writes ``tables/cross_resolution_auc.csv`` (train_resolution, test_resolution, fold,
    finding, auc). The diagonal reads the trainer's own ``test_predictions.csv``, so it equals
    ``auc.csv``; each other cell is predicted on the analysis device (bf16 features on a GPU,
    float32 logits) and kept as ``res<R>/fold<k>/test_predictions_at<T>.csv``, which a re-run
    reuses unless the model is newer.
    """
    from tqdm.auto import tqdm

    from . import metrics
    from .fileio import write_csv_atomic
    from .paths import cross_predictions_path, fold_dir
    from .predict import predict_logits
    from .runtime import amp_dtype
    from .train import default_workers

    index, folds = load_data(preset)
    device = analysis_device(preset)
    workers = default_workers(device)  # on a GPU, decoding 2048 px images in one process is the bottleneck
    cells = [
        (f, r, t) for f in preset.trained_folds() for r in preset.resolutions for t in preset.resolutions
    ]
    rows = []
    models: dict[tuple[int, int], torch.nn.Module] = {}
    for fold, trained_at, tested_at in tqdm(cells, desc="train x test resolution", disable=not progress):
        ids = splits.fold_ids(folds, fold, "test")
        if trained_at == tested_at:
            scores = metrics.read_predictions(
                metrics.predictions_path(preset.run_path, trained_at, fold), ids
            )
        else:
            path = cross_predictions_path(preset.run_path, trained_at, fold, tested_at)
            best = fold_dir(preset.run_path, trained_at, fold) / "best_model.pt"
            if not (path.is_file() and path.stat().st_mtime >= best.stat().st_mtime):
                if (trained_at, fold) not in models:
                    models = {(trained_at, fold): trained_model(preset, trained_at, fold, device)}
                dataset = datasets.CXRDataset(
                    index[index["dicom_id"].isin(set(ids))].reset_index(drop=True),
                    tested_at,
                    preset.cache_path,
                    cache_format=preset.cache.format,
                )
                model = models[(trained_at, fold)]
                frame = predict_logits(model, dataset, 64, device, amp_dtype(device), num_workers=workers)
                write_csv_atomic(frame, path)
            scores = metrics.read_predictions(path, ids)
        labels = metrics.labels_for(index, scores.index)
        for finding in scores.columns:
            auc = metrics.finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())[0]
            rows.append((trained_at, tested_at, fold, finding, auc))
    table = pd.DataFrame(rows, columns=list(CROSS_RESOLUTION_COLUMNS))
    write_csv_atomic(table, preset.tables_path / "cross_resolution_auc.csv")
    return table


# ----------------------------------------------------------------------------- 05, 06: ERF and Grad-CAM


def example_images(preset: Preset, dicom_ids: list[str], resolution: int) -> torch.Tensor:
    """uint8 ``[N, 1, R, R]`` cached images of ``dicom_ids`` at ``resolution``."""
    index, _ = load_data(preset)
    subset = index.set_index("dicom_id").loc[dicom_ids].reset_index()
    dataset = datasets.CXRDataset(
        subset, resolution, cache_dir=preset.cache_path, cache_format=preset.cache.format
    )
    return torch.stack([dataset.read_image(i) for i in range(len(dataset))])


def analysis_fold(preset: Preset) -> int:
    """The fold whose models and test images the figures use (the first trained fold)."""
    return preset.trained_folds()[0]


def analysis_device(preset: Preset) -> torch.device:
    """Where ERF, Grad-CAM and prediction run: ``analysis.device`` (auto: the GPU when one is visible)."""
    from .runtime import ConfigError, resolve_device

    try:
        return resolve_device(preset.analysis.device)
    except (ConfigError, RuntimeError) as error:
        raise ValueError(f"preset {preset.name!r}: analysis.device: {error}") from None


def trained_model(
    preset: Preset, resolution: int, fold: int | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """The best model of one (resolution, fold), in eval mode on ``device`` (default: the analysis device)."""
    from .paths import fold_dir
    from .predict import load_trained_model

    fold = analysis_fold(preset) if fold is None else fold
    device = analysis_device(preset) if device is None else torch.device(device)
    return load_trained_model(fold_dir(preset.run_path, resolution, fold), map_location=device).to(device)


def receptive_fields(
    preset: Preset, states: tuple[str, ...] = ("init", "trained"), seed: int = 0, progress: bool = True
):
    """ERF (eq. 1) per resolution at initialisation and after training; writes ``tables/erf.csv``.

    The same test images of the analysis fold are used at every resolution. The "init" model
    has the weights training started from (``train.weights`` of the preset). Runs on the
    analysis device (:func:`analysis_device`), in float32: the ERF is a squared gradient.
    """
    from .models import build_model
    from .receptive_field import compute_erfs, erf_table, theoretical_receptive_field, write_erf_table

    index, folds = load_data(preset)
    device = analysis_device(preset)
    test_ids = splits.fold_ids(folds, analysis_fold(preset), "test")[: preset.analysis.erf_images]
    images = {r: example_images(preset, test_ids, r) for r in preset.resolutions}
    models = {}
    for resolution in preset.resolutions:
        if "init" in states:
            torch.manual_seed(seed)
            models[(resolution, "init")] = build_model(weights=preset.train.weights).eval().to(device)
        if "trained" in states:
            models[(resolution, "trained")] = trained_model(preset, resolution, device=device)
    results = compute_erfs(models, images, exact=preset.analysis.erf_exact, seed=seed, progress=progress)
    rf = theoretical_receptive_field(next(iter(models.values())).features)
    table = erf_table(results, theoretical_rf_px=rf)
    write_erf_table(preset.run_path, table)
    return results, table


@dataclass
class GradCAMGrid:
    """Inputs of :func:`cxrlib.plots.fig4_gradcam`, plus which image each row shows."""

    originals: dict[str, np.ndarray]
    maps: dict[str, dict[int, np.ndarray]]
    probabilities: dict[str, dict[int, np.ndarray]]
    ground_truth: dict[str, list[str]]
    dicom_ids: dict[str, str]


def gradcam_grid(preset: Preset, findings: list[str] | None = None) -> GradCAMGrid:
    """Grad-CAM of each finding at every resolution on one test image positive for it.

    The image of a row is the first test image of the analysis fold (in index order) with a
    positive label for the row's finding: an unselected example, not the best-looking one
    (the first test image, with a warning, when no test image is positive for it).
    """
    from .gradcam import gradcam
    from .labels import FINDINGS

    index, folds = load_data(preset)
    findings = list(findings or preset.analysis.gradcam_findings)
    test = index[index["dicom_id"].isin(splits.fold_ids(folds, analysis_fold(preset), "test"))]
    grid = GradCAMGrid({}, {}, {}, {}, {})
    models = {r: trained_model(preset, r) for r in preset.resolutions}
    for finding in findings:
        positives = test[test[finding] == 1.0]
        if positives.empty:
            warnings.warn(
                f"no test image of fold {analysis_fold(preset)} is positive for {finding!r}; "
                f"its row shows the first test image instead",
                stacklevel=2,
            )
        row = (positives if not positives.empty else test).iloc[0]
        grid.dicom_ids[finding] = row["dicom_id"]
        grid.ground_truth[finding] = [f for f in FINDINGS if row[f] == 1.0]
        grid.maps[finding], grid.probabilities[finding] = {}, {}
        for resolution, model in models.items():
            image = example_images(preset, [row["dicom_id"]], resolution)
            result = gradcam(model, image, finding)
            grid.maps[finding][resolution] = result.maps[0]
            grid.probabilities[finding][resolution] = result.probabilities[0]
        grid.originals[finding] = example_images(preset, [row["dicom_id"]], max(preset.resolutions))[
            0, 0
        ].numpy()
    return grid


# ----------------------------------------------------------------------------- 08_throughput


def throughput(preset: Preset) -> pd.DataFrame:
    """Table 2 on this machine's device; writes ``tables/table2_throughput.csv``."""
    from .throughput import measure_throughput, write_table2

    index, _ = load_data(preset)
    resolutions = preset.analysis.throughput_resolutions or preset.resolutions
    frame = measure_throughput(
        resolutions, steps=preset.analysis.throughput_steps, cache_dir=preset.cache_path, index=index
    )
    write_table2(frame, preset.tables_path / "table2_throughput.csv")
    return frame


def ensemble_versus_best(table3: pd.DataFrame, resolutions: list[int]) -> pd.DataFrame:
    """Per finding: the best single resolution and its mean test AUC against both ensembles."""
    rows = []
    for row in table3.to_dict("records"):
        means = {r: row.get(f"{r}_mean") for r in resolutions}
        means = {r: m for r, m in means.items() if m is not None and not pd.isna(m)}
        if not means:
            continue
        best = max(means, key=means.get)
        entry = {"finding": row["finding"], "best resolution": best, "best AUC": means[best]}
        for name in ("ensemble", "average"):
            value = row.get(f"{name}_mean")
            if value is not None and not pd.isna(value):
                entry[f"{name} AUC"] = value
                entry[f"{name} - best"] = value - means[best]
        rows.append(entry)
    return pd.DataFrame(rows).round(4)
