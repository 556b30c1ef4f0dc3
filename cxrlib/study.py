"""What each numbered notebook runs, reads and writes (:data:`STEPS`), one call per cell, so that a step
runs (and is tested) without its notebook; a notebook starts with ``study.open_preset(step, globals())``."""

from __future__ import annotations

import os
import warnings
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import ensemble, metrics, models, paths, plots, splits
from . import field_sweep as arms
from . import recipe as rules
from . import throughput as speeds
from .cache import MANIFEST_NAME, CXRDataset, build_cache
from .datasets import check_data_root, index_from_source
from .evaluate import evaluate_external
from .fileio import ConfigError, write_csv_atomic
from .gradcam import example_for, gradcam
from .index import index_findings, read_index, select_findings, write_index
from .launch import build_command, launch, resolve_nproc
from .phantom import ensure_phantom
from .presets import Preset, resolve
from .receptive_field import compute_erfs, densenet121_field, erf_table
from .run_folder import set_aside_stale_run
from .train import get_args_parser


@dataclass(frozen=True)
class Step:
    """A notebook, the steps it reads, its files ``<run|cache|tables|figures|fold>/<name>``."""

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
    """Raise :class:`MissingInputError` naming the first missing input and its command."""
    if step == "00_data" and preset.data.source != "phantom":
        try:
            check_data_root(preset.data.source, preset.data_path, preset.data.csv)
        except FileNotFoundError as error:
            raise MissingInputError(f"{error}: set the data_root parameter (or data.root)") from None
    elif missing := missing_inputs(preset, step):
        cmd = f"python -m cxrlib.pipeline --preset {preset_arg or preset.name}"
        cmd += f" --run-dir {_shown(preset.run_dir)}" if preset.run_dir else ""
        path, writer = missing[0]
        raise MissingInputError(f"{_shown(path)} does not exist yet: run {cmd} (or notebook {writer} first)")


def open_preset(step: str, parameters: dict[str, Any]) -> Preset:
    """A notebook's preset with its parameters' overrides ("" or []: none) and its inputs checked."""
    overrides = {k: parameters[k] for k in OVERRIDES if parameters.get(k) not in (None, "", [])}
    p = resolve(parameters["preset"], **overrides)
    require_inputs(p, step, parameters["preset"])
    plots.show_inline()
    print(f"preset {p.name}: resolutions {p.resolutions}, folds {p.trained_folds()} of {p.fold_count}")
    print(f"artifacts in {p.run_path}, figures in {p.figures_path}")
    return p


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


def prepare_cache(preset: Preset, progress: bool = True):
    """Write every image at every resolution of the preset into its cache; raise on unreadable images."""
    index, cache = read_index(preset.index_path), preset.cache
    options = (preset.cache_path, preset.resolutions, cache.workers, cache.mode, cache.format)
    report = build_cache(index, *options, progress=progress)
    if not report.ok:
        raise RuntimeError(report.error_message())
    return report


def training_processes(preset: Preset) -> int:
    """Training processes per node: the preset's GPUs, or ``train.cpu_processes`` without a CUDA GPU."""
    return resolve_nproc(preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes)


def recipe(preset: Preset, resolution: int) -> pd.DataFrame:
    """The recipe at ``resolution`` on this machine, as the trainer plans it from the preset's flags."""
    command = build_command(resolution, 0, "", "", "", "", **preset.train_options(resolution))
    args = get_args_parser().parse_args(command[command.index("cxrlib.train") + 1 :])
    device = models.resolve_device(args.device)
    amp, processes = models.amp_dtype(device, args.amp), training_processes(preset)
    plan = rules.plan_training(args, processes, device, amp)
    images = len(splits.fold_ids(load_data(preset)[1], preset.trained_folds()[0], "train"))
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
        "channels_last": models.use_channels_last(device, args.channels_last),
        "weights": args.weights,
    }
    return pd.DataFrame({f"{resolution} px": rows})


def train_resolution(preset: Preset, resolution: int, echo: bool = True) -> list[Path]:
    """Train (resume; set aside if from other data) every fold at one resolution; returns the fold folders."""
    load_data(preset)  # fails early, with the step to run, when data or folds are missing
    files = {"index": preset.index_path, "folds": preset.folds_path, "cache": preset.cache_path}
    options = {"gpus": training_processes(preset), "echo": echo, "cache_format": preset.cache.format}
    options |= preset.train_options(resolution)
    runs = []
    for fold in preset.trained_folds():
        set_aside_stale_run(paths.fold_dir(preset.run_path, resolution, fold), files["index"], files["folds"])
        runs.append(launch(resolution, fold, preset.run_path, **files, **options))
    return runs


# What 04_evaluate shows: its tables (bootstrap, delong: folds pooled), ensembles (None with one resolution)
Evaluation = namedtuple("Evaluation", "auc table3 bootstrap delong ensembles weights")


def evaluate(preset: Preset) -> Evaluation:
    """Test AUCs, both ensembles, Table 3, intervals and DeLong tests, each written to ``tables/``."""
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


