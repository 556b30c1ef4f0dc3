"""The steps of the study for one preset: what each numbered notebook runs, reads (:data:`STEPS`) and
writes. A notebook starts with ``cfg = study.open_preset("<its step>", globals())``; each cell is one call
here plus display, so a step runs (and is tested) without its notebook."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import ensemble, metrics, paths, plots, splits
from . import field_sweep as arms
from . import recipe as rules
from . import throughput as speeds
from .cache import MANIFEST_NAME, CXRDataset, build_cache
from .datasets import check_data_root, index_from_source
from .evaluate import evaluate_external
from .fileio import ConfigError, write_csv_atomic
from .gradcam import example_for, gradcam
from .index import index_findings, read_index, select_findings, write_index
from .launch import launch, override_flags, resolve_nproc
from .models import (
    amp_dtype,
    build_model,
    default_workers,
    inference_batch,
    load_trained_model,
    predict_logits,
    resolve_device,
    use_channels_last,
)
from .phantom import ensure_phantom
from .presets import Preset, resolve
from .receptive_field import compute_erfs, densenet121_field, erf_table
from .run_folder import read_histories, set_aside_stale_run
from .train import get_args_parser


@dataclass(frozen=True)
class Step:
    """A notebook, the steps whose outputs it reads, and the files it leaves: ``<folder>/<name>``, the
    folder ``run``, ``cache``, ``tables``, ``figures`` or ``fold`` (each trained fold at its resolution)."""

    notebook: str
    needs: str = ""
    files: str = ""
    per_resolution: bool = False  # run once per resolution, as 03_train_res<R>
    default: bool = True  # run by every preset that does not list its own steps
    trains: bool = False  # the time estimate is printed before it starts
    fixed: dict[str, Any] = field(default_factory=dict, compare=False)  # parameters always passed

    def name(self, resolution: int | None = None) -> str:
        return f"{self.notebook}_res{resolution}" if resolution is not None else self.notebook

    def outputs(self, preset: Preset, resolution: int | None = None) -> list[Path]:
        folders = {"run": [preset.run_path], "cache": [preset.cache_path], "tables": [preset.tables_path]}
        folders["figures"] = [preset.figures_path]
        if resolution is not None:
            folders["fold"] = [paths.fold_dir(preset.run_path, resolution, f) for f in preset.trained_folds()]
        files = [file.split("/") for file in self.files.split()]
        return [folder / name for where, name in files for folder in folders[where]]


STEPS: tuple[Step, ...] = (
    Step("00_data", "", "run/index.csv run/folds.csv"),
    Step("01_image_sizes", "00_data", "figures/fig3_image_sizes.png"),
    Step("02_downscale", "00_data", f"cache/{MANIFEST_NAME}"),
    Step("03_train", "00_data 02_downscale", " ".join(f"fold/{name}" for name in paths.FOLD_RESULTS),
         per_resolution=True, trains=True),
    Step("04_evaluate", "00_data 03_train", "figures/auc_vs_resolution.png figures/cross_resolution.png "
         "tables/auc.csv tables/table3.csv tables/delong.csv tables/cross_resolution_auc.csv"),
    Step("05_receptive_field", "00_data 02_downscale 03_train", "figures/fig1_erf.png tables/erf.csv"),
    Step("06_gradcam", "00_data 02_downscale 03_train", "figures/fig4_gradcam.png"),
    Step("07_ensemble", "04_evaluate", "figures/fig5_ensemble_weights.png tables/ensemble_weights.csv"),
    Step("08_throughput", "00_data 02_downscale", "tables/table2_throughput.csv"),
    # Interactive widgets can leave a batch kernel's last reply undelivered (nbclient waits forever).
    Step("09_receptive_field_explained", "00_data 02_downscale", fixed={"interactive": False}),
    Step("10_field_sweep", "00_data 02_downscale", "figures/field_sweep_arms.png tables/field_sweep.csv "
         "tables/field_sweep_delong.csv", default=False, trains=True),
)  # fmt: skip
OVERRIDES = ("data_root", "resolutions", "folds", "gpus", "run_dir", "figures_dir", "device", "fold_split")


class MissingInputError(FileNotFoundError):
    """A notebook's input is missing: IPython shows the one-line message, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def _shown(path: str | os.PathLike) -> str:
    path = Path(os.path.abspath(path))
    return str(path.relative_to(paths.PROJECT_ROOT) if path.is_relative_to(paths.PROJECT_ROOT) else path)


