"""The receptive field limited at a fixed resolution: the paper's explanation tested directly.

The paper explains its Table 3 by the effective receptive field: as resolution rises the ERF
covers less of the chest, so findings that need the whole heart in view lose AUC. But resolution
changes two things at once, the field's share of the image and the pixel size. Here the
resolution stays fixed (where the phantom's fine findings are resolved) and only the field
shrinks: the same DenseNet121 sees ``t x t`` tiles of the image apart
(:class:`cxrlib.models.TiledFeatures`), trained exactly as the untiled model. If the explanation
is right, coarse, relational findings (Cardiomegaly: heart width over chest width) fall toward
chance once a tile is smaller than their extent, while fine, local findings hold.

:func:`variant_folders` says where each variant's training lives (the untiled one may be another
preset's run: ``field_sweep.reuse``), :func:`train_variants` trains the missing ones,
:func:`sweep_table` scores them (test AUC with a patient-bootstrap interval, the ERF after
training, paired clustered DeLong tests between variants) and :func:`resolution_sweep` reads the
matching numbers of a resolution sweep for the same figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import metrics, paths
from .fileio import sha256_file, write_csv_atomic
from .presets import Preset

SWEEP_COLUMNS = ("field", "tiles", "erf_fraction", "finding", "auc", "auc_low", "auc_high", "n_pos", "n_neg")


def field_name(tiles: int) -> str:
    """``tiles 2x2``: how a variant is named in the tables and figures."""
    return f"tiles {int(tiles)}x{int(tiles)}"


def sweep_resolution(preset: Preset) -> int:
    """The fixed resolution of the sweep (``field_sweep.resolution``, else the preset's largest)."""
    return int(preset.field_sweep.resolution or max(preset.resolutions))


def reusable(folder: Path, preset: Preset) -> bool:
    """A finished untiled training in ``folder`` made from this preset's index and folds."""
    done = folder / paths.DONE
    if not done.is_file():
        return False
    record = json.loads(done.read_text())
    fingerprint = record.get("fingerprint", {})
    same_data = fingerprint.get("index_sha256") == sha256_file(preset.index_path) and fingerprint.get(
        "folds_sha256"
    ) == sha256_file(preset.folds_path)
    return same_data and fingerprint.get("tiles", 1) == 1 and (folder / paths.BEST_MODEL).is_file()


def variant_folders(preset: Preset, fold: int) -> dict[int, Path]:
    """Each variant's training folder by tiles: the reused run's for the untiled model when it is
    :func:`reusable`, else this preset's own (``res<R>[-tiles<T>]/fold<k>``)."""
    resolution = sweep_resolution(preset)
    folders = {
        int(t): paths.variant_dir(preset.run_path, resolution, fold, int(t)) for t in preset.field_sweep.tiles
    }
    if preset.field_sweep.reuse and 1 in folders:
        reused = paths.fold_dir(preset.field_sweep.reuse, resolution, fold)
        reused = reused if reused.is_absolute() else paths.PROJECT_ROOT / reused
        if reusable(reused, preset):
            folders[1] = reused
    return folders


def train_variants(preset: Preset, fold: int, echo: bool = True) -> dict[int, Path]:
    """Train every variant not finished yet (a finished one is skipped, an interrupted one resumes)."""
    from .launch import launch

    resolution = sweep_resolution(preset)
    processes = preset.train.gpus if torch.cuda.is_available() else preset.train.cpu_processes
    folders = variant_folders(preset, fold)
    for tiles, folder in folders.items():
        if tiles == 1 and not folder.is_relative_to(preset.run_path) and (folder / paths.DONE).is_file():
            continue  # another preset's finished run: read, never written
        launch(
            resolution, fold, run_dir=preset.run_path, index=preset.index_path, folds=preset.folds_path,
            cache=preset.cache_path, gpus=processes, nnodes=preset.train.nnodes, echo=echo,
            cache_format=preset.cache.format, out=folder, tiles=tiles, **preset.train_options(resolution),
        )  # fmt: skip
    return folders


@dataclass
class Sweep:
    """The sweep's results: the table, the paired tests and the ERF of each variant."""

    table: pd.DataFrame  # field_sweep.csv
    delong: pd.DataFrame  # field_sweep_delong.csv
    erfs: dict[str, object]  # field name -> ERFResult after training


def sweep_table(
    preset: Preset,
    folders: dict[int, Path],
    index: pd.DataFrame,
    test_ids: list[str],
    images: torch.Tensor,
    device: torch.device,
) -> Sweep:
    """Test AUC (patient-bootstrap 95% interval) on ``test_ids``, the ERF after training (on
    ``images``, uint8 at the sweep's resolution) and paired clustered DeLong tests of every variant;
    writes ``tables/field_sweep.csv`` and ``field_sweep_delong.csv``."""
    from .predict import load_trained_model
    from .receptive_field import default_erf_batch, effective_receptive_field

    ids = test_ids
    subject = index.set_index(index["dicom_id"].astype(str))["subject_id"].astype(str)
    rows, scored, erfs = [], {}, {}
    for tiles, folder in folders.items():
        name = field_name(tiles)
        scores = metrics.read_predictions(folder / paths.PREDICTIONS["test"], ids)
        scored[(name, "all")] = scores
        model = load_trained_model(folder, map_location=device).to(device)
        generator, batch = torch.Generator().manual_seed(0), default_erf_batch(*images.shape[-2:])
        erfs[name] = effective_receptive_field(model, images, generator=generator, batch_size=batch)
        labels = metrics.labels_for(index, scores.index)
        groups = subject.loc[scores.index].to_numpy()
        for finding in scores.columns:
            y, s = labels[finding].to_numpy(), scores[finding].to_numpy()
            ci = metrics.bootstrap_auc_ci(y, s, groups, n_boot=preset.analysis.bootstrap)
            _, n_pos, n_neg, _ = metrics.finding_auc(y, s)
            rows.append(
                (
                    name,
                    tiles,
                    erfs[name].fraction90,
                    finding,
                    ci["auc"],
                    ci["ci_low"],
                    ci["ci_high"],
                    n_pos,
                    n_neg,
                )
            )
    table = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    delong = metrics.pairwise_delong(scored, index) if len(scored) >= 2 else pd.DataFrame()
    delong = delong.rename(columns={"resolution_a": "field_a", "resolution_b": "field_b"})
    write_csv_atomic(table, preset.tables_path / "field_sweep.csv")
    write_csv_atomic(delong, preset.tables_path / "field_sweep_delong.csv")
    return Sweep(table, delong, erfs)


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
