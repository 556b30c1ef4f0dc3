"""Per-finding AUC on each test fold, Table 3, patient-bootstrap intervals and clustered DeLong tests.
Definitions: docs/method.md, "Metrics"."""

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from .fileio import read_header
from .index import index_findings
from .labels import finding_order
from .paths import FOLDS, INDEX, predictions_path
from .splits import fold_ids, num_folds, read_folds

ENSEMBLE_NAMES = ("ensemble", "average")
AUC_COLUMNS = ("finding", "resolution", "fold", "auc", "n_pos", "n_neg", "reason")
REASON_NO_LABELS = "no known labels"
REASON_ONE_CLASS_POS = "only positive labels"
REASON_ONE_CLASS_NEG = "only negative labels"
MIN_PATIENTS_PER_CLASS = 20  # below this in a class, a patient-bootstrap interval is flagged
DELONG_FIELDS = ("auc_a", "auc_b", "diff", "ci_low", "ci_high", "se", "z", "p")

# (resolution or ensemble name, fold) -> scores indexed by dicom_id, one column per finding
PredictionSet = Mapping[tuple[int | str, int | str], pd.DataFrame]


def read_predictions(
    path: str | os.PathLike, expected_ids: Iterable[str] | None = None, findings: Sequence[str] | None = None
) -> pd.DataFrame:
    """One prediction file as logits by ``dicom_id`` (exactly ``expected_ids``); one-line errors."""
    frame = pd.read_csv(path, dtype={"dicom_id": str})
    if "dicom_id" not in frame.columns:
        raise ValueError(f"{path}: no 'dicom_id' column")
    frame = frame.set_index("dicom_id")
    findings = list(frame.columns) if findings is None else list(findings)
    missing, extra = [f for f in findings if f not in frame], [c for c in frame if c not in findings]
    if missing or extra or not findings:
        raise ValueError(f"{path}: missing finding column(s) {missing}, unexpected column(s) {extra}")
    if frame.index.duplicated().any():
        raise ValueError(f"{path}: dicom_id {frame.index[frame.index.duplicated()][0]!r} appears twice")
    scores = frame[findings].apply(pd.to_numeric, errors="coerce").astype(float)
    if len(bad := np.argwhere(~np.isfinite(scores.to_numpy().T))):
        column, row = findings[bad[0, 0]], bad[0, 1]
        value = frame[column].iloc[row]
        raise ValueError(f"{path}: column {column!r}, CSV line {row + 2}: {value!r} is not a finite number")
    if expected_ids is not None:
        expected, have = set(map(str, expected_ids)), set(scores.index)
        if have != expected:
            lacking, surplus = sorted(expected - have), sorted(have - expected)
            raise ValueError(
                f"{path}: does not cover exactly the fold's images: {len(lacking)} missing "
                f"(e.g. {lacking[:3]}), {len(surplus)} not in the fold (e.g. {surplus[:3]})"
            )
    return scores


def load_predictions(
    run: str | os.PathLike, resolutions: Sequence[int], folds: Sequence[int] | None = None, split="test"
) -> dict[tuple[int, int], pd.DataFrame]:
    """``{(resolution, fold): scores}``, checked against the run's folds and findings (None: all folds)."""
    run = Path(run)
    fold_table = read_folds(run / FOLDS)
    findings = index_findings(read_header(run / INDEX)) if (run / INDEX).is_file() else None
    folds = range(num_folds(fold_table)) if folds is None else folds
    return {
        (int(r), int(k)): read_predictions(
            predictions_path(run, r, k, split), fold_ids(fold_table, int(k), split), findings
        )
        for r, k in itertools.product(resolutions, folds)
    }


def pool_folds(predictions: PredictionSet) -> dict[tuple[int | str, str], pd.DataFrame]:
    """``{(resolution, "all"): scores}``: the folds of each resolution concatenated."""
    pooled = {}
    for resolution in dict.fromkeys(r for r, _ in predictions):
        frame = pd.concat([f for (r, _), f in predictions.items() if r == resolution])
        if len(twice := frame.index[frame.index.duplicated()]):
            raise ValueError(f"resolution {resolution}: image {twice[0]!r} is in more than one fold")
        pooled[(resolution, "all")] = frame
    return pooled