def external_validation(preset: Preset, index: str | Path):
    """The run's models and ensembles scored on another index (:func:`cxrlib.evaluate.evaluate_external`)."""
    cache = preset.cache_path / "external" / Path(index).resolve().parent.name
    device, n_boot = str(preset.analysis.device), preset.analysis.bootstrap
    return evaluate_external(preset.run_path, index, cache=cache, device=device, n_boot=n_boot)


# What 07_ensemble shows: two tables 04_evaluate wrote, and the best single resolution against both ensembles
EnsembleReport = namedtuple("EnsembleReport", "weights convergence versus_best")


def ensemble_report(preset: Preset) -> EnsembleReport:
    """The ensemble 04_evaluate fitted: its weights, convergence, and against the best single resolution."""
    if len(preset.resolutions) < 2:
        raise ValueError("the ensemble needs at least two resolutions")
    names = ("ensemble_weights", "ensemble_convergence", "table3")
    weights, convergence, table3 = (pd.read_csv(preset.tables_path / f"{name}.csv") for name in names)
    return EnsembleReport(weights, convergence, ensemble.versus_best_single(table3, preset.resolutions))


def cross_resolution(preset: Preset, progress: bool = True) -> pd.DataFrame:
    """Every trained model scored on its test fold at every resolution (``cross_resolution_auc.csv``)."""
    (index, folds), resolutions = load_data(preset), preset.resolutions
    cells = [(f, r, t) for f in preset.trained_folds() for r in resolutions for t in resolutions]
    rows, loaded = [], {}  # each trained model is loaded once for all its test resolutions
    for fold, trained_at, tested_at in tqdm(cells, desc="train x test resolution", disable=not progress):
        ids = splits.fold_ids(folds, fold, "test")
        path = cross_predictions(preset, index, ids, (trained_at, fold, tested_at), loaded)
        scores = metrics.read_predictions(path, ids)
        labels = metrics.labels_for(index, scores.index)
        for finding in scores.columns:
            auc = metrics.finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())[0]
            rows.append((trained_at, tested_at, fold, finding, auc))
    table = pd.DataFrame(rows, columns=["train_resolution", "test_resolution", "fold", "finding", "auc"])
    write_csv_atomic(table, preset.tables_path / "cross_resolution_auc.csv")
    return table


def cross_predictions(preset: Preset, index: pd.DataFrame, ids: list[str], cell: tuple, loaded: dict) -> Path:
    """Predictions of the model trained at R on T px (``cell``: R, fold, T), made when missing or stale."""
    trained_at, fold, tested_at = cell
    if trained_at == tested_at:
        return paths.predictions_path(preset.run_path, trained_at, fold)
    path = paths.cross_predictions_path(preset.run_path, trained_at, fold, tested_at)
    best = paths.fold_dir(preset.run_path, trained_at, fold) / paths.BEST_MODEL
    if not (path.is_file() and path.stat().st_mtime >= best.stat().st_mtime):
        device = analysis_device(preset)
        frame = index[index["dicom_id"].isin(set(ids))].reset_index(drop=True)
        dataset = CXRDataset(frame, tested_at, preset.cache_path, cache_format=preset.cache.format)
        if (trained_at, fold) not in loaded:
            loaded.clear()  # one model on the device at a time
            loaded[(trained_at, fold)] = trained_model(preset, trained_at, fold, device)
        batch, workers = models.inference_batch(tested_at), models.default_workers(device, local_world_size=1)
        model, amp = loaded[(trained_at, fold)], models.amp_dtype(device)
        frame = models.predict_logits(model, dataset, batch, device, amp, workers)
        write_csv_atomic(frame, path)
    return path


def example_images(preset: Preset, dicom_ids: list[str], resolution: int) -> torch.Tensor:
    """uint8 ``[N, 1, R, R]`` cached images of ``dicom_ids`` at ``resolution``."""
    subset = load_data(preset)[0].set_index("dicom_id").loc[dicom_ids].reset_index()
    dataset = CXRDataset(subset, resolution, preset.cache_path, cache_format=preset.cache.format)
    return torch.stack([dataset.read_image(i) for i in range(len(dataset))])


def analysis_device(preset: Preset) -> torch.device:
    """Where ERF, Grad-CAM and prediction run: ``analysis.device`` (auto: the GPU when one is visible)."""
    try:
        return models.resolve_device(preset.analysis.device)
    except (ConfigError, RuntimeError) as error:
        raise ValueError(f"preset {preset.name!r}: analysis.device: {error}") from None


def trained_model(preset: Preset, resolution: int, fold: int | None = None, device=None) -> torch.nn.Module:
    """The best model at ``resolution`` of ``fold`` (default: the first trained), in eval mode."""
    device = analysis_device(preset) if device is None else torch.device(device)
    folder = paths.fold_dir(preset.run_path, resolution, preset.trained_folds()[0] if fold is None else fold)
    return models.load_trained_model(folder, map_location=device).to(device)


