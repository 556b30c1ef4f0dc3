"""The image index: one row per image, its schema, and reading, writing, checking and summarizing it.

Schema (a DataFrame, also written as ``index.csv``), one row per image:

================= ==========================================================
``dicom_id``      unique image id (string); also names the image's cache file
``subject_id``    patient id (string); folds are grouped by it
``study_id``      study id (string)
``path``          absolute path of the original image file
``view``          view position (``PA``, ``AP``, ``LATERAL``, ...; may be empty)
``width``         width in pixels of the file at ``path`` (empty when not read)
``height``        height in pixels of the file at ``path``
``native_width``  optional: the width of the original acquisition when the stored file was
``native_height`` resized (NIH ChestX-ray14's PNGs are 1024 x 1024; its metadata has the original)
``split``         optional: the source's official split (``train`` / ``val`` / ``test``; Kermany's)
``subtype``       optional: what a label does not say (Kermany's ``normal`` / ``bacteria`` / ``virus``)
findings          every other column, in order: the index's label set, 1.0 / 0.0 / NaN (unknown)
================= ==========================================================

**The label set is the index's finding columns**: whatever columns follow the fixed ones, in
file order (:func:`index_findings`). CheXpert's 14 (:data:`cxrlib.labels.FINDINGS`) are what the
MIMIC-CXR-JPG, CheXpert and phantom readers write, so an index written before label sets existed
reads exactly as before; NIH ChestX-ray14's reader writes NIH's 14 and No Finding, a CSV reader
the set it declares. Everything downstream (the model head, the loss, the tables, the figures)
takes its findings from here.

The builders of an index from a data source are in :mod:`cxrlib.datasets`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import DataError, DataFileNotFound, read_csv_text, read_header, write_csv_atomic
from .labels import FINDINGS

ID_COLUMNS: tuple[str, ...] = ("dicom_id", "subject_id", "study_id")
BASE_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "path", "view", "width", "height")
NATIVE_SIZE_COLUMNS: tuple[str, ...] = ("native_width", "native_height")
NOTE_COLUMNS: tuple[str, ...] = ("split", "subtype")  # optional text, never findings
# The columns of an index with CheXpert's label set (the default).
INDEX_COLUMNS: tuple[str, ...] = (*BASE_COLUMNS, *FINDINGS)
_NOT_FINDINGS = frozenset((*BASE_COLUMNS, *NATIVE_SIZE_COLUMNS, *NOTE_COLUMNS, "_line"))


def index_findings(index: pd.DataFrame | Sequence[str]) -> list[str]:
    """The label set of an index (or of its column names): every column that is not one of the
    schema's fixed columns, in order."""
    columns = index.columns if isinstance(index, pd.DataFrame) else index
    return [str(c) for c in columns if str(c) not in _NOT_FINDINGS]


def index_columns(index: pd.DataFrame) -> list[str]:
    """The columns :func:`write_index` writes: the fixed ones, the native size and notes when the
    index has them, then the findings."""
    optional = [c for c in (*NATIVE_SIZE_COLUMNS, *NOTE_COLUMNS) if c in index.columns]
    return [*BASE_COLUMNS, *optional, *index_findings(index)]


def select_findings(
    index: pd.DataFrame, findings: Sequence[str] | None, source: str = "index"
) -> pd.DataFrame:
    """The index with only ``findings`` (a subset of its label set, in that order) as its label set;
    ``None`` keeps them all. A name the index lacks is a :class:`~cxrlib.fileio.DataError`."""
    if findings is None:
        return index
    present = index_findings(index)
    unknown = [f for f in findings if f not in present]
    if unknown or not findings:
        raise DataError(f"{source}: findings {unknown or '[]'} are not in the index's label set {present}")
    fixed = [c for c in index.columns if c not in present]
    return index[[*fixed, *dict.fromkeys(findings)]]