def missing_inputs(preset: Preset, step: str) -> list[tuple[Path, str]]:
    """Every file ``step`` reads that is not there yet, with the notebook that writes it, in order."""
    needs = {s.notebook: s.needs.split() for s in STEPS}
    if step not in needs:
        raise ValueError(f"unknown step {step!r}; steps are {list(needs)}")
    missing = []
    for earlier in (s for s in STEPS if s.notebook in needs[step]):
        for resolution in preset.resolutions if earlier.per_resolution else [None]:
            writer = earlier.notebook + (f" with resolution {resolution}" if resolution else "")
            missing += [(p, writer) for p in earlier.outputs(preset, resolution) if not p.is_file()]
    return missing


def require_inputs(preset: Preset, step: str, preset_arg: str | None = None) -> None:
    """Raise :class:`MissingInputError` naming the first missing input of ``step`` and the command that
    writes it (``preset_arg``: the preset as the notebook got it); for 00_data, a missing data root."""
    if step == "00_data" and preset.data.source != "phantom":
        try:
            check_data_root(preset.data.source, preset.data_path, preset.data.csv)
        except FileNotFoundError as error:
            raise MissingInputError(
                f"{error}: set the data_root parameter to the folder of the data (or data.root in the preset)"
            ) from None
    elif missing := missing_inputs(preset, step):
        command = f"python -m cxrlib.pipeline --preset {preset_arg or preset.name}"
        command += f" --run-dir {_shown(preset.run_dir)}" if preset.run_dir else ""
        path, writer = missing[0]
        raise MissingInputError(
            f"{_shown(path)} does not exist yet: run {command} (or notebook {writer} first)"
        )


def open_preset(step: str, parameters: dict[str, Any]) -> Preset:
    """A notebook's setup: ``cfg = study.open_preset("03_train", globals())`` resolves ``preset`` with the
    overrides its parameters cell declares ("" or []: the preset's value), stops in one line when an
    earlier step's output is missing, shows figures inline and prints where things go."""
    overrides = {k: parameters[k] for k in OVERRIDES if parameters.get(k) not in (None, "", [])}
    cfg = resolve(parameters["preset"], **overrides)
    require_inputs(cfg, step, parameters["preset"])
    plots.show_inline()
    print(
        f"preset {cfg.name}: resolutions {cfg.resolutions}, folds {cfg.trained_folds()} of {cfg.fold_count}"
    )
    print(f"artifacts in {cfg.run_path}, figures in {cfg.figures_path}")
    return cfg


def build_index(preset: Preset) -> pd.DataFrame:
    """The image index of the preset's data source; a phantom is written first unless already complete."""
    data = preset.data
    if data.source == "phantom":
        ensure_phantom(preset.data_path, data.subjects, data.seed, data.max_size, **data.phantom_options)
    views = None if data.views == "all" else data.views
    options = (data.csv, data.csv_options, data.policy, data.blank, views)
    index = index_from_source(data.source, preset.data_path, *options)
    return select_findings(index, data.findings, f"preset {preset.name!r}: data.findings")


