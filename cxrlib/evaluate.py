"""External validation: a trained run's models and ensembles scored on another data set's shared findings.
``python -m cxrlib.evaluate --run runs/P --index other/index.csv``: docs/data.md, docs/method.md."""

import argparse
import os
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .cache import CacheBuildError, CXRDataset, build_cache
from .ensemble import AVERAGE, STACKED, average_logits, ensemble_logits, stack_scales
from .fileio import DataError, write_csv_atomic
from .index import BASE_COLUMNS, index_findings, read_index
from .labels import shared_findings
from .models import amp_dtype, load_trained_model, resolve_device
from .paths import BEST_MODEL, INDEX, TABLES

FOLD_WEIGHTS = "ensemble_weights_by_fold.csv"  # written by 04_evaluate: finding, resolution, fold, weight


# what an external validation wrote: its folder, the tables of the shared findings, findings.csv (finding,
# other_name, scored, reason) and the unreadable images left out (drop_bad: dicom_id, source_path, error)
External = namedtuple("External", "out auc table3 bootstrap findings dropped")


def _trained_models(run: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for model in sorted(run.glob(f"res*/fold*/{BEST_MODEL}")):
        resolution, fold = model.parent.parent.name[3:], model.parent.name[4:]
        if resolution.isdigit() and fold.isdigit():
            found[(int(resolution), int(fold))] = model.parent
    if not found:
        raise DataError(f"{run}: no trained model (res<R>/fold<k>/{BEST_MODEL}); train the run first")
    return found


def _both_classes(labels: pd.Series) -> bool:
    return bool((labels == 1.0).any() and (labels == 0.0).any())


def finding_table(run_index: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per finding of the run: its name in the other set, and whether it is scored (or why not)."""
    ours = index_findings(run_index)
    shared = shared_findings(ours, index_findings(other))
    rows = []
    for finding in ours:
        name = shared.get(finding, "")
        if not _both_classes(run_index[finding]):
            reason = "the run's own labels never give both classes of it (nothing was learned)"
        elif not name:
            reason = "not in the other set's label set"
        elif other[name].isna().all():
            reason = "the other set never labels it (every image unknown)"
        else:
            reason = "" if _both_classes(other[name]) else "the other set has only one class of it"
        rows.append((finding, name, reason == "", reason))
    return pd.DataFrame(rows, columns=["finding", "other_name", "scored", "reason"])


def _fold_weights(run: Path, findings: list[str], resolutions: list[int], fold: int) -> np.ndarray | None:
    if not (run / TABLES / FOLD_WEIGHTS).is_file():
        return None
    table = pd.read_csv(run / TABLES / FOLD_WEIGHTS).query("fold == @fold")
    grid = table.pivot_table(index="finding", columns="resolution", values="weight", aggfunc="mean")
    grid = grid.reindex(index=findings, columns=resolutions)
    return None if grid.isna().any(axis=None) else grid.to_numpy(dtype=float, copy=True)


def score_models(
    models: dict[tuple[int, int], Path], frame: pd.DataFrame, cache: Path, device, batch_size: int | None
) -> dict[tuple[int, int], pd.DataFrame]:
    """Logits of every model on ``frame`` (the other set, with the run's finding columns)."""
    from .models import default_workers, inference_batch, predict_logits

    scores, workers = {}, default_workers(device, local_world_size=1)
    for (resolution, fold), folder in models.items():
        model = load_trained_model(folder, map_location=device).to(device)
        batch = batch_size or inference_batch(resolution)
        dataset = CXRDataset(frame, resolution, cache)
        table = predict_logits(model, dataset, batch, device, amp_dtype(device), workers)
        scores[(resolution, fold)] = table.set_index("dicom_id")
    return scores


def _add_ensembles(run: Path, scores: dict, findings: list[str]) -> dict:
    out = dict(scores)
    for fold in sorted({f for _, f in scores}):
        resolutions = sorted(r for r, f in scores if f == fold)
        if len(resolutions) < 2:
            continue
        ids, logits = stack_scales({r: scores[(r, fold)] for r in resolutions}, resolutions)
        out[(AVERAGE, fold)] = pd.DataFrame(average_logits(logits), index=ids, columns=findings)
        if (weights := _fold_weights(run, findings, resolutions, fold)) is not None:
            out[(STACKED, fold)] = pd.DataFrame(ensemble_logits(logits, weights), index=ids, columns=findings)
    return out


def evaluate_external(
    run: str | os.PathLike,
    index: str | os.PathLike,
    out: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    device: str = "auto",
    n_boot: int = 1000,
    batch_size: int | None = None,
    workers: int | None = None,
    drop_bad: bool = False,
) -> External:
    """Score the run's models and ensembles on the data set of ``index`` and write the tables."""
    run, index = Path(run), Path(index)
    run_index, other = read_index(run / INDEX), read_index(index)
    ours = index_findings(run_index)
    out = Path(out) if out else run / "external" / index.resolve().parent.name
    if not finding_table(run_index, other)["scored"].any():
        raise DataError(f"{index}: shares no finding with both classes with the run {run} ({ours})")
    models = _trained_models(run)
    cache = Path(cache) if cache else out / "cache"
    resolutions = sorted({r for r, _ in models})
    report = build_cache(other, cache, resolutions, workers=workers, drop_bad=drop_bad, progress=False)
    other = other[~other["dicom_id"].isin(report.dropped)]
    findings = finding_table(run_index, other)
    scored = findings[findings["scored"]]
    frame = other[list(BASE_COLUMNS)].assign(**{f: np.nan for f in ours})
    scores = _add_ensembles(run, score_models(models, frame, cache, resolve_device(device), batch_size), ours)
    keep = scored["finding"].tolist()
    labels = other[list(BASE_COLUMNS)].join(other[scored["other_name"]].set_axis(keep, axis=1))
    predictions = {key: scores_[keep] for key, scores_ in scores.items()}
    auc = metrics.auc_table(predictions, labels)
    bootstrap = metrics.bootstrap_table(predictions, labels, n_boot=n_boot)
    result = External(out, auc, metrics.table3(auc), bootstrap, findings, report.errors)
    tables = {"auc": auc, "table3": result.table3, "auc_bootstrap": bootstrap, "findings": findings}
    for name, table in tables.items():
        write_csv_atomic(table, out / f"{name}.csv")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--run", type=Path, required=True, help="a trained run folder (runs/<preset>)")
    add("--index", type=Path, required=True, help="index.csv of the other data set")
    add("--out", type=Path, help="tables folder (default <run>/external/<index folder>)")
    add("--cache", type=Path, help="image cache of the other set (default <out>/cache)")
    add("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add("--bootstrap", dest="n_boot", type=int, default=1000, help="patient bootstrap resamples")
    add("--batch-size", type=int, help="images per batch (default: 64 up to 512 px, fewer above)")
    add("--workers", type=int, help="cache processes (default: every CPU)")
    add("--drop-bad", action="store_true", help="leave unreadable images out (default: stop, naming them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate_external(**vars(args))
    except (ValueError, FileNotFoundError, CacheBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    for row in result.dropped.itertuples():
        print(f"left out: unreadable image {row.source_path}: {row.error}", file=sys.stderr)
    print(f"wrote {result.out}: auc.csv, table3.csv, auc_bootstrap.csv, findings.csv")
    for row in result.findings[~result.findings["scored"]].itertuples():
        print(f"left out: {row.finding}: {row.reason}")
    shown = [c for c in result.table3.columns if not c.endswith(("_mean", "_std", "_n_folds"))]
    print("test AUC in percent (mean ± std over folds):")
    print(result.table3[shown].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