def drop_unlabelled_findings(index: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """The index without the findings its labels never give with both classes (every label unknown,
    or only positives, or only negatives): nothing can be learned or scored for them, so they are
    neither model outputs nor table rows. One warning names them; none left is a
    :class:`~cxrlib.fileio.DataError`."""
    summary = summarize_index(index)
    reasons = np.select(
        [
            summary["positives"] + summary["negatives"] == 0,
            summary["negatives"] == 0,
            summary["positives"] == 0,
        ],
        ["no known label", "only positive labels", "only negative labels"],
        "",
    )
    lacking = pd.Series(reasons, index=summary.index)
    lacking = lacking[lacking != ""]
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
    """Check an index against the schema; return it with ids as strings and labels as floats.

    Raises :class:`~cxrlib.fileio.DataError` (a ``ValueError``) naming ``source`` and the column or
    row on a missing column, no finding column, a duplicate ``dicom_id`` or a label outside {1, 0, NaN}.
    """
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
        _refuse_blank(index, column, source)
        index[column] = index[column].astype(str)
    duplicated = index["dicom_id"].duplicated(keep=False)
    if duplicated.any():
        rows = (np.flatnonzero(duplicated.to_numpy()) + 2).tolist()[:5]
        raise DataError(
            f"{source}: duplicate dicom_id {index['dicom_id'][duplicated].iloc[0]!r} (CSV lines {rows})"
        )
    for column in ("width", "height", *(c for c in NATIVE_SIZE_COLUMNS if c in index.columns)):
        index[column] = _size_column(index, column, source)
    for finding in findings:
        index[finding] = _label_column(index, finding, source)
    for column in ("view", *(c for c in NOTE_COLUMNS if c in index.columns)):
        index[column] = index[column].fillna("").astype(str)
    return index


def _refuse_blank(index: pd.DataFrame, column: str, source: str) -> None:
    blank = index[column].isna() | (index[column].astype(str).str.strip() == "")
    if blank.any():
        raise DataError(
            f"{source}: column {column!r}, CSV line {int(np.flatnonzero(blank.to_numpy())[0]) + 2}: blank"
        )


def _size_column(index: pd.DataFrame, column: str, source: str) -> pd.Series:
    """A size column as numbers: whole numbers of pixels, 0 or blank where not read."""
    given = index[column]
    values = pd.to_numeric(given, errors="coerce")
    blank = given.isna() | (given.astype(str).str.strip() == "")
    bad = (values.isna() & ~blank) | (values.notna() & ((values < 0) | (values != values.round())))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: column {column!r}, CSV line {row + 2}: {_plain(given.iloc[row])!r} is not a "
            "whole number of pixels or blank"
        )
    return values if values.isna().any() else values.astype("int64")


def _label_column(index: pd.DataFrame, finding: str, source: str) -> pd.Series:
    given = index[finding]
    values = pd.to_numeric(given, errors="coerce")
    blank = given.isna() | (given.astype(str).str.strip() == "")
    bad = (values.isna() & ~blank) | (values.notna() & ~values.isin([0.0, 1.0]))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: column {finding!r}, CSV line {row + 2}: value {_plain(given.iloc[row])!r} "
            "is not 1, 0 or blank (unknown)"
        )
    return values.astype(float)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value  # 2.0, not np.float64(2.0)


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``index.csv`` (its finding columns are its label set)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"index file not found: {path}")
    header = read_header(path)
    findings = index_findings(header)
    frame = read_csv_text(
        path,
        dtype={c: str for c in (*ID_COLUMNS, "path", "view", *NOTE_COLUMNS) if c in header},
        keep_default_na=False,
        na_values={c: [""] for c in [*findings, "width", "height", *NATIVE_SIZE_COLUMNS] if c in header},
    )
    return validate_index(frame, source=str(path))


def read_index_findings(path: str | os.PathLike) -> list[str]:
    """The label set of an ``index.csv`` from its header alone (cheap for a large index)."""
    return index_findings(read_header(path))


def write_index(index: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate an index and write it atomically as CSV (NaN labels as blanks)."""
    index = validate_index(index)
    return write_csv_atomic(index[index_columns(index)], path, lineterminator="\n")


def summarize_index(index: pd.DataFrame) -> pd.DataFrame:
    """Per finding of the index's label set: positives, negatives, unknown and prevalence
    (positives / known labels)."""
    labels = index[index_findings(index)].astype(float)
    positives = (labels == 1.0).sum()
    negatives = (labels == 0.0).sum()
    known = positives + negatives
    summary = pd.DataFrame(
        {
            "positives": positives,
            "negatives": negatives,
            "unknown": labels.isna().sum(),
            "prevalence": (positives / known.where(known > 0)).round(4),
        }
    )
    summary.index.name = "finding"
    return summary


def describe_index(index: pd.DataFrame) -> str:
    """A few lines for people: counts of images, subjects, studies and views, the label set, then
    :func:`summarize_index`."""
    views = index["view"].replace("", "(blank)").value_counts()
    findings = index_findings(index)
    return "\n".join(
        [
            f"{len(index)} images, {index['subject_id'].nunique()} subjects, "
            f"{index['study_id'].nunique()} studies",
            "views: " + ", ".join(f"{view} {count}" for view, count in views.items()),
            f"findings ({len(findings)}): " + ", ".join(findings),
            summarize_index(index).to_string(),
        ]
    )
