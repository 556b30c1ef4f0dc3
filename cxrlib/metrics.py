"""Per-finding AUC on each test fold, Table 3, patient-level bootstrap CIs and paired DeLong tests.

Scores are the logits of the prediction files (or ensemble logits): AUC only depends on
their order, so logits and probabilities give the same AUC. Labels come from the run's
``index.csv`` joined on ``dicom_id``; unknown labels (NaN) are left out of every AUC. The
findings are the prediction frames' columns (the run's label set: its index's finding columns),
shown in :func:`cxrlib.labels.finding_order`.

Definitions used throughout
---------------------------
* **AUC** of a finding on one fold: scikit-learn's ``roc_auc_score`` on the fold's test
  images whose label is known. It is NaN, with a ``reason``, when the finding has no
  known label or only one class among the known labels; :func:`auc_table` then warns.
* **Table 3** (the paper's layout): per finding and per resolution (or ensemble) the mean
  and the sample standard deviation (``ddof=1``) of the per-fold AUCs, plus the same in
  percent formatted ``"80.8 ± 0.6"``. Folds whose AUC is NaN are left out of that cell.
* **Average** row: for each fold, the mean AUC over the findings that have one on that
  fold (the paper's "Average"), then mean and std of those per-fold averages over folds.
  Its std is therefore the fold-to-fold spread of the average, not an average of stds.
* **Bootstrap CI**: percentile interval of the AUC over resamples of *patients*
  (``subject_id``) with replacement; every image of a drawn patient comes along, as
  often as the patient is drawn. Images of one patient are correlated, so resampling
  images would understate the uncertainty. An interval is flagged (``caution``, and one
  warning per table) when a class has fewer than ``MIN_PATIENTS_PER_CLASS`` patients or
  resamples with one class had to be dropped: the percentile interval is then unreliable.
* **DeLong test**: the paired test of two AUCs on the same images (DeLong et al. 1988)
  with the fast midrank algorithm of Sun & Xu (2014), two-sided normal p-value, clustered by
  patient (Obuchowski 1997, "Nonparametric analysis of clustered ROC curve data", Biometrics
  53:567-578): the structural components are summed per patient, so several images of one
  patient are not counted as independent evidence (the image-level test, ``clusters=None``,
  would be optimistic with MIMIC's ~5 images per patient). :func:`pairwise_delong` corrects
  the p-values of its whole family, every pair of resolutions and ensembles x every finding,
  with Holm (family-wise error) and Benjamini-Hochberg (false discovery rate), and names the
  family in ``correction_family``.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from .fileio import write_csv_atomic
from .index import index_findings, read_index_findings
from .labels import finding_order
from .paths import fold_dir, tables_dir
from .splits import fold_ids, num_folds, read_folds

ENSEMBLE_NAMES: tuple[str, ...] = ("ensemble", "average")
AUC_COLUMNS: tuple[str, ...] = ("finding", "resolution", "fold", "auc", "n_pos", "n_neg", "reason")
REASON_NO_LABELS = "no known labels"
REASON_ONE_CLASS_POS = "only positive labels"
REASON_ONE_CLASS_NEG = "only negative labels"
MIN_PATIENTS_PER_CLASS = 20  # below this in a class, a patient-bootstrap interval is flagged

# A prediction set: (resolution or ensemble name, fold) -> DataFrame indexed by dicom_id with one
# column per finding of the run's label set (logits, or any scores whose order matters).
PredictionSet = Mapping[tuple[int | str, int | str], pd.DataFrame]


# ----------------------------------------------------------------------------- prediction files


def predictions_path(run: str | os.PathLike, resolution: int, fold: int, split: str = "test") -> Path:
    """``<run>/res<R>/fold<k>/<split>_predictions.csv``."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return fold_dir(run, resolution, fold) / f"{split}_predictions.csv"


