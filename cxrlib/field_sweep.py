"""What makes coarse findings fail at a higher resolution? Arms that each change one thing.

In a resolution sweep, coarse, relational findings (Cardiomegaly: heart width over chest width)
can lose AUC at the top resolution while fine ones gain. Three explanations fit such a loss: the
**field** (the paper's: the effective receptive field covers less of the chest), the **training
budget** (the same optimizer steps go less far on 4x more pixels) and **competition** (the fine
findings, learnable only there, take over the shared features). Here the resolution, the images,
the fold and the recipe stay the top resolution's, and each arm changes one thing from the plain
model (the ``baseline``): a wider field, more steps, or only the coarse findings to learn. An arm
that brings the coarse findings back while the fine ones hold points at its explanation.

An arm is a name and its trainer options (``field_sweep.arms`` of the preset:
:class:`cxrlib.presets.FieldSweepConfig`). :func:`arm_folders` says where each arm's training lives
(the baseline may be another preset's run: ``field_sweep.reuse``), :func:`train_arms` trains the
missing ones, :func:`sweep_table` scores them (test AUC with a patient-bootstrap interval, the ERF
after training, paired clustered DeLong tests of every arm against the baseline) and
:func:`resolution_sweep` reads the matching numbers of a resolution sweep for the same figure.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import metrics, paths
from .fileio import sha256_file, sidecar_path, write_csv_atomic
from .index import read_index, select_findings, write_index
from .presets import BASELINE_ARM, Preset
from .run_folder import list_checkpoints

SWEEP_COLUMNS = ("arm", "erf_fraction", "finding", "auc", "auc_low", "auc_high", "n_pos", "n_neg")
OWN_KEYS = ("findings", "continue_from")  # arm settings that are not cxrlib.train options


def sweep_resolution(preset: Preset) -> int:
    """The fixed resolution of the arms (``field_sweep.resolution``, else the preset's largest)."""
    return int(preset.field_sweep.resolution or max(preset.resolutions))


def reusable(folder: Path, preset: Preset) -> bool:
    """A finished plain training in ``folder`` made from this preset's index and folds."""
    done = folder / paths.DONE
    if not done.is_file():
        return False
    record = json.loads(done.read_text())
    fingerprint = record.get("fingerprint", {})
    same_data = fingerprint.get("index_sha256") == sha256_file(preset.index_path) and fingerprint.get(
        "folds_sha256"
    ) == sha256_file(preset.folds_path)
    plain = fingerprint.get("tiles", 1) == 1 and not fingerprint.get("global_context", False)
    seed = fingerprint.get("seed", 0) == preset.train.options.get("seed", 0)
    return same_data and plain and seed and (folder / paths.BEST_MODEL).is_file()


def arm_folders(preset: Preset, fold: int) -> dict[str, Path]:
    """Each arm's training folder by name: the reused run's for the baseline when it is
    :func:`reusable`, else this preset's own (``res<R>/fold<k>``, ``res<R>-<arm>/fold<k>``)."""
    resolution = sweep_resolution(preset)
    folders = {
        arm: paths.variant_dir(preset.run_path, resolution, fold, arm) for arm in preset.field_sweep.arms
    }
    if preset.field_sweep.reuse:
        reused = paths.fold_dir(preset.field_sweep.reuse, resolution, fold)
        reused = reused if reused.is_absolute() else paths.PROJECT_ROOT / reused
        if reusable(reused, preset):
            folders[BASELINE_ARM] = reused
    return folders


def arm_index(preset: Preset, arm: str, folder: Path) -> Path:
    """The index an arm trains on: the preset's, or (``findings``) a copy with only those findings."""
    findings = preset.field_sweep.arms[arm].get("findings")
    if findings is None:
        return preset.index_path
    path = folder.parent / paths.INDEX
    index = select_findings(read_index(preset.index_path), findings, f"arm {arm!r}")
    write_index(index, path)
    return path


def start_from(source: Path, folder: Path) -> None:
    """Copy ``source``'s newest checkpoint and best model into an unstarted ``folder``: the trainer
    then continues that training (same weights, optimizer, schedule and random state)."""
    if list_checkpoints(folder) or (folder / paths.DONE).is_file():
        return
    checkpoints = list_checkpoints(source)
    if not checkpoints:
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
            start_from(folders[settings["continue_from"]], folder)
        options = {k: v for k, v in settings.items() if k not in OWN_KEYS}
        launch(
            resolution, fold, run_dir=preset.run_path, index=arm_index(preset, arm, folder),
            folds=preset.folds_path, cache=preset.cache_path, gpus=processes, nnodes=preset.train.nnodes,
            echo=echo, cache_format=preset.cache.format, out=folder,
            **{**preset.train_options(resolution), **options},
        )  # fmt: skip
    return folders


@dataclass
class Sweep:
    """The arms' results: the table, the paired tests against the baseline and each arm's ERF."""

    table: pd.DataFrame  # field_sweep.csv
    delong: pd.DataFrame  # field_sweep_delong.csv
    erfs: dict[str, object]  # arm -> ERFResult after training


def sweep_table(
    preset: Preset,
    folders: dict[str, Path],
    index: pd.DataFrame,
    test_ids: list[str],
    images: torch.Tensor,
    device: torch.device,
) -> Sweep:
    """Test AUC (patient-bootstrap 95% interval) on ``test_ids``, the ERF after training (on
    ``images``, uint8 at the arms' resolution) and paired clustered DeLong tests of every arm against
    the baseline on the coarse and fine findings, corrected over that family; writes
    ``tables/field_sweep.csv`` and ``field_sweep_delong.csv``."""
    from .models import load_trained_model
    from .receptive_field import default_erf_batch, effective_receptive_field

    subject = index.set_index(index["dicom_id"].astype(str))["subject_id"].astype(str)
    rows, scored, erfs = [], {}, {}
    for arm, folder in folders.items():
        scores = scored[arm] = metrics.read_predictions(folder / paths.PREDICTIONS["test"], test_ids)
        model = load_trained_model(folder, map_location=device).to(device)
        erfs[arm] = effective_receptive_field(
            model,
            images,
            generator=torch.Generator().manual_seed(0),
            batch_size=default_erf_batch(*images.shape[-2:]),
        )
        labels = metrics.labels_for(index, scores.index, scores.columns)
        groups = subject.loc[scores.index].to_numpy()
        for finding in scores.columns:
            y, s = labels[finding].to_numpy(), scores[finding].to_numpy()
            ci = metrics.bootstrap_auc_ci(y, s, groups, n_boot=preset.analysis.bootstrap)
            _, n_pos, n_neg, _ = metrics.finding_auc(y, s)
            rows.append(
                (arm, erfs[arm].fraction90, finding, ci["auc"], ci["ci_low"], ci["ci_high"], n_pos, n_neg)
            )
    table = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    delong = against_baseline(preset, scored, index)
    write_csv_atomic(table, preset.tables_path / "field_sweep.csv")
    write_csv_atomic(delong, preset.tables_path / "field_sweep_delong.csv")
    return Sweep(table, delong, erfs)


def against_baseline(preset: Preset, scored: dict[str, pd.DataFrame], index: pd.DataFrame) -> pd.DataFrame:
    """Clustered DeLong test of each arm against the baseline (``diff`` = arm - baseline) per coarse
    and fine finding the arm predicts; Holm and Benjamini-Hochberg over all of these tests."""
    studied = [*preset.field_sweep.coarse, *preset.field_sweep.fine]
    base, tables = scored[BASELINE_ARM], []
    for arm, scores in scored.items():
        shared = [f for f in studied if f in scores.columns and f in base.columns]
        if arm == BASELINE_ARM or not shared:
            continue
        table = metrics.delong_findings(scores[shared], base.loc[scores.index, shared], index)
        tables.append(table.assign(arm=arm).rename(columns={"auc_a": "auc_arm", "auc_b": "auc_baseline"}))
    if not tables:
        return pd.DataFrame()
    delong = pd.concat(tables, ignore_index=True)
    delong = delong[["arm", *[c for c in delong.columns if c != "arm"]]]
    return metrics.correct_family(
        delong, f"{len(tables)} arms vs {BASELINE_ARM} x the coarse and fine findings"
    )


def resolution_sweep(run: str | Path | None) -> pd.DataFrame | None:
    """A resolution sweep's per-finding test AUC (mean over its folds) beside its ERF after training
    (``tables/auc.csv`` and ``erf.csv`` of ``run``), or None when that run has not made them."""
    if run is None:
        return None
    tables = paths.tables_dir(run if Path(run).is_absolute() else paths.PROJECT_ROOT / run)
    if not ((tables / "auc.csv").is_file() and (tables / "erf.csv").is_file()):
        return None
    auc = pd.read_csv(tables / "auc.csv")
    auc = auc[pd.to_numeric(auc["resolution"], errors="coerce").notna()].astype({"resolution": int})
    erf = pd.read_csv(tables / "erf.csv")
    erf = erf[erf["state"] == "trained"][["resolution", "erf_fraction_of_image"]]
    mean = auc.groupby(["resolution", "finding"], as_index=False)["auc"].mean()
    merged = mean.merge(erf.rename(columns={"erf_fraction_of_image": "erf_fraction"}), on="resolution")
    return merged[["resolution", "erf_fraction", "finding", "auc"]]
