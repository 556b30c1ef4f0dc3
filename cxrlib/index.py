"""The image index (``index.csv``, one row per image): schema, reading, writing, checking, summary. Every
column that is not a fixed one is a finding (1, 0, NaN): the label set, in order (docs/data_files.md)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import DataError, DataFileNotFound, read_csv_text, read_header, write_csv_atomic

ID_COLUMNS: tuple[str, ...] = ("dicom_id", "subject_id", "study_id")
BASE_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "path", "view", "width", "height")
NATIVE_SIZE_COLUMNS: tuple[str, ...] = ("native_width", "native_height")  # NIH's PNGs are resized
NOTE_COLUMNS: tuple[str, ...] = ("split", "subtype")  # optional text, never findings
SIZE_COLUMNS = ("width", "height", *NATIVE_SIZE_COLUMNS)
_NOT_FINDINGS = frozenset((*BASE_COLUMNS, *NATIVE_SIZE_COLUMNS, *NOTE_COLUMNS, "_line"))


def index_findings(index: pd.DataFrame | Sequence[str]) -> list[str]:
    """The label set of an index (or of its column names): every column that is not a fixed one, in order."""
    columns = index.columns if isinstance(index, pd.DataFrame) else index
    return [str(c) for c in columns if str(c) not in _NOT_FINDINGS]


def select_findings(index: pd.DataFrame, findings: Sequence | None, source: str = "index") -> pd.DataFrame:
    """The index with only ``findings`` (of its label set, in that order) as its label set; ``None``: all."""
    if findings is None:
        return index
    present = index_findings(index)
    unknown = [f for f in findings if f not in present]
    if unknown or not findings:
        raise DataError(f"{source}: findings {unknown or '[]'} are not in the index's label set {present}")
    return index[[*(c for c in index.columns if c not in present), *dict.fromkeys(findings)]]


def drop_unlabelled_findings(index: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """The index without the findings never labelled with both classes, with one warning naming them."""
    summary = summarize_index(index)
    positives, negatives = summary["positives"], summary["negatives"]
    reasons = ["no known label", "only negative labels", "only positive labels"]
    lacking = pd.Series(np.select([positives + negatives == 0, positives == 0, negatives == 0], reasons, ""))
    lacking = lacking.set_axis(summary.index)[lambda reason: reason != ""]
    if lacking.empty:
        return index
    why = "; ".join(f"{', '.join(names.index)} ({reason})" for reason, names in lacking.groupby(lacking))
    if len(lacking) == len(summary):
        raise DataError(f"{source}: no finding is labelled with both classes: {why}")
    warnings.warn(
        f"{source}: left out of the label set, never labelled with both classes: {why}", stacklevel=2
    )
    return index.drop(columns=list(lacking.index))


def validate_index(index: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """The index checked against the schema (an error names column and CSV line), ids as str, labels float."""
    missing = [c for c in BASE_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; an index needs {list(BASE_COLUMNS)}")
    findings = index_findings(index)
    if not findings:
        raise DataError(f"{source}: no finding column; an index has {list(BASE_COLUMNS)} then its findings")
    unnamed = [f for f in findings if not f.strip() or f.startswith("Unnamed:")]
    if unnamed:
        raise DataError(f"{source}: a column without a name ({unnamed[0]!r}); every finding needs one")
    if index.empty:
        raise DataError(f"{source}: the index has no rows")
    index = index.copy()
    for column in (*ID_COLUMNS, "path"):
        blank = index[column].isna() | (index[column].astype(str).str.strip() == "")
        if blank.any():
            raise DataError(f"{source}: column {column!r}, CSV line {blank.to_numpy().argmax() + 2}: blank")
        index[column] = index[column].astype(str)
    duplicated = index["dicom_id"].duplicated(keep=False)
    if duplicated.any():
        first, rows = index["dicom_id"][duplicated].iloc[0], (np.flatnonzero(duplicated) + 2).tolist()[:5]
        raise DataError(f"{source}: duplicate dicom_id {first!r} (CSV lines {rows})")
    for column in (c for c in SIZE_COLUMNS if c in index.columns):
        whole = _numbers(index, column, source, lambda v: (v >= 0) & (v == v.round()), "pixels or blank")
        index[column] = whole if whole.isna().any() else whole.astype("int64")
    for finding in findings:
        index[finding] = _numbers(index, finding, source, lambda v: v.isin([0.0, 1.0]), "1, 0 or blank")
    for column in ("view", *(c for c in NOTE_COLUMNS if c in index.columns)):
        index[column] = index[column].fillna("").astype(str)
    return index


def _numbers(index: pd.DataFrame, column: str, source: str, valid: Callable, what: str) -> pd.Series:
    given = index[column]
    values = pd.to_numeric(given, errors="coerce")
    blank = given.isna() | (given.astype(str).str.strip() == "")
    bad = (values.isna() & ~blank) | (values.notna() & ~valid(values))
    if bad.any():
        row = int(bad.to_numpy().argmax())
        value = given.iloc[row].item() if isinstance(given.iloc[row], np.generic) else given.iloc[row]  # 2.0
        raise DataError(f"{source}: column {column!r}, CSV line {row + 2}: value {value!r} is not {what}")
    return values.astype(float)


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``index.csv`` (its finding columns are its label set)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"index file not found: {path}")
    header = read_header(path)
    text = {c: str for c in (*ID_COLUMNS, "path", "view", *NOTE_COLUMNS) if c in header}
    numbers = {c: [""] for c in (*index_findings(header), *SIZE_COLUMNS) if c in header}
    frame = read_csv_text(path, dtype=text, keep_default_na=False, na_values=numbers)
    return validate_index(frame, source=str(path))


def write_index(index: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate an index and write it atomically (NaN labels as blanks), the findings last."""
    index = validate_index(index)
    optional = [c for c in (*NATIVE_SIZE_COLUMNS, *NOTE_COLUMNS) if c in index.columns]
    return write_csv_atomic(
        index[[*BASE_COLUMNS, *optional, *index_findings(index)]], path, lineterminator="\n"
    )


def summarize_index(index: pd.DataFrame) -> pd.DataFrame:
    """Per finding of the label set: positives, negatives, unknown and prevalence (positives / known)."""
    labels = index[index_findings(index)].astype(float)
    positives, negatives = (labels == 1.0).sum(), (labels == 0.0).sum()
    prevalence = (positives / (positives + negatives).where(positives + negatives > 0)).round(4)
    columns = ["positives", "negatives", "unknown", "prevalence"]
    summary = pd.concat([positives, negatives, labels.isna().sum(), prevalence], axis=1, keys=columns)
    return summary.rename_axis("finding")


def describe_index(index: pd.DataFrame) -> str:
    """Images, subjects, studies, views and the label set in a few lines, then :func:`summarize_index`."""
    views = ", ".join(f"{v} {n}" for v, n in index["view"].replace("", "(blank)").value_counts().items())
    subjects, studies = index["subject_id"].nunique(), index["study_id"].nunique()
    findings = index_findings(index)
    return (
        f"{len(index)} images, {subjects} subjects, {studies} studies\nviews: {views}\n"
        f"findings ({len(findings)}): {', '.join(findings)}\n{summarize_index(index).to_string()}"
    )
