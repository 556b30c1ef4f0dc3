"""What makes coarse findings fail at a higher resolution? Arms that each change one thing from the plain
model at one resolution (notebook 10); the arms and their results: docs/coarse_findings.md."""

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pandas as pd
import torch

from . import metrics, models, paths
from . import receptive_field as rf
from .fileio import sha256_file, sidecar_path, write_csv_atomic
from .index import read_index, select_findings, write_index
from .presets import BASELINE_ARM, Preset
from .run_folder import list_checkpoints

SWEEP_COLUMNS = ("arm", "erf_fraction", "finding", "auc", "auc_low", "auc_high", "n_pos", "n_neg")
OWN_KEYS = ("findings", "continue_from")  # arm settings that are not cxrlib.train options


def sweep_resolution(preset: Preset) -> int:
    """The fixed resolution of the arms (``field_sweep.resolution``, else the preset's largest)."""
    return int(preset.field_sweep.resolution or max(preset.resolutions))


def _reusable(folder: Path, preset: Preset) -> bool:
    # a finished plain training made from this preset's index, folds and seed
    if not (folder / paths.DONE).is_file() or not (folder / paths.BEST_MODEL).is_file():
        return False
    made = json.loads((folder / paths.DONE).read_text()).get("fingerprint", {})
    same_data = made.get("index_sha256") == sha256_file(preset.index_path)
    same_data = same_data and made.get("folds_sha256") == sha256_file(preset.folds_path)
    plain = made.get("tiles", 1) == 1 and not made.get("global_context", False)
    return same_data and plain and made.get("seed", 0) == preset.train.options.get("seed", 0)


def arm_folders(preset: Preset, fold: int) -> dict[str, Path]:
    """Each arm's training folder (the baseline's may be another preset's finished run: ``reuse``)."""
    resolution = sweep_resolution(preset)
    folders = {a: paths.variant_dir(preset.run_path, resolution, fold, a) for a in preset.field_sweep.arms}
    if preset.field_sweep.reuse:
        # relative to the project (an absolute path stays as it is)
        reused = paths.PROJECT_ROOT / paths.fold_dir(preset.field_sweep.reuse, resolution, fold)
        if _reusable(reused, preset):
            folders[BASELINE_ARM] = reused
    return folders


def _arm_index(preset: Preset, arm: str, folder: Path) -> Path:
    # the preset's index, or (``findings``) a copy with only those findings
    if (findings := preset.field_sweep.arms[arm].get("findings")) is None:
        return preset.index_path
    index = select_findings(read_index(preset.index_path), findings, f"arm {arm!r}")
    return write_index(index, folder.parent / paths.INDEX)


def _start_from(source: Path, folder: Path) -> None:
    # the newest checkpoint and best model into an unstarted folder: the trainer continues that training
    if list_checkpoints(folder) or (folder / paths.DONE).is_file():
        return
    if not (checkpoints := list_checkpoints(source)):
        raise FileNotFoundError(f"{source} has no checkpoint to continue from")
    folder.mkdir(parents=True, exist_ok=True)
    best = source / paths.BEST_MODEL
    for path in (best, sidecar_path(best), sidecar_path(checkpoints[0][1]), checkpoints[0][1]):
        shutil.copy2(path, folder / path.name)  # the checkpoint last: it makes the folder resumable


def train_arms(preset: Preset, fold: int, echo: bool = True) -> dict[str, Path]:
    """Train every arm not finished yet (a finished one is skipped, an interrupted one resumes)."""
    from .launch import launch

    resolution = sweep_resolution(preset)
    processes = preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes
    folders = arm_folders(preset, fold)
    for arm, folder in folders.items():
        if not folder.is_relative_to(preset.run_path) and (folder / paths.DONE).is_file():
            continue  # another preset's finished run: read, never written
        settings = preset.field_sweep.arms[arm]
        if settings.get("continue_from"):
            _start_from(folders[settings["continue_from"]], folder)
        options = preset.train_options(resolution) | {k: v for k, v in settings.items() if k not in OWN_KEYS}
        launch(
            resolution, fold, run_dir=preset.run_path, index=_arm_index(preset, arm, folder),
            folds=preset.folds_path, cache=preset.cache_path, gpus=processes, nnodes=preset.train.nnodes,
            echo=echo, cache_format=preset.cache.format, out=folder, **options,
        )  # fmt: skip
    return folders