def receptive_fields(preset: Preset, seed: int = 0, progress: bool = True):
    """ERF (eq. 1) per resolution at initialisation and after training; writes ``tables/erf.csv``."""
    device, folds = analysis_device(preset), load_data(preset)[1]
    test_ids = splits.fold_ids(folds, preset.trained_folds()[0], "test")[: preset.analysis.erf_images]
    images, nets = {r: example_images(preset, test_ids, r) for r in preset.resolutions}, {}
    for resolution in preset.resolutions:
        torch.manual_seed(seed)
        nets[(resolution, "init")] = models.build_model(weights=preset.train.weights).eval().to(device)
        nets[(resolution, "trained")] = trained_model(preset, resolution, device=device)
    results = compute_erfs(nets, images, exact=preset.analysis.erf_exact, seed=seed, progress=progress)
    table = erf_table(results, theoretical_rf_px=densenet121_field()[0])
    write_csv_atomic(table, preset.tables_path / "erf.csv")
    return results, table


# Inputs of cxrlib.plots.fig4_gradcam (dicts by finding), each row's image and the models' findings in order
GradCAMGrid = namedtuple("GradCAMGrid", "originals maps probabilities ground_truth dicom_ids findings")


def probability_table(grid: GradCAMGrid) -> pd.DataFrame:
    """Per row's finding: the model's probability of it at each resolution, and the image shown."""
    rows = {}
    for finding, by_res in grid.probabilities.items():
        column = grid.findings.index(finding)
        rows[finding] = {f"{r} px": round(float(p[column]), 3) for r, p in by_res.items()}
    return pd.DataFrame(rows).T.assign(image=pd.Series(grid.dicom_ids))


def gradcam_grid(preset: Preset) -> GradCAMGrid:
    """Grad-CAM of each finding at every resolution on the first test image positive for it."""
    (index, folds), fold = load_data(preset), preset.trained_folds()[0]
    label_set = index_findings(index)
    test = index[index["dicom_id"].isin(splits.fold_ids(folds, fold, "test"))]
    grid = GradCAMGrid({}, {}, {}, {}, {}, label_set)
    trained = {r: trained_model(preset, r) for r in preset.resolutions}
    for finding in preset.analysis.gradcam_findings:
        row, positive = example_for(test, finding)
        if not positive:
            message = f"no test image of fold {fold} is positive for {finding!r}; its row shows the first one"
            warnings.warn(message, stacklevel=2)
        image = row["dicom_id"]
        grid.dicom_ids[finding], grid.maps[finding], grid.probabilities[finding] = image, {}, {}
        grid.ground_truth[finding] = [f for f in label_set if row[f] == 1.0]
        for resolution, model in trained.items():
            result = gradcam(model, example_images(preset, [image], resolution), finding, findings=label_set)
            grid.maps[finding][resolution] = result.maps[0]
            grid.probabilities[finding][resolution] = result.probabilities[0]
        grid.originals[finding] = example_images(preset, [image], max(preset.resolutions))[0, 0].numpy()
    return grid


def throughput(preset: Preset) -> pd.DataFrame:
    """Table 2 on the analysis device with the trainer's settings of each resolution; writes it to tables/."""
    rows, device, steps = [], analysis_device(preset), preset.analysis.throughput_steps
    common = {"index": load_data(preset)[0], "cache_dir": preset.cache_path, "steps": steps}
    common["cudnn_benchmark"] = preset.train.cudnn_benchmark
    for resolution in preset.analysis.throughput_resolutions or preset.resolutions:
        flags = preset.train_options(resolution)
        settings = {"amp": flags.get("amp", "auto"), "memory_efficient": bool(flags.get("memory_efficient"))}
        settings["channels_last"] = str(flags.get("channels_last", "auto"))
        rows.append(speeds.measure_throughput([resolution], device, **common, **settings))
    frame = pd.concat(rows, ignore_index=True)
    speeds.write_table2(frame, preset.tables_path / "table2_throughput.csv")
    return frame


# What 10_field_sweep shows: the arms (cxrlib.field_sweep.Sweep), the resolution sweep, each arm's history
FieldSweepResult = namedtuple("FieldSweepResult", "sweep resolutions histories")


def field_sweep(preset: Preset, echo: bool = True) -> FieldSweepResult:
    """Train the arms (reusing a finished baseline), score them and measure their ERF; writes the tables."""
    fold, device = preset.trained_folds()[0], analysis_device(preset)
    folders = arms.train_arms(preset, fold, echo=echo)
    index, folds = load_data(preset)
    ids, resolution = splits.fold_ids(folds, fold, "test"), arms.sweep_resolution(preset)
    erf_images = example_images(preset, ids[: preset.analysis.erf_images], resolution)
    result = arms.sweep_table(preset, folders, index, ids, erf_images, device)
    histories = {arm: pd.read_csv(folder / paths.HISTORY) for arm, folder in folders.items()}
    return FieldSweepResult(result, arms.resolution_sweep(preset.field_sweep.compare), histories)
