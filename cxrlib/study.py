"""The steps of the paper's study for one preset: what each numbered notebook runs.

Composition only: each function takes a resolved :class:`cxrlib.presets.Preset`, calls the
modules that do the work (readers, splits, cache, launch, metrics, ensemble, receptive_field,
gradcam, throughput) and writes the artifacts of the contract, so a notebook cell is one call
plus display, and the same step runs (and is tested) without a notebook. A notebook starts
with :func:`open_preset`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import paths, splits
from .cache import CXRDataset
from .index import index_findings, read_index, select_findings, write_index
from .presets import Preset

# ----------------------------------------------------------------------------- every notebook


def open_preset(step: str, preset: str, **overrides: Any) -> Preset:
    """A notebook's setup in one call: resolve the preset with the notebook's parameters, stop in
    one line when an earlier step's output is missing, show figures inline, print where things go."""
    from . import plots, presets
    from .prerequisites import require_step_inputs

    cfg = presets.resolve(preset, **overrides)
    require_step_inputs(cfg, step, preset)
    plots.show_inline()
    folds = f"folds {cfg.trained_folds()} of {cfg.folds.count}"
    print(f"preset {cfg.name}: resolutions {cfg.resolutions}, {folds}")
    print(f"artifacts in {cfg.run_path}, figures in {cfg.figures_path}")
    return cfg


# ----------------------------------------------------------------------------- 00_data


def build_index(preset: Preset) -> pd.DataFrame:
    """The image index of the preset's data source (labels mapped by the preset's policy); a
    phantom is written first unless the same one is already complete."""
    from .datasets import index_from_source

    data = preset.data
    if data.source == "phantom":
        from .phantom import ensure_phantom

        ensure_phantom(preset.data_path, data.subjects, data.seed, data.max_size, **data.phantom_options)
    try:
        index = index_from_source(
            data.source, preset.data_path, data.csv, data.csv_options, data.policy, data.blank,
            None if data.views == "all" else data.views,
        )  # fmt: skip
        return select_findings(index, data.findings, f"preset {preset.name!r}: data.findings")
    except ValueError as error:
        if str(error).startswith(("unknown data source", "data.csv must")):
            raise ValueError(f"preset {preset.name!r}: {error}") from None
        raise


def prepare_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (or re-build) ``index.csv`` and ``folds.csv`` of the preset; returns both."""
    index = build_index(preset)
    write_index(index, preset.index_path)
    seed, val_fraction = preset.folds.seed, preset.folds.val_fraction
    if preset.folds.split == "official":
        folds = splits.official_folds(index, seed, val_fraction)
    else:
        folds = splits.make_folds(index, preset.folds.k, seed, val_fraction)
    splits.write_folds(folds, preset.folds_path)
    return index, folds


def load_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the preset's index and folds (the folds are checked for leakage against the index)."""
    for path in (preset.index_path, preset.folds_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist yet: run notebook 00_data first "
                f"(python -m cxrlib.pipeline --preset {preset.name})"
            )
    index = read_index(preset.index_path)
    return index, splits.read_folds(preset.folds_path, index)


# ----------------------------------------------------------------------------- 02_downscale