def read_predictions(
    path: str | os.PathLike,
    expected_ids: Iterable[str] | None = None,
    findings: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read one prediction file: ``dicom_id`` then one logit column per finding.

    Returns a float DataFrame indexed by ``dicom_id`` (string) with the ``findings`` columns in
    order (None: the file's own columns). With ``expected_ids`` it must hold exactly those images.
    Raises ``ValueError`` naming the file and the problem (missing or extra columns, duplicate or
    missing ids, non-numeric or non-finite values).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    frame = pd.read_csv(path, dtype={"dicom_id": str})
    if "dicom_id" not in frame.columns:
        raise ValueError(f"{path}: no 'dicom_id' column")
    findings = [c for c in frame.columns if c != "dicom_id"] if findings is None else list(findings)
    missing = [f for f in findings if f not in frame.columns]
    extra = [c for c in frame.columns if c != "dicom_id" and c not in findings]
    if missing or extra or not findings:
        raise ValueError(f"{path}: missing finding column(s) {missing}, unexpected column(s) {extra}")
    duplicated = frame["dicom_id"].duplicated()
    if duplicated.any():
        raise ValueError(f"{path}: dicom_id {frame['dicom_id'][duplicated].iloc[0]!r} appears twice")
    scores = frame.set_index("dicom_id")[findings]
    for finding in findings:
        values = pd.to_numeric(scores[finding], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: column {finding!r}, CSV line {row + 2}: {scores[finding].iloc[row]!r} "
                "is not a finite number"
            )
        scores[finding] = values.astype(float)
    if expected_ids is not None:
        expected = set(map(str, expected_ids))
        have = set(scores.index)
        if have != expected:
            lacking, surplus = sorted(expected - have), sorted(have - expected)
            raise ValueError(
                f"{path}: does not cover exactly the fold's images: {len(lacking)} missing "
                f"(e.g. {lacking[:3]}), {len(surplus)} not in the fold (e.g. {surplus[:3]})"
            )
    return scores


def load_predictions(
    run: str | os.PathLike,
    resolutions: Sequence[int],
    folds: Sequence[int] | None = None,
    split: str = "test",
) -> dict[tuple[int, int], pd.DataFrame]:
    """Load every ``<split>_predictions.csv`` of a run, checked against ``folds.csv``.

    Returns ``{(resolution, fold): scores}`` (see :func:`read_predictions`); each file must
    hold exactly the images with role ``split`` in that fold, and one column per finding of the
    run's ``index.csv``. ``folds=None`` means all folds.
    """
    fold_table = read_folds(Path(run) / "folds.csv")
    findings = read_index_findings(Path(run) / "index.csv") if (Path(run) / "index.csv").is_file() else None
    folds = range(num_folds(fold_table)) if folds is None else folds
    out = {}
    for resolution in resolutions:
        for fold in folds:
            ids = fold_ids(fold_table, int(fold), split)
            out[(int(resolution), int(fold))] = read_predictions(
                predictions_path(run, resolution, fold, split), ids, findings
            )
    return out


def pool_folds(predictions: PredictionSet, label: str = "all") -> dict[tuple[int | str, str], pd.DataFrame]:
    """Concatenate the folds of each resolution: ``{(resolution, label): scores}``.

    With test predictions every image appears once (each is test in exactly one fold), so the
    pooled frame is the out-of-fold prediction of the whole data set.
    """
    by_resolution: dict[int | str, list[pd.DataFrame]] = {}
    for (resolution, _fold), frame in predictions.items():
        by_resolution.setdefault(resolution, []).append(frame)
    pooled = {}
    for resolution, frames in by_resolution.items():
        frame = pd.concat(frames)
        if frame.index.duplicated().any():
            raise ValueError(
                f"resolution {resolution}: image {frame.index[frame.index.duplicated()][0]!r} "
                "is in more than one fold's predictions"
            )
        pooled[(resolution, label)] = frame
    return pooled


def labels_for(
    index: pd.DataFrame, ids: Iterable[str], findings: Sequence[str] | None = None
) -> pd.DataFrame:
    """The index's labels (1 / 0 / NaN) of ``findings`` (None: its label set) for ``ids``, in that order.

    Raises ``ValueError`` naming an id that the index does not have, or a finding it lacks.
    """
    findings = index_findings(index) if findings is None else list(findings)
    lacking = [f for f in findings if f not in index.columns]
    if lacking:
        raise ValueError(
            f"the index has no label column for {lacking}; its findings: {index_findings(index)}"
        )
    labels = index.set_index(index["dicom_id"].astype(str))[findings]
    ids = pd.Index(list(map(str, ids)))
    unknown = ids.difference(labels.index)
    if len(unknown):
        raise ValueError(f"{len(unknown)} predicted image(s) not in the index, e.g. {list(unknown[:3])}")
    return labels.loc[ids].astype(float)


# ----------------------------------------------------------------------------- AUC and tables


def finding_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int, str]:
    """AUC of one finding with unknown (NaN) labels left out: ``(auc, n_pos, n_neg, reason)``.

    ``reason`` is ``""`` when the AUC is defined, otherwise why it is NaN.
    """
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    known = ~np.isnan(labels)
    y, s = labels[known], scores[known]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos + n_neg == 0:
        return float("nan"), 0, 0, REASON_NO_LABELS
    if n_neg == 0:
        return float("nan"), n_pos, 0, REASON_ONE_CLASS_POS
    if n_pos == 0:
        return float("nan"), 0, n_neg, REASON_ONE_CLASS_NEG
    return float(roc_auc_score(y, s)), n_pos, n_neg, ""


def auc_table(predictions: PredictionSet, index: pd.DataFrame) -> pd.DataFrame:
    """Long AUC table: one row per (finding, resolution, fold) of ``predictions``.

    Columns: finding, resolution, fold, auc, n_pos, n_neg, reason (empty when the AUC is
    defined). ``resolution`` is the key's first part: an int, or an ensemble name.
    """
    rows = []
    for (resolution, fold), scores in predictions.items():
        labels = labels_for(index, scores.index, scores.columns)
        for finding in scores.columns:
            auc, n_pos, n_neg, reason = finding_auc(labels[finding].to_numpy(), scores[finding].to_numpy())
            rows.append((finding, resolution, fold, auc, n_pos, n_neg, reason))
    table = pd.DataFrame(rows, columns=list(AUC_COLUMNS))
    warn_undefined_aucs(table)
    return table


def warn_undefined_aucs(auc_long: pd.DataFrame) -> None:
    """Warn, with counts per reason and an example of each, when AUCs of a long table are NaN."""
    undefined = auc_long[auc_long["reason"] != ""]
    if undefined.empty:
        return
    parts = []
    for reason, rows in undefined.groupby("reason", sort=True):
        first = rows.iloc[0]
        parts.append(
            f"{reason}: {len(rows)} (e.g. {first['finding']}, resolution {first['resolution']}, "
            f"fold {first['fold']})"
        )
    warnings.warn(
        f"AUC is NaN for {len(undefined)} of {len(auc_long)} (finding, resolution, fold) cells, where the "
        f"test images do not have both classes; {'; '.join(parts)}. They are left out of fold means and "
        "Table 3 (see the 'reason' column of the AUC table)",
        stacklevel=3,
    )


def column_order(resolutions: Iterable[int | str]) -> list[int | str]:
    """Resolutions in increasing order, then ensembles (``ensemble``, ``average``, others)."""
    unique = list(dict.fromkeys(resolutions))
    numbers = sorted(r for r in unique if _is_number(r))
    names = [n for n in ENSEMBLE_NAMES if n in unique] + [
        r for r in unique if not _is_number(r) and r not in ENSEMBLE_NAMES
    ]
    return [int(r) for r in numbers] + names


def _is_number(value) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _format_percent(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    if np.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table3(auc_long: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 3 from the long AUC table.

    One row per finding plus ``Average`` (see the module docstring for its definition);
    for each resolution / ensemble ``L`` (in :func:`column_order`) the columns ``L_mean``,
    ``L_std`` (sample std over folds, NaN with one fold), ``L_n_folds`` and ``L`` (percent,
    ``"mean ± std"``). The first column is ``finding``.
    """
    frame = auc_long.copy()
    frame["resolution"] = frame["resolution"].map(lambda r: int(r) if _is_number(r) else str(r))
    per_fold_average = (
        frame.groupby(["resolution", "fold"], sort=False)["auc"]
        .mean()
        .reset_index()
        .assign(finding="Average")
    )
    both = pd.concat([frame[["finding", "resolution", "fold", "auc"]], per_fold_average], ignore_index=True)
    grouped = both.groupby(["finding", "resolution"], sort=False)["auc"]
    summary = grouped.agg(mean="mean", std=lambda a: a.std(ddof=1), n_folds="count").reset_index()
    findings = [f for f in finding_order(frame["finding"]) if f != "Average"] + ["Average"]
    out = pd.DataFrame({"finding": findings})
    for label in column_order(frame["resolution"]):
        part = summary[summary["resolution"] == label].set_index("finding").reindex(findings)
        out[f"{label}_mean"] = part["mean"].to_numpy()
        out[f"{label}_std"] = part["std"].to_numpy()
        out[f"{label}_n_folds"] = part["n_folds"].fillna(0).astype(int).to_numpy()
        out[str(label)] = [_format_percent(m, s) for m, s in zip(part["mean"], part["std"], strict=True)]
    return out


def write_auc_tables(run: str | os.PathLike, auc_long: pd.DataFrame) -> tuple[Path, Path]:
    """Write ``tables/auc.csv`` (long) and ``tables/table3.csv`` atomically; return both paths."""
    folder = tables_dir(run)
    auc_path = write_csv_atomic(auc_long, folder / "auc.csv")
    table_path = write_csv_atomic(table3(auc_long), folder / "table3.csv")
    return auc_path, table_path


# ----------------------------------------------------------------------------- bootstrap


def _weighted_auc_rows(sorted_pos: np.ndarray, sorted_neg: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """AUCs for rows of image weights, images sorted by score, tied scores grouped at ``starts``.

    ``sorted_pos`` / ``sorted_neg`` are ``[B, n]`` weights of the positive / negative images
    (zero elsewhere). A tie between a positive and a negative counts one half, as in sklearn.
    """
    pos = np.add.reduceat(sorted_pos, starts, axis=1)
    neg = np.add.reduceat(sorted_neg, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def bootstrap_auc(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 200,
) -> np.ndarray:
    """AUC of ``n_boot`` resamples that draw *groups* (patients) with replacement.

    Every image of a drawn group enters with the number of times its group was drawn
    (the same as concatenating the drawn patients' images). ``groups=None`` resamples
    images. Unknown labels are dropped first. Resamples with one class give NaN.
    """
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if not len(labels) == len(scores) == len(groups):
        raise ValueError(
            f"labels, scores and groups differ in length: {len(labels)}, {len(scores)}, {len(groups)}"
        )
    known = ~np.isnan(labels)
    labels, scores, groups = labels[known], scores[known], groups[known]
    order = np.argsort(scores, kind="mergesort")
    labels, scores, groups = labels[order], scores[order], groups[order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]]) if len(scores) else np.array([0])
    _, group_of_image = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_image.max()) + 1 if len(groups) else 0
    out = np.full(n_boot, np.nan)
    if n_groups == 0:
        return out
    rng = np.random.default_rng(seed)
    is_pos = (labels == 1).astype(float)
    chunk = max(1, min(chunk, 2_000_000 // max(len(labels), 1)))  # bounds memory to ~50 MB per array
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        # How often each group is drawn when n_groups groups are drawn uniformly with replacement.
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(float)
        weights = counts[:, group_of_image]
        out[first : first + b] = _weighted_auc_rows(weights * is_pos, weights * (1.0 - is_pos), starts)
    return out


def bootstrap_auc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """AUC with a percentile bootstrap interval resampling ``groups`` (patients).

    Returns ``{"auc", "ci_low", "ci_high", "se", "n_boot_valid"}``; the interval is the
    ``alpha/2`` and ``1 - alpha/2`` quantiles over resamples that have both classes.
    """
    auc, _, _, _ = finding_auc(labels, scores)
    boots = bootstrap_auc(labels, scores, groups, n_boot=n_boot, seed=seed)
    valid = boots[~np.isnan(boots)]
    if len(valid) == 0:
        return {"auc": auc, "ci_low": np.nan, "ci_high": np.nan, "se": np.nan, "n_boot_valid": 0}
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return {
        "auc": auc,
        "ci_low": float(low),
        "ci_high": float(high),
        "se": float(valid.std(ddof=1)) if len(valid) > 1 else np.nan,
        "n_boot_valid": int(len(valid)),
    }


def bootstrap_table(
    predictions: PredictionSet,
    index: pd.DataFrame,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    group_column: str = "subject_id",
) -> pd.DataFrame:
    """Patient-bootstrap CIs for every (finding, resolution, fold) of ``predictions``.

    Columns: finding, resolution, fold, auc, ci_low, ci_high, se, n_boot_valid, n_groups, caution
    (why the interval is unreliable, ``""`` when it is not; see the module docs), with one warning
    counting the flagged rows. Use :func:`pool_folds` first for one interval per resolution over
    all test images.
    """
    subject = index.set_index(index["dicom_id"].astype(str))[group_column].astype(str)
    rows = []
    for (resolution, fold), scores in predictions.items():
        labels = labels_for(index, scores.index, scores.columns)
        groups = subject.loc[scores.index].to_numpy()
        for finding in scores.columns:
            y = labels[finding].to_numpy()
            ci = bootstrap_auc_ci(y, scores[finding].to_numpy(), groups, n_boot, alpha, seed)
            rows.append({"finding": finding, "resolution": resolution, "fold": fold, **ci})
            rows[-1]["n_groups"] = int(pd.unique(groups).size)
            rows[-1]["caution"] = _bootstrap_caution(y, groups, ci["n_boot_valid"], n_boot)
    table = pd.DataFrame(rows)
    flagged = table[table["caution"] != ""] if len(table) else table
    if len(flagged):
        first = flagged.iloc[0]
        warnings.warn(
            f"bootstrap intervals are unreliable for {len(flagged)} of {len(table)} (finding, resolution, "
            f"fold) rows, e.g. {first['finding']} at {first['resolution']}: {first['caution']} "
            "(the 'caution' column)",
            stacklevel=2,
        )
    return table


def _bootstrap_caution(labels: np.ndarray, groups: np.ndarray, n_valid: int, n_boot: int) -> str:
    """Why a patient-bootstrap interval is unreliable: few patients in a class, dropped resamples."""
    parts = []
    for value, name in ((1.0, "positive"), (0.0, "negative")):
        patients = int(pd.unique(groups[labels == value]).size)
        if 0 < patients < MIN_PATIENTS_PER_CLASS:
            parts.append(f"{patients} patients with a {name} label (< {MIN_PATIENTS_PER_CLASS})")
    if 0 < n_valid < n_boot:
        parts.append(f"{n_boot - n_valid} of {n_boot} resamples had one class and were dropped")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- DeLong


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (``scipy.stats.rankdata(method='average')``)."""
    return stats.rankdata(values, method="average")


def delong_covariance(
    labels: np.ndarray, scores: np.ndarray, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance for several predictors on the same images.

    ``labels``: ``[n]`` of 0 / 1 (no NaN); ``scores``: ``[n_predictors, n]``. The structural
    components of DeLong et al. (1988) come from midranks among positives, among negatives and
    among all images (the fast algorithm of Sun & Xu 2014, O(n log n)). Without ``clusters``
    images are independent (DeLong's covariance). With ``clusters`` (``[n]`` ids, e.g. the
    subject of each image) the covariance is Obuchowski's (1997) for clustered data: the
    components are summed per cluster and their spread is taken over clusters, so correlated
    images of one patient count once, not as independent evidence. Returns
    ``(aucs [P], covariance [P, P])``.
    """
    labels = np.asarray(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    x, y = scores[:, positive], scores[:, ~positive]
    tx = np.apply_along_axis(_midranks, 1, x)
    ty = np.apply_along_axis(_midranks, 1, y)
    tz = np.apply_along_axis(_midranks, 1, np.concatenate([x, y], axis=1))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v_pos = (tz[:, :m] - tx) / n  # per positive: share of negatives scored below it
    v_neg = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives scored above it
    if clusters is None:
        sx = np.atleast_2d(np.cov(v_pos))
        sy = np.atleast_2d(np.cov(v_neg))
        return aucs, sx / m + sy / n
    return aucs, _clustered_covariance(aucs, v_pos, v_neg, np.asarray(clusters), positive)


def _clustered_covariance(
    aucs: np.ndarray, v_pos: np.ndarray, v_neg: np.ndarray, clusters: np.ndarray, positive: np.ndarray
) -> np.ndarray:
    """Obuchowski (1997), Biometrics 53:567-578: with I clusters, I10 of them holding a positive and
    I01 a negative, M positives and N negatives, and per cluster the sums of the components of its
    positives (X_i, count m_i) and of its negatives (Y_i, count n_i), D_x = X_i - m_i AUC,
    D_y = Y_i - n_i AUC::

        S10 = I10 / ((I10 - 1) M) sum_i D_x D_x',  S01 = I01 / ((I01 - 1) N) sum_i D_y D_y',
        S11 = I / (I - 1) sum_i D_x D_y',          cov = S10 / M + S01 / N + (S11 + S11') / (M N)
    """
    _, cluster_of = np.unique(clusters, return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1
    if n_clusters < 2:
        raise ValueError("the clustered DeLong test needs at least 2 clusters (subjects)")
    pos_cluster, neg_cluster = cluster_of[positive], cluster_of[~positive]
    m, n = len(pos_cluster), len(neg_cluster)

    def per_cluster(components: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sums = np.zeros((components.shape[0], n_clusters))
        for predictor in range(components.shape[0]):
            sums[predictor] = np.bincount(members, weights=components[predictor], minlength=n_clusters)
        return sums, np.bincount(members, minlength=n_clusters)

    x_sum, m_i = per_cluster(v_pos, pos_cluster)
    y_sum, n_i = per_cluster(v_neg, neg_cluster)
    d_x = x_sum - aucs[:, None] * m_i[None, :]
    d_y = y_sum - aucs[:, None] * n_i[None, :]
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if min(i10, i01) < 2:
        raise ValueError(
            f"the clustered DeLong test needs positives and negatives in at least 2 clusters each, "
            f"got {i10} and {i01}"
        )
    s10 = i10 / (i10 - 1) / m * d_x @ d_x.T
    s01 = i01 / (i01 - 1) / n * d_y @ d_y.T
    s11 = n_clusters / (n_clusters - 1) * d_x @ d_y.T
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def delong_test(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, clusters: np.ndarray | None = None
) -> dict[str, float]:
    """Paired two-sided DeLong test of AUC(a) = AUC(b) on the same images.

    ``clusters`` (one id per image, e.g. its ``subject_id``) gives the clustered test of
    Obuchowski (1997), which counts patients, not images; without it images are independent.
    Unknown (NaN) labels are dropped. Returns auc_a, auc_b, diff (a - b), ci_low, ci_high, se
    (of the difference), z and p. Identical predictors give diff 0 and p 1; a difference with
    zero variance gives p 0. ``ci_low`` / ``ci_high``: the 95% interval of the difference (normal,
    from the same standard error). Raises ``ValueError`` with fewer than 2 cases of a class.
    """
    labels = np.asarray(labels, dtype=float)
    known = ~np.isnan(labels)
    scores = np.vstack([np.asarray(scores_a, float)[known], np.asarray(scores_b, float)[known]])
    groups = None if clusters is None else np.asarray(clusters)[known]
    aucs, cov = delong_covariance(labels[known], scores, groups)
    diff = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if diff == 0.0:
        z, p = 0.0, 1.0
    elif se <= 1e-12 * max(abs(diff), 1.0):
        z, p = float(np.sign(diff) * np.inf), 0.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = float(stats.norm.ppf(0.975)) * se  # the 95% interval of the difference
    return {
        "auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "ci_low": diff - half,
        "ci_high": diff + half, "se": se, "z": z, "p": p,
    }  # fmt: skip


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if len(valid) == 0:
        return out
    order = valid[np.argsort(p[valid], kind="mergesort")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values; NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if len(valid) == 0:
        return out
    order = valid[np.argsort(p[valid], kind="mergesort")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.minimum(adjusted, 1.0)
    return out


def correct_family(table: pd.DataFrame, family: str) -> pd.DataFrame:
    """Holm and Benjamini-Hochberg over every tested row of ``table`` (one family of tests).

    Writes ``p_holm``, ``p_bh`` and ``correction_family`` (``family`` and the number of tests
    it counts) before the ``reason`` column; untested rows (NaN p) stay NaN and are not counted.
    """
    table = table.drop(columns=["p_holm", "p_bh", "correction_family"], errors="ignore")
    where = table.columns.get_loc("reason") if "reason" in table.columns else len(table.columns)
    tested = int(table["p"].notna().sum())
    table.insert(where, "p_holm", holm(table["p"]))
    table.insert(where + 1, "p_bh", benjamini_hochberg(table["p"]))
    table.insert(where + 2, "correction_family", f"{family} ({tested} tests)")
    return table


def delong_findings(
    scores_a: pd.DataFrame,
    scores_b: pd.DataFrame,
    index: pd.DataFrame,
    group_column: str | None = "subject_id",
) -> pd.DataFrame:
    """DeLong test per finding between two score frames of the same images, Holm and BH corrected.

    Images are clustered by ``group_column`` of the index (the patient: Obuchowski's clustered
    test); ``None`` treats images as independent. Columns: finding, auc_a, auc_b, diff, ci_low,
    ci_high, se, z, p, p_holm, p_bh, correction_family, reason. A finding that cannot be tested (fewer than 2
    known cases of a class) has NaN and a reason; the corrections run over the findings tested.
    """
    if set(scores_a.index) != set(scores_b.index):
        raise ValueError("the two prediction frames do not hold the same images; a paired test needs them")
    scores_b = scores_b.loc[scores_a.index]
    labels = labels_for(index, scores_a.index, scores_a.columns)
    clusters = None
    if group_column is not None:
        subject = index.set_index(index["dicom_id"].astype(str))[group_column].astype(str)
        clusters = subject.loc[scores_a.index].to_numpy()
    rows = []
    for finding in scores_a.columns:
        try:
            result = delong_test(labels[finding].to_numpy(), scores_a[finding], scores_b[finding], clusters)
            result["reason"] = ""
        except ValueError as error:
            result = dict.fromkeys(("auc_a", "auc_b", "diff", "ci_low", "ci_high", "se", "z", "p"), np.nan)
            result["reason"] = str(error)
        rows.append({"finding": finding, **result})
    return correct_family(pd.DataFrame(rows), "the findings of this pair")


def pairwise_delong(
    predictions: PredictionSet, index: pd.DataFrame, group_column: str | None = "subject_id"
) -> pd.DataFrame:
    """Clustered DeLong tests for every pair of resolutions / ensembles, per fold and finding.

    Long table: resolution_a, resolution_b, fold, finding, auc_a, auc_b, diff, ci_low, ci_high,
    se, z, p, p_holm, p_bh, correction_family, reason. Images are clustered by patient (``group_column``;
    None: independent images). The corrections run over the whole family of one fold: every
    pair of resolutions and ensembles x every finding, as ``correction_family`` says.
    Pass :func:`pool_folds` output for one test per pair over all test images.
    """
    folds = list(dict.fromkeys(fold for _, fold in predictions))
    labels_in = column_order(resolution for resolution, _ in predictions)
    tables = []
    for fold in folds:
        present = [r for r in labels_in if (r, fold) in predictions]
        pairs = list(itertools.combinations(present, 2))
        per_fold = []
        for a, b in pairs:
            table = delong_findings(predictions[(a, fold)], predictions[(b, fold)], index, group_column)
            table.insert(0, "fold", fold)
            table.insert(0, "resolution_b", b)
            table.insert(0, "resolution_a", a)
            per_fold.append(table)
        if per_fold:
            n_findings = len(predictions[(present[0], fold)].columns)
            family = f"fold {fold}: {len(pairs)} pairs x {n_findings} findings"
            tables.append(correct_family(pd.concat(per_fold, ignore_index=True), family))
    if not tables:
        raise ValueError("pairwise_delong needs at least two resolutions with predictions on the same fold")
    return pd.concat(tables, ignore_index=True)