def labels_for(index: pd.DataFrame, ids: Iterable, findings: Sequence[str] | None = None) -> pd.DataFrame:
    """The index's labels (1 / 0 / NaN) of ``findings`` (None: all) for ``ids``, in order."""
    findings = index_findings(index) if findings is None else list(findings)
    if lacking := [f for f in findings if f not in index.columns]:
        raise ValueError(f"the index has no label column for {lacking} (it has {index_findings(index)})")
    labels = index.set_index(index["dicom_id"].astype(str))[findings]
    ids = pd.Index(list(map(str, ids)))
    if len(unknown := ids.difference(labels.index)):
        raise ValueError(f"{len(unknown)} predicted image(s) not in the index, e.g. {list(unknown[:3])}")
    return labels.loc[ids].astype(float)


def _subjects(index: pd.DataFrame, ids: pd.Index) -> np.ndarray:
    return index.set_index(index["dicom_id"].astype(str))["subject_id"].astype(str).loc[ids].to_numpy()


def finding_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int, str]:
    """``(auc, n_pos, n_neg, reason)``, unknown labels left out; ``reason``: why the AUC is NaN, or ""."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    known = ~np.isnan(labels)
    y, s = labels[known], scores[known]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    one_class = REASON_ONE_CLASS_NEG if n_neg else REASON_ONE_CLASS_POS if n_pos else REASON_NO_LABELS
    reason = "" if n_pos and n_neg else one_class
    return (float("nan") if reason else float(roc_auc_score(y, s))), n_pos, n_neg, reason


def auc_table(predictions: PredictionSet, index: pd.DataFrame) -> pd.DataFrame:
    """Long AUC table (:data:`AUC_COLUMNS`), one row per (finding, resolution, fold)."""
    rows = []
    for (resolution, fold), scores in predictions.items():
        labels = labels_for(index, scores.index, scores.columns)
        for finding in scores.columns:
            auc = finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())
            rows.append((finding, resolution, fold, *auc))
    table = pd.DataFrame(rows, columns=list(AUC_COLUMNS))
    if len(undefined := table[table["reason"] != ""]):
        parts = [
            f"{reason}: {len(g)} (e.g. {g['finding'].iat[0]} at {g['resolution'].iat[0]})"
            for reason, g in undefined.groupby("reason", sort=True)
        ]
        warnings.warn(
            f"AUC is NaN for {len(undefined)} of {len(table)} (finding, resolution, fold) cells without both "
            f"classes, left out of fold means and Table 3 (the 'reason' column): {'; '.join(parts)}",
            stacklevel=2,
        )
    return table


def _is_number(value) -> bool:
    return str(value).lstrip("-").isdigit()


def column_order(resolutions: Iterable[int | str]) -> list[int | str]:
    """Resolutions in increasing order, then ``ensemble``, ``average`` and other names."""
    unique = list(dict.fromkeys(resolutions))
    names = [n for n in unique if not _is_number(n)]
    names = [n for n in ENSEMBLE_NAMES if n in names] + [n for n in names if n not in ENSEMBLE_NAMES]
    return sorted(int(r) for r in unique if _is_number(r)) + names


def _percent(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" if np.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table3(auc_long: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 3: ``L_mean``, ``L_std``, ``L_n_folds`` and ``L`` ("80.8 ± 0.6") per column ``L``."""
    frame = auc_long.copy()
    frame["resolution"] = frame["resolution"].map(lambda r: int(r) if _is_number(r) else str(r))
    average = frame.groupby(["resolution", "fold"], sort=False)["auc"].mean().reset_index()
    both = pd.concat([frame[["finding", "resolution", "fold", "auc"]], average.assign(finding="Average")])
    grouped = both.groupby(["finding", "resolution"], sort=False)["auc"]
    summary = grouped.agg(mean="mean", std=lambda a: a.std(ddof=1), n_folds="count").reset_index()
    findings = [f for f in finding_order(frame["finding"]) if f != "Average"] + ["Average"]
    out = pd.DataFrame({"finding": findings})
    for label in column_order(frame["resolution"]):
        part = summary[summary["resolution"] == label].set_index("finding").reindex(findings)
        out[f"{label}_mean"] = part["mean"].to_numpy()
        out[f"{label}_std"] = part["std"].to_numpy()
        out[f"{label}_n_folds"] = part["n_folds"].fillna(0).astype(int).to_numpy()
        out[str(label)] = [_percent(m, s) for m, s in zip(part["mean"], part["std"], strict=True)]
    return out