def prepare_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (or re-build) ``index.csv`` and ``folds.csv`` of the preset; returns both."""
    index, (seed, fraction) = build_index(preset), (preset.folds.seed, preset.folds.val_fraction)
    write_index(index, preset.index_path)
    if preset.folds.split == "official":
        folds = splits.official_folds(index, seed, fraction)
    else:
        folds = splits.make_folds(index, preset.folds.k, seed, fraction)
    splits.write_folds(folds, preset.folds_path)
    return index, folds


def load_data(preset: Preset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The preset's index and folds (the folds checked for leakage against the index)."""
    require_inputs(preset, "01_image_sizes")  # 00_data's index and folds
    index = read_index(preset.index_path)
    return index, splits.read_folds(preset.folds_path, index)


def prepare_cache(preset: Preset, index: pd.DataFrame | None = None, progress: bool = True):
    """Write every image at every resolution of the preset into its cache; raise on unreadable images."""
    index, cache = read_index(preset.index_path) if index is None else index, preset.cache
    options = (preset.cache_path, preset.resolutions, cache.workers, cache.mode, cache.format)
    report = build_cache(index, *options, progress=progress)
    if not report.ok:
        raise RuntimeError(report.error_message())
    return report


def training_processes(preset: Preset) -> int:
    """Training processes per node: the preset's GPUs, or ``train.cpu_processes`` without a CUDA GPU."""
    return resolve_nproc(preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes)