def prepare_cache(preset: Preset, index: pd.DataFrame | None = None, progress: bool = True):
    """Write every image at every resolution of the preset into its cache; raise on unreadable images."""
    from .cache import build_cache

    index = read_index(preset.index_path) if index is None else index
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
    (the trainer's automatic resume); a finished fold made from other data is set aside first
    (:func:`cxrlib.run_folder.set_aside_stale_run`).
    """
    from .launch import launch
    from .run_folder import set_aside_stale_run

    if int(resolution) not in preset.resolutions:
        raise ValueError(f"resolution {resolution} is not one of the preset's {preset.resolutions}")
    load_data(preset)  # fails early, with the step to run, when data or folds are missing
    processes = preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes
    runs = []
    for fold in folds if folds is not None else preset.trained_folds():
        folder = paths.fold_dir(preset.run_path, resolution, fold)
        set_aside_stale_run(folder, preset.index_path, preset.folds_path)
        runs.append(
            launch(
                int(resolution),
                int(fold),
                run_dir=preset.run_path,
                index=preset.index_path,
                folds=preset.folds_path,
                cache=preset.cache_path,
                gpus=processes,
                echo=echo,
                cache_format=preset.cache.format,
                **preset.train_options(resolution),
            )
        )
    return runs


def histories(preset: Preset) -> dict[tuple[int, int], pd.DataFrame]:
    """``history.csv`` of every trained (resolution, fold) that has one."""
    from .run_folder import read_histories

    return read_histories(preset.run_path, preset.resolutions, preset.trained_folds())


# ----------------------------------------------------------------------------- 04_evaluate, 07_ensemble


@dataclass
class Evaluation:
    """Everything 04_evaluate shows; the tables are also written to ``tables/``."""

    auc: pd.DataFrame  # long: finding, resolution, fold, auc, n_pos, n_neg, reason
    table3: pd.DataFrame
    bootstrap: pd.DataFrame  # pooled over folds: finding, resolution, auc, ci_low, ci_high, ...
    delong: pd.DataFrame  # pooled over folds: every pair of resolutions / ensembles per finding
    ensembles: Any  # cxrlib.ensemble.FoldEnsembles, or None with a single resolution
    weights: pd.DataFrame | None  # ensemble_weights.csv


def evaluate(preset: Preset) -> Evaluation:
    """Per-finding test AUC per resolution and fold, the two ensembles, Table 3, CIs and DeLong tests.

    Writes ``tables/auc.csv``, ``table3.csv``, ``ensemble_weights.csv`` (and
    ``ensemble_weights_by_fold.csv``), ``auc_bootstrap.csv``, ``delong.csv`` and
    ``ensemble_convergence.csv``.
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
        # each fold's own weights, which an external validation applies (cxrlib.evaluate)
        write_csv_atomic(ensembles.weights, preset.tables_path / "ensemble_weights_by_fold.csv")
        write_csv_atomic(ensembles.convergence, preset.tables_path / "ensemble_convergence.csv")
    auc_long = metrics.auc_table(scored, index)
    metrics.write_auc_tables(run, auc_long)
    pooled = metrics.pool_folds(scored)
    bootstrap = metrics.bootstrap_table(pooled, index, n_boot=preset.analysis.bootstrap)
    write_csv_atomic(bootstrap, preset.tables_path / "auc_bootstrap.csv")
    delong = metrics.pairwise_delong(pooled, index) if len(pooled) >= 2 else pd.DataFrame()
    write_csv_atomic(delong, preset.tables_path / "delong.csv")
    return Evaluation(auc_long, metrics.table3(auc_long), bootstrap, delong, ensembles, weights)


def external_validation(preset: Preset, index: str | Path, n_boot: int | None = None):
    """The run's models and ensembles scored on another data set (see
    :func:`cxrlib.evaluate.evaluate_external`): its tables under ``<run>/external/<the index's
    folder>``, its images cached beside the run's."""
    from .evaluate import evaluate_external

    name = Path(index).resolve().parent.name
    return evaluate_external(
        preset.run_path, index, cache=Path(str(preset.cache_path)) / "external" / name,
        device=str(preset.analysis.device), n_boot=n_boot or preset.analysis.bootstrap,
    )  # fmt: skip


@dataclass
class EnsembleReport:
    """What 07_ensemble shows, read from the tables 04_evaluate wrote."""

    weights: pd.DataFrame  # ensemble_weights.csv
    convergence: pd.DataFrame  # ensemble_convergence.csv
    versus_best: pd.DataFrame  # per finding: the best single resolution against both ensembles


def ensemble_report(preset: Preset) -> EnsembleReport:
    """The fitted ensemble of 04_evaluate (its weights, convergence and Table 3), not fitted again."""
    from .ensemble import versus_best_single

    tables = preset.tables_path
    if len(preset.resolutions) < 2:
        raise ValueError("the ensemble needs at least two resolutions")
    table3 = pd.read_csv(tables / "table3.csv")
    return EnsembleReport(
        pd.read_csv(tables / "ensemble_weights.csv"),
        pd.read_csv(tables / "ensemble_convergence.csv"),
        versus_best_single(table3, preset.resolutions),
    )


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

    index, folds = load_data(preset)
    resolutions = preset.resolutions
    cells = [(f, r, t) for f in preset.trained_folds() for r in resolutions for t in resolutions]
    rows, models = [], {}  # each trained model is loaded once for all its test resolutions
    for fold, trained_at, tested_at in tqdm(cells, desc="train x test resolution", disable=not progress):
        ids = splits.fold_ids(folds, fold, "test")
        path = cross_predictions(preset, index, ids, (trained_at, fold, tested_at), models)
        scores = metrics.read_predictions(path, ids)
        labels = metrics.labels_for(index, scores.index)
        for finding in scores.columns:
            auc = metrics.finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())[0]
            rows.append((trained_at, tested_at, fold, finding, auc))
    table = pd.DataFrame(rows, columns=list(CROSS_RESOLUTION_COLUMNS))
    write_csv_atomic(table, preset.tables_path / "cross_resolution_auc.csv")
    return table