# the arms' results: field_sweep.csv, field_sweep_delong.csv (against the baseline), arm -> trained ERF
Sweep = namedtuple("Sweep", "table delong erfs")


def sweep_table(
    preset: Preset, folders: dict[str, Path], index: pd.DataFrame, test_ids: list[str], images: torch.Tensor,
    device: torch.device,
) -> Sweep:  # fmt: skip
    """Test AUC with intervals, the ERF and DeLong tests against the baseline per arm; writes the tables."""
    subject = index.set_index(index["dicom_id"].astype(str))["subject_id"].astype(str)
    rows, scored, erfs = [], {}, {}
    for arm, folder in folders.items():
        scores = scored[arm] = metrics.read_predictions(folder / paths.PREDICTIONS["test"], test_ids)
        model = models.load_trained_model(folder, map_location=device).to(device)
        batch, generator = rf.default_erf_batch(*images.shape[-2:]), torch.Generator().manual_seed(0)
        erfs[arm] = rf.effective_receptive_field(model, images, generator=generator, batch_size=batch)
        labels = metrics.labels_for(index, scores.index, scores.columns)
        groups = subject.loc[scores.index].to_numpy()
        for finding in scores.columns:
            y, s = labels[finding].to_numpy(), scores[finding].to_numpy()
            ci = metrics.bootstrap_auc_ci(y, s, groups, n_boot=preset.analysis.bootstrap)
            counts = metrics.finding_auc(y, s)[1:3]  # n_pos, n_neg
            rows.append((arm, erfs[arm].fraction90, finding, ci["auc"], ci["ci_low"], ci["ci_high"], *counts))
    table, delong = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS)), _against_baseline(preset, scored, index)
    write_csv_atomic(table, preset.tables_path / "field_sweep.csv")
    write_csv_atomic(delong, preset.tables_path / "field_sweep_delong.csv")
    return Sweep(table, delong, erfs)


def _against_baseline(preset: Preset, scored: dict[str, pd.DataFrame], index: pd.DataFrame) -> pd.DataFrame:
    # each arm against the baseline (diff = arm - baseline) per coarse and fine finding, one family
    studied, base, tables = [*preset.field_sweep.coarse, *preset.field_sweep.fine], scored[BASELINE_ARM], []
    for arm, scores in scored.items():
        shared = [f for f in studied if f in scores.columns and f in base.columns]
        if arm != BASELINE_ARM and shared:
            table = metrics.delong_findings(scores[shared], base.loc[scores.index, shared], index)
            tables.append(table.rename(columns={"auc_a": "auc_arm", "auc_b": "auc_baseline"}).assign(arm=arm))
    if not tables:
        return pd.DataFrame()
    delong = pd.concat(tables, ignore_index=True)
    family = f"{len(tables)} arms vs {BASELINE_ARM} x the coarse and fine findings"
    return metrics.correct_family(delong[["arm", *delong.columns[:-1]]], family)


def resolution_sweep(run: str | Path | None) -> pd.DataFrame | None:
    """A resolution sweep's per-finding mean test AUC beside its trained ERF, None before it has them."""
    if run is None:
        return None
    tables = paths.tables_dir(run if Path(run).is_absolute() else paths.PROJECT_ROOT / run)
    if not ((tables / "auc.csv").is_file() and (tables / "erf.csv").is_file()):
        return None
    auc = pd.read_csv(tables / "auc.csv")
    auc = auc[pd.to_numeric(auc["resolution"], errors="coerce").notna()].astype({"resolution": int})
    mean = auc.groupby(["resolution", "finding"], as_index=False)["auc"].mean()
    erf = pd.read_csv(tables / "erf.csv").query("state == 'trained'")
    erf = erf.rename(columns={"erf_fraction_of_image": "erf_fraction"})
    return mean.merge(erf, on="resolution")[["resolution", "erf_fraction", "finding", "auc"]]