def recipe(preset: Preset, resolution: int) -> pd.DataFrame:
    """The recipe at ``resolution`` on this machine, planned by the trainer's own function
    (:func:`cxrlib.recipe.plan_training`) from the flags :func:`train_resolution` passes."""
    files = ["--index", "", "--folds", "", "--cache", "", "--fold", "0", "--out", ""]
    flags = override_flags(preset.train_options(resolution))
    args = get_args_parser().parse_args([*files, "--resolution", str(resolution), *flags])
    device = resolve_device(args.device)
    amp, processes = amp_dtype(device, args.amp), training_processes(preset)
    plan = rules.plan_training(args, processes, device, amp)
    images = len(splits.fold_ids(load_data(preset)[1], analysis_fold(preset), "train"))
    images, batches = min(images, args.max_train_images or images), plan.batches
    table1 = "Table 1" if resolution in rules.TABLE1 else "Table 1's rule"
    rows = {
        f"learning rate ({table1})": rules.default_lr(resolution),
        f"effective batch ({table1})": rules.default_effective_batch(resolution),
        "learning rate asked": args.lr or "Table 1",
        "effective batch asked": args.effective_batch or "Table 1",
        "per-process batch": batches.per_gpu_batch,
        "processes": batches.world_size,
        "accumulation steps": batches.accumulation_steps,
        "effective batch": batches.effective_batch,
        "learning rate": plan.lr,
        "training images (first fold)": images,
        "optimizer steps per epoch": -(-images // batches.effective_batch),  # a last, partial step too
        "epochs (at most)": args.epochs,
        "schedule": f"Adam; lr x {args.lr_factor} after {args.patience_lr} epochs without a better "
        f"validation loss; stop after {args.patience_stop}",
        "device, precision": f"{device.type}, {str(amp).removeprefix('torch.') if amp else 'float32'}",
        "channels_last": use_channels_last(device, args.channels_last),
        "weights": args.weights,
    }
    return pd.DataFrame({f"{resolution} px": rows})


def train_resolution(
    preset: Preset, resolution: int, folds: list[int] | None = None, echo: bool = True
) -> list[Path]:
    """Train every fold of the preset at one resolution with torchrun; returns the fold folders. A finished
    fold is not trained again, an interrupted one resumes, one made from other data is set aside first."""
    load_data(preset)  # fails early, with the step to run, when data or folds are missing
    files = {"index": preset.index_path, "folds": preset.folds_path, "cache": preset.cache_path}
    options = {"gpus": training_processes(preset), "echo": echo, "cache_format": preset.cache.format}
    runs = []
    for fold in folds if folds is not None else preset.trained_folds():
        set_aside_stale_run(paths.fold_dir(preset.run_path, resolution, fold), files["index"], files["folds"])
        runs.append(
            launch(resolution, fold, preset.run_path, **files, **options, **preset.train_options(resolution))
        )
    return runs


def histories(preset: Preset, resolutions: list[int] | None = None) -> dict[tuple[int, int], pd.DataFrame]:
    """``history.csv`` of every trained (resolution, fold) that has one."""
    return read_histories(preset.run_path, resolutions or preset.resolutions, preset.trained_folds())


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
    """Test AUC per finding, resolution and fold, both ensembles, Table 3, intervals and DeLong tests; writes
    auc, table3, ensemble_weights(_by_fold), ensemble_convergence, auc_bootstrap and delong.csv."""
    index, tables = load_data(preset)[0], preset.tables_path
    run, resolutions, folds = preset.run_path, preset.resolutions, preset.trained_folds()
    scored = test = metrics.load_predictions(run, resolutions, folds, split="test")
    ensembles = weights = None
    if len(resolutions) >= 2:
        val = metrics.load_predictions(run, resolutions, folds, split="val")
        ensembles = ensemble.fit_fold_ensembles(val, test, index, resolutions, folds)
        scored = {**test, **ensembles.predictions}
        weights = ensemble.ensemble_weights_table(ensembles.weights)
        write_csv_atomic(weights, tables / "ensemble_weights.csv")
        # each fold's own weights, which an external validation applies (cxrlib.evaluate)
        write_csv_atomic(ensembles.weights, tables / "ensemble_weights_by_fold.csv")
        write_csv_atomic(ensembles.convergence, tables / "ensemble_convergence.csv")
    auc_long, pooled = metrics.auc_table(scored, index), metrics.pool_folds(scored)
    write_csv_atomic(auc_long, tables / "auc.csv")
    write_csv_atomic(metrics.table3(auc_long), tables / "table3.csv")
    bootstrap = metrics.bootstrap_table(pooled, index, n_boot=preset.analysis.bootstrap)
    write_csv_atomic(bootstrap, tables / "auc_bootstrap.csv")
    delong = metrics.pairwise_delong(pooled, index) if len(pooled) >= 2 else pd.DataFrame()
    write_csv_atomic(delong, tables / "delong.csv")
    return Evaluation(auc_long, metrics.table3(auc_long), bootstrap, delong, ensembles, weights)


def external_validation(preset: Preset, index: str | Path, n_boot: int | None = None):
    """The run's models and ensembles scored on another data set (:func:`cxrlib.evaluate.evaluate_external`),
    its tables under ``<run>/external/<the index's folder>``, its images cached beside the run's."""
    cache = preset.cache_path / "external" / Path(index).resolve().parent.name
    device, n_boot = str(preset.analysis.device), n_boot or preset.analysis.bootstrap
    return evaluate_external(preset.run_path, index, cache=cache, device=device, n_boot=n_boot)


@dataclass
class EnsembleReport:
    """What 07_ensemble shows, read from the tables 04_evaluate wrote."""

    weights: pd.DataFrame  # ensemble_weights.csv
    convergence: pd.DataFrame  # ensemble_convergence.csv
    versus_best: pd.DataFrame  # per finding: the best single resolution against both ensembles


def ensemble_report(preset: Preset) -> EnsembleReport:
    """The ensemble 04_evaluate fitted: its weights, convergence, and against the best single resolution."""
    if len(preset.resolutions) < 2:
        raise ValueError("the ensemble needs at least two resolutions")
    names = ("ensemble_weights", "ensemble_convergence", "table3")
    weights, convergence, table3 = (pd.read_csv(preset.tables_path / f"{name}.csv") for name in names)
    return EnsembleReport(weights, convergence, ensemble.versus_best_single(table3, preset.resolutions))


def cross_resolution(preset: Preset, progress: bool = True) -> pd.DataFrame:
    """Every trained model scored on its test fold at every resolution; writes ``cross_resolution_auc.csv``
    (the diagonal: the trainer's own predictions, as in ``auc.csv``)."""
    (index, folds), resolutions = load_data(preset), preset.resolutions
    cells = [(f, r, t) for f in preset.trained_folds() for r in resolutions for t in resolutions]
    rows, models = [], {}  # each trained model is loaded once for all its test resolutions
    for fold, trained_at, tested_at in tqdm(cells, desc="train x test resolution", disable=not progress):
        ids = splits.fold_ids(folds, fold, "test")
        scores = metrics.read_predictions(
            cross_predictions(preset, index, ids, (trained_at, fold, tested_at), models), ids
        )
        labels = metrics.labels_for(index, scores.index)
        for finding in scores.columns:
            auc = metrics.finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())[0]
            rows.append((trained_at, tested_at, fold, finding, auc))
    table = pd.DataFrame(rows, columns=["train_resolution", "test_resolution", "fold", "finding", "auc"])
    write_csv_atomic(table, preset.tables_path / "cross_resolution_auc.csv")
    return table