def cross_predictions(
    preset: Preset, index: pd.DataFrame, ids: list[str], cell: tuple[int, int, int], models: dict
) -> Path:
    """The prediction file of the model trained at ``trained_at`` scored at ``tested_at`` (``cell``
    is ``(trained_at, fold, tested_at)``; its own test predictions on the diagonal); predicted now
    when missing or older than the model, which ``models`` keeps for the next test resolution."""
    from .fileio import write_csv_atomic
    from .models import amp_dtype, default_workers, inference_batch, predict_logits

    trained_at, fold, tested_at = cell
    if trained_at == tested_at:
        return paths.predictions_path(preset.run_path, trained_at, fold)
    path = paths.cross_predictions_path(preset.run_path, trained_at, fold, tested_at)
    best = paths.fold_dir(preset.run_path, trained_at, fold) / paths.BEST_MODEL
    if not (path.is_file() and path.stat().st_mtime >= best.stat().st_mtime):
        device = analysis_device(preset)
        frame = index[index["dicom_id"].isin(set(ids))].reset_index(drop=True)
        dataset = CXRDataset(frame, tested_at, preset.cache_path, cache_format=preset.cache.format)
        if (trained_at, fold) not in models:
            models.clear()  # one model on the device at a time
            models[(trained_at, fold)] = trained_model(preset, trained_at, fold, device)
        batch, workers = inference_batch(tested_at), default_workers(device, local_world_size=1)
        frame = predict_logits(models[(trained_at, fold)], dataset, batch, device, amp_dtype(device), workers)
        write_csv_atomic(frame, path)
    return path


# ----------------------------------------------------------------------------- 05, 06: ERF and Grad-CAM


def example_images(preset: Preset, dicom_ids: list[str], resolution: int) -> torch.Tensor:
    """uint8 ``[N, 1, R, R]`` cached images of ``dicom_ids`` at ``resolution``."""
    index, _ = load_data(preset)
    subset = index.set_index("dicom_id").loc[dicom_ids].reset_index()
    dataset = CXRDataset(subset, resolution, cache_dir=preset.cache_path, cache_format=preset.cache.format)
    return torch.stack([dataset.read_image(i) for i in range(len(dataset))])


def analysis_fold(preset: Preset) -> int:
    """The fold whose models and test images the figures use (the first trained fold)."""
    return preset.trained_folds()[0]


def analysis_device(preset: Preset) -> torch.device:
    """Where ERF, Grad-CAM and prediction run: ``analysis.device`` (auto: the GPU when one is visible)."""
    from .fileio import ConfigError
    from .models import resolve_device

    try:
        return resolve_device(preset.analysis.device)
    except (ConfigError, RuntimeError) as error:
        raise ValueError(f"preset {preset.name!r}: analysis.device: {error}") from None