def _weighted_auc_rows(sorted_pos: np.ndarray, sorted_neg: np.ndarray, starts: np.ndarray) -> np.ndarray:
    pos = np.add.reduceat(sorted_pos, starts, axis=1)
    neg = np.add.reduceat(sorted_neg, starts, axis=1)
    numerator = (pos * (np.cumsum(neg, axis=1) - neg + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def bootstrap_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 1000,
    seed: int = 0
) -> np.ndarray:  # fmt: skip
    """AUCs of ``n_boot`` resamples of ``groups`` (patients; None: images), NaN with one class."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if not len(labels) == len(scores) == len(groups):
        raise ValueError(f"lengths differ: labels {len(labels)}, scores {len(scores)}, groups {len(groups)}")
    known = ~np.isnan(labels)
    order = np.argsort(scores[known], kind="mergesort")
    labels, scores, groups = labels[known][order], scores[known][order], groups[known][order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]]) if len(scores) else np.array([0])
    _, group_of_image = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_image.max()) + 1 if len(groups) else 0
    out = np.full(n_boot, np.nan)
    if n_groups == 0:
        return out
    rng = np.random.default_rng(seed)
    is_pos = (labels == 1).astype(float)
    chunk = max(1, min(200, 2_000_000 // max(len(labels), 1)))  # ~50 MB per array
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(float)
        weights = counts[:, group_of_image]
        out[first : first + b] = _weighted_auc_rows(weights * is_pos, weights * (1.0 - is_pos), starts)
    return out


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 1000,
    seed: int = 0
) -> dict[str, float]:  # fmt: skip
    """``{auc, ci_low, ci_high, se, n_boot_valid}``: a percentile interval over valid resamples."""
    auc = finding_auc(labels, scores)[0]
    boots = bootstrap_auc(labels, scores, groups, n_boot=n_boot, seed=seed)
    valid = boots[~np.isnan(boots)]
    if len(valid) == 0:
        return {"auc": auc, "ci_low": np.nan, "ci_high": np.nan, "se": np.nan, "n_boot_valid": 0}
    low, high = np.quantile(valid, [0.05 / 2, 1 - 0.05 / 2])  # a 95% interval
    se = float(valid.std(ddof=1)) if len(valid) > 1 else np.nan
    return {"auc": auc, "ci_low": float(low), "ci_high": float(high), "se": se, "n_boot_valid": len(valid)}


def bootstrap_table(predictions: PredictionSet, index: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Patient-bootstrap intervals per (finding, resolution, fold), with a ``caution`` column."""
    rows = []
    for (resolution, fold), scores in predictions.items():
        labels = labels_for(index, scores.index, scores.columns)
        groups = _subjects(index, scores.index)
        for finding in scores.columns:
            y = labels[finding].to_numpy()
            ci = bootstrap_auc_ci(y, scores[finding].to_numpy(), groups, n_boot)
            caution = _bootstrap_caution(y, groups, ci["n_boot_valid"], n_boot)
            key = {"finding": finding, "resolution": resolution, "fold": fold}
            rows.append({**key, **ci, "n_groups": int(pd.unique(groups).size), "caution": caution})
    table = pd.DataFrame(rows)
    flagged = table[table["caution"] != ""] if len(table) else table
    if len(flagged):
        first = flagged.iloc[0]
        warnings.warn(
            f"bootstrap intervals are unreliable for {len(flagged)} of {len(table)} rows ('caution' column), "
            f"e.g. {first['finding']} at {first['resolution']}: {first['caution']}",
            stacklevel=2,
        )
    return table


def _bootstrap_caution(labels: np.ndarray, groups: np.ndarray, n_valid: int, n_boot: int) -> str:
    parts = []
    for value, name in ((1.0, "positive"), (0.0, "negative")):
        patients = int(pd.unique(groups[labels == value]).size)
        if 0 < patients < MIN_PATIENTS_PER_CLASS:
            parts.append(f"{patients} patients with a {name} label (< {MIN_PATIENTS_PER_CLASS})")
    if 0 < n_valid < n_boot:
        parts.append(f"{n_boot - n_valid} of {n_boot} resamples had one class and were dropped")
    return "; ".join(parts)


def delong_covariance(
    labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(aucs [P], covariance [P, P])`` of ``scores [P, n]``: DeLong's, or Obuchowski's by ``clusters``."""
    labels = np.asarray(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    x, y = scores[:, positive], scores[:, ~positive]
    tx, ty = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v_pos = (tz[:, :m] - tx) / n  # per positive: share of negatives scored below it
    v_neg = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives scored above it
    if clusters is None:
        return aucs, np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    _, cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1

    def deviations(components: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, int]:
        sums = np.stack([np.bincount(members, weights=c, minlength=n_clusters) for c in components])
        counts = np.bincount(members, minlength=n_clusters)
        return sums - aucs[:, None] * counts[None, :], int((counts > 0).sum())

    (d_x, i10), (d_y, i01) = deviations(v_pos, cluster_of[positive]), deviations(v_neg, cluster_of[~positive])
    if min(i10, i01) < 2:
        raise ValueError(f"DeLong needs both classes in at least 2 clusters each, got {i10} and {i01}")
    s10 = i10 / (i10 - 1) / m * d_x @ d_x.T
    s01 = i01 / (i01 - 1) / n * d_y @ d_y.T
    s11 = n_clusters / (n_clusters - 1) * d_x @ d_y.T
    return aucs, s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def delong_test(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, clusters: np.ndarray | None = None
) -> dict[str, float]:
    """Paired two-sided DeLong test of AUC(a) = AUC(b), clustered by ``clusters``: :data:`DELONG_FIELDS`."""
    labels = np.asarray(labels, dtype=float)
    known = ~np.isnan(labels)
    scores = np.vstack([np.asarray(scores_a, float)[known], np.asarray(scores_b, float)[known]])
    clusters = None if clusters is None else np.asarray(clusters)[known]
    aucs, cov = delong_covariance(labels[known], scores, clusters)
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)))
    if diff == 0.0:
        z, p = 0.0, 1.0
    elif se <= 1e-12 * max(abs(diff), 1.0):
        z, p = float(np.sign(diff) * np.inf), 0.0
    else:
        z, p = diff / se, float(2 * stats.norm.sf(abs(diff / se)))
    half = float(stats.norm.ppf(0.975)) * se
    values = (float(aucs[0]), float(aucs[1]), diff, diff - half, diff + half, se, z, p)
    return dict(zip(DELONG_FIELDS, values, strict=True))


def _adjusted(pvalues: Sequence[float], step: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    out, valid = np.full_like(p, np.nan), np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="mergesort")]  # the valid p-values, ascending
    out[order] = np.minimum(step(p[order], len(order)), 1.0)
    return out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    return _adjusted(pvalues, lambda p, m: np.maximum.accumulate((m - np.arange(m)) * p))


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN and is not counted)."""
    return _adjusted(pvalues, lambda p, m: np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1])


def correct_family(table: pd.DataFrame, family: str) -> pd.DataFrame:
    """``p_holm``, ``p_bh`` and ``correction_family`` over the tested rows of ``table``, one family."""
    table = table.drop(columns=["p_holm", "p_bh", "correction_family"], errors="ignore")
    where = table.columns.get_loc("reason") if "reason" in table.columns else len(table.columns)
    table.insert(where, "p_holm", holm(table["p"]))
    table.insert(where + 1, "p_bh", benjamini_hochberg(table["p"]))
    table.insert(where + 2, "correction_family", f"{family} ({int(table['p'].notna().sum())} tests)")
    return table


def delong_findings(scores_a: pd.DataFrame, scores_b: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """Patient-clustered DeLong test per finding of two score frames of the same images, corrected."""
    scores_b = scores_b.loc[scores_a.index]
    labels = labels_for(index, scores_a.index, scores_a.columns)
    clusters, rows = _subjects(index, scores_a.index), []
    for finding in scores_a.columns:
        try:
            result = delong_test(labels[finding].to_numpy(), scores_a[finding], scores_b[finding], clusters)
            result["reason"] = ""
        except ValueError as error:
            result = {**dict.fromkeys(DELONG_FIELDS, np.nan), "reason": str(error)}
        rows.append({"finding": finding, **result})
    return correct_family(pd.DataFrame(rows), "the findings of this pair")


def pairwise_delong(predictions: PredictionSet, index: pd.DataFrame) -> pd.DataFrame:
    """Clustered DeLong tests of every pair of resolutions / ensembles, corrected per fold."""
    labels_in = column_order(resolution for resolution, _ in predictions)
    tables = []
    for fold in dict.fromkeys(fold for _, fold in predictions):
        present = [r for r in labels_in if (r, fold) in predictions]
        pairs = list(itertools.combinations(present, 2))
        per_fold = [
            delong_findings(predictions[(a, fold)], predictions[(b, fold)], index).assign(
                resolution_a=a, resolution_b=b, fold=fold
            )
            for a, b in pairs
        ]
        if per_fold:
            table = pd.concat(per_fold, ignore_index=True)
            table = table[["resolution_a", "resolution_b", "fold", *table.columns[:-3]]]
            n_findings = len(predictions[(present[0], fold)].columns)
            tables.append(correct_family(table, f"fold {fold}: {len(pairs)} pairs x {n_findings} findings"))
    if not tables:
        raise ValueError("pairwise_delong needs at least two resolutions with predictions on the same fold")
    return pd.concat(tables, ignore_index=True)