def cross_predictions(
    preset: Preset, index: pd.DataFrame, ids: list[str], cell: tuple[int, int, int], models: dict
) -> Path:
    """``test_predictions_at<T>.csv`` of the model trained at R (``cell``: R, fold, T; the diagonal: its
    own predictions), predicted (bf16 features on a GPU) when missing or older than the model."""
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


def example_images(preset: Preset, dicom_ids: list[str], resolution: int) -> torch.Tensor:
    """uint8 ``[N, 1, R, R]`` cached images of ``dicom_ids`` at ``resolution``."""
    subset = load_data(preset)[0].set_index("dicom_id").loc[dicom_ids].reset_index()
    dataset = CXRDataset(subset, resolution, preset.cache_path, cache_format=preset.cache.format)
    return torch.stack([dataset.read_image(i) for i in range(len(dataset))])


def analysis_fold(preset: Preset) -> int:
    """The fold whose models and test images the figures use (the first trained fold)."""
    return preset.trained_folds()[0]


def analysis_device(preset: Preset) -> torch.device:
    """Where ERF, Grad-CAM and prediction run: ``analysis.device`` (auto: the GPU when one is visible)."""
    try:
        return resolve_device(preset.analysis.device)
    except (ConfigError, RuntimeError) as error:
        raise ValueError(f"preset {preset.name!r}: analysis.device: {error}") from None


def trained_model(preset: Preset, resolution: int, fold: int | None = None, device=None) -> torch.nn.Module:
    """The best model of one (resolution, fold), in eval mode on ``device`` (default: the analysis device)."""
    device = analysis_device(preset) if device is None else torch.device(device)
    folder = paths.fold_dir(preset.run_path, resolution, analysis_fold(preset) if fold is None else fold)
    return load_trained_model(folder, map_location=device).to(device)


def receptive_fields(preset: Preset, states=("init", "trained"), seed: int = 0, progress: bool = True):
    """ERF (eq. 1) per resolution on the same test images, at initialisation (``train.weights``) and after
    training, on the analysis device in float32; writes ``tables/erf.csv``."""
    device, folds = analysis_device(preset), load_data(preset)[1]
    test_ids = splits.fold_ids(folds, analysis_fold(preset), "test")[: preset.analysis.erf_images]
    images, models = {r: example_images(preset, test_ids, r) for r in preset.resolutions}, {}
    for resolution in preset.resolutions:
        if "init" in states:
            torch.manual_seed(seed)
            models[(resolution, "init")] = build_model(weights=preset.train.weights).eval().to(device)
        if "trained" in states:
            models[(resolution, "trained")] = trained_model(preset, resolution, device=device)
    results = compute_erfs(models, images, exact=preset.analysis.erf_exact, seed=seed, progress=progress)
    table = erf_table(results, theoretical_rf_px=densenet121_field()[0])
    write_csv_atomic(table, preset.tables_path / "erf.csv")
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
        return pd.DataFrame(rows).T.assign(image=pd.Series(self.dicom_ids))