def trained_model(
    preset: Preset, resolution: int, fold: int | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """The best model of one (resolution, fold), in eval mode on ``device`` (default: the analysis device)."""
    from .models import load_trained_model

    fold = analysis_fold(preset) if fold is None else fold
    device = analysis_device(preset) if device is None else torch.device(device)
    folder = paths.fold_dir(preset.run_path, resolution, fold)
    return load_trained_model(folder, map_location=device).to(device)


def receptive_fields(
    preset: Preset, states: tuple[str, ...] = ("init", "trained"), seed: int = 0, progress: bool = True
):
    """ERF (eq. 1) per resolution at initialisation and after training; writes ``tables/erf.csv``.

    The same test images of the analysis fold are used at every resolution. The "init" model
    has the weights training started from (``train.weights`` of the preset). Runs on the
    analysis device (:func:`analysis_device`), in float32: the ERF is a squared gradient.
    """
    from .models import build_model
    from .receptive_field import compute_erfs, densenet121_field, erf_table, write_erf_table

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
    table = erf_table(results, theoretical_rf_px=densenet121_field()[0])
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
    findings: list[str]  # the models' label set, in output order

    def probability_table(self) -> pd.DataFrame:
        """Per row's finding: the model's probability of it at each resolution, and the image shown."""
        rows = {}
        for finding, by_res in self.probabilities.items():
            column = self.findings.index(finding)
            rows[finding] = {f"{r} px": round(float(p[column]), 3) for r, p in by_res.items()}
        table = pd.DataFrame(rows).T
        return table.assign(image=pd.Series(self.dicom_ids))


def gradcam_grid(preset: Preset, findings: list[str] | None = None) -> GradCAMGrid:
    """Grad-CAM of each finding at every resolution on one test image of the analysis fold
    (:func:`cxrlib.gradcam.example_for`: the first one positive for it, an unselected example)."""
    from .gradcam import example_for, gradcam

    index, folds = load_data(preset)
    label_set = index_findings(index)
    findings = list(findings or preset.analysis.gradcam_findings)
    test = index[index["dicom_id"].isin(splits.fold_ids(folds, analysis_fold(preset), "test"))]
    grid = GradCAMGrid({}, {}, {}, {}, {}, label_set)
    models = {r: trained_model(preset, r) for r in preset.resolutions}
    for finding in findings:
        row, positive = example_for(test, finding)
        if not positive:
            warnings.warn(
                f"no test image of fold {analysis_fold(preset)} is positive for {finding!r}; "
                f"its row shows the first test image instead",
                stacklevel=2,
            )
        grid.dicom_ids[finding] = row["dicom_id"]
        grid.ground_truth[finding] = [f for f in label_set if row[f] == 1.0]
        grid.maps[finding], grid.probabilities[finding] = {}, {}
        for resolution, model in models.items():
            images = example_images(preset, [row["dicom_id"]], resolution)
            result = gradcam(model, images, finding, findings=label_set)
            grid.maps[finding][resolution] = result.maps[0]
            grid.probabilities[finding][resolution] = result.probabilities[0]
        original = example_images(preset, [row["dicom_id"]], max(preset.resolutions))
        grid.originals[finding] = original[0, 0].numpy()
    return grid


# ----------------------------------------------------------------------------- 08_throughput


def throughput(preset: Preset) -> pd.DataFrame:
    """Table 2 on the analysis device with the trainer's settings of each resolution (precision,
    memory_efficient, channels_last, cuDNN autotuning); writes ``tables/table2_throughput.csv``."""
    from .throughput import measure_throughput, write_table2

    index, _ = load_data(preset)
    rows = []
    for resolution in preset.analysis.throughput_resolutions or preset.resolutions:
        options = preset.train_options(resolution)
        rows.append(
            measure_throughput(
                [resolution],
                analysis_device(preset),
                steps=preset.analysis.throughput_steps,
                cache_dir=preset.cache_path,
                index=index,
                amp=options.get("amp", "auto"),
                memory_efficient=bool(options.get("memory_efficient")),
                channels_last=str(options.get("channels_last", "auto")),
                cudnn_benchmark=preset.train.cudnn_benchmark,
            )  # fmt: skip
        )
    frame = pd.concat(rows, ignore_index=True)
    write_table2(frame, preset.tables_path / "table2_throughput.csv")
    return frame


# ----------------------------------------------------------------------------- 10_field_sweep


@dataclass
class FieldSweepResult:
    """What 10_field_sweep shows: the arms (table, tests against the baseline, ERFs), the resolution
    sweep beside them, and each arm's training history."""

    sweep: Any  # cxrlib.field_sweep.Sweep
    resolutions: pd.DataFrame | None
    histories: dict[str, pd.DataFrame]


def field_sweep(preset: Preset, echo: bool = True) -> FieldSweepResult:
    """Train the arms (reusing a finished baseline), score them and measure their ERF after training;
    writes the tables."""
    from . import field_sweep as sweep

    fold, device = analysis_fold(preset), analysis_device(preset)
    folders = sweep.train_arms(preset, fold, echo=echo)
    index, folds = load_data(preset)
    ids, resolution = splits.fold_ids(folds, fold, "test"), sweep.sweep_resolution(preset)
    erf_images = example_images(preset, ids[: preset.analysis.erf_images], resolution)
    result = sweep.sweep_table(preset, folders, index, ids, erf_images, device)
    histories = {arm: pd.read_csv(folder / paths.HISTORY) for arm, folder in folders.items()}
    return FieldSweepResult(result, sweep.resolution_sweep(preset.field_sweep.compare), histories)
