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
14 findings       ``FINDINGS`` columns, 1.0 / 0.0 / NaN (unknown), after the policy
================= ==========================================================

The builders of an index from a data source are in :mod:`cxrlib.readers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import write_csv_atomic
from .labels import FINDINGS

ID_COLUMNS: tuple[str, ...] = ("dicom_id", "subject_id", "study_id")
INDEX_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "path", "view", "width", "height", *FINDINGS)


def validate_index(index: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """Check an index against the schema; return it with ids as strings and labels as floats.

    Raises ``ValueError`` naming ``source`` and the column or row on a missing column,
    a duplicate ``dicom_id`` or a label outside {1, 0, NaN}.
    """
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; an index needs {list(INDEX_COLUMNS)}")
    if index.empty:
        raise ValueError(f"{source}: the index has no rows")
    index = index.copy()
    for column in ID_COLUMNS:
        index[column] = index[column].astype(str)
    duplicated = index["dicom_id"].duplicated(keep=False)
    if duplicated.any():
        rows = (np.flatnonzero(duplicated.to_numpy()) + 2).tolist()[:5]
        raise ValueError(
            f"{source}: duplicate dicom_id {index['dicom_id'][duplicated].iloc[0]!r} (CSV lines {rows})"
        )
    for finding in FINDINGS:
        values = pd.to_numeric(index[finding], errors="coerce")
        bad = (values.isna() & index[finding].notna()) | (values.notna() & ~values.isin([0.0, 1.0]))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = index[finding].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value  # 2.0, not np.float64(2.0)
            raise ValueError(
                f"{source}: column {finding!r}, CSV line {row + 2}: value {value!r} is not 1, 0 "
                "or blank (unknown)"
            )
        index[finding] = values.astype(float)
    index["view"] = index["view"].fillna("").astype(str)
    return index


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``index.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    frame = pd.read_csv(
        path,
        dtype={c: str for c in (*ID_COLUMNS, "path", "view")},
        keep_default_na=False,
        na_values={f: [""] for f in FINDINGS},
    )
    return validate_index(frame, source=str(path))


def write_index(index: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate an index and write it atomically as CSV (NaN labels as blanks)."""
    index = validate_index(index)
    return write_csv_atomic(index[list(INDEX_COLUMNS)], path, lineterminator="\n")


def summarize_index(index: pd.DataFrame) -> pd.DataFrame:
    """Per finding: positives, negatives, unknown and prevalence (positives / known labels)."""
    labels = index[list(FINDINGS)].astype(float)
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
    """A few lines for people: counts of images, subjects, studies and views, then :func:`summarize_index`."""
    views = index["view"].replace("", "(blank)").value_counts()
    return "\n".join(
        [
            f"{len(index)} images, {index['subject_id'].nunique()} subjects, "
            f"{index['study_id'].nunique()} studies",
            "views: " + ", ".join(f"{view} {count}" for view, count in views.items()),
            summarize_index(index).to_string(),
        ]
    )