def gradcam_grid(preset: Preset, findings: list[str] | None = None) -> GradCAMGrid:
    """Grad-CAM of each finding at every resolution on the first test image of the analysis fold positive
    for it (:func:`cxrlib.gradcam.example_for`: an unselected example)."""
    (index, folds), fold = load_data(preset), analysis_fold(preset)
    label_set = index_findings(index)
    test = index[index["dicom_id"].isin(splits.fold_ids(folds, fold, "test"))]
    grid = GradCAMGrid({}, {}, {}, {}, {}, label_set)
    models = {r: trained_model(preset, r) for r in preset.resolutions}
    for finding in list(findings or preset.analysis.gradcam_findings):
        row, positive = example_for(test, finding)
        if not positive:
            message = f"no test image of fold {fold} is positive for {finding!r}; its row shows the first one"
            warnings.warn(message, stacklevel=2)
        image = row["dicom_id"]
        grid.dicom_ids[finding], grid.maps[finding], grid.probabilities[finding] = image, {}, {}
        grid.ground_truth[finding] = [f for f in label_set if row[f] == 1.0]
        for resolution, model in models.items():
            result = gradcam(model, example_images(preset, [image], resolution), finding, findings=label_set)
            grid.maps[finding][resolution] = result.maps[0]
            grid.probabilities[finding][resolution] = result.probabilities[0]
        grid.originals[finding] = example_images(preset, [image], max(preset.resolutions))[0, 0].numpy()
    return grid


def throughput(preset: Preset) -> pd.DataFrame:
    """Table 2 on the analysis device with the trainer's settings of each resolution (precision,
    memory_efficient, channels_last, cuDNN autotuning); writes ``tables/table2_throughput.csv``."""
    index, rows, device = load_data(preset)[0], [], analysis_device(preset)
    for resolution in preset.analysis.throughput_resolutions or preset.resolutions:
        options = preset.train_options(resolution)
        settings = {
            "amp": options.get("amp", "auto"), "memory_efficient": bool(options.get("memory_efficient")),
            "channels_last": str(options.get("channels_last", "auto")), "index": index,
            "cudnn_benchmark": preset.train.cudnn_benchmark, "cache_dir": preset.cache_path,
        }  # fmt: skip
        steps = preset.analysis.throughput_steps
        rows.append(speeds.measure_throughput([resolution], device, steps=steps, **settings))
    frame = pd.concat(rows, ignore_index=True)
    speeds.write_table2(frame, preset.tables_path / "table2_throughput.csv")
    return frame


@dataclass
class FieldSweepResult:
    """What 10_field_sweep shows: the arms (:class:`cxrlib.field_sweep.Sweep`), the resolution sweep
    beside them and each arm's training history."""

    sweep: Any
    resolutions: pd.DataFrame | None
    histories: dict[str, pd.DataFrame]


def field_sweep(preset: Preset, echo: bool = True) -> FieldSweepResult:
    """Train the arms (reusing a finished baseline), score them and measure their ERF; writes the tables."""
    fold, device = analysis_fold(preset), analysis_device(preset)
    folders = arms.train_arms(preset, fold, echo=echo)
    index, folds = load_data(preset)
    ids, resolution = splits.fold_ids(folds, fold, "test"), arms.sweep_resolution(preset)
    erf_images = example_images(preset, ids[: preset.analysis.erf_images], resolution)
    result = arms.sweep_table(preset, folders, index, ids, erf_images, device)
    histories = {arm: pd.read_csv(folder / paths.HISTORY) for arm, folder in folders.items()}
    return FieldSweepResult(result, arms.resolution_sweep(preset.field_sweep.compare), histories)
