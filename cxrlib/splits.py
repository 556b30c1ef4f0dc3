"""Patient-level K-fold cross-validation with a nested train/val split (``folds.csv``: ``dicom_id,
subject_id, role_0 .. role_{K-1}``), checked for leakage on every read (docs/data_files.md, "The folds")::

    python -m cxrlib.splits --index index.csv --folds 5 --seed 0 --out folds.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import DataError, DataFileNotFound, read_csv_text, read_header, write_csv_atomic
from .index import read_index

ROLES: tuple[str, ...] = ("train", "val", "test")


class LeakageError(DataError):
    """A fold file mixes a subject across roles, does not test every image once, or is malformed."""


def _role_columns(folds: pd.DataFrame) -> list[str]:
    return sorted((c for c in folds.columns if c.startswith("role_")), key=lambda c: int(c.split("_", 1)[1]))


def _table(index: pd.DataFrame, subjects: pd.Series, roles: dict[str, pd.Series]) -> pd.DataFrame:
    folds = pd.DataFrame(
        {"dicom_id": index["dicom_id"].astype(str).to_numpy(), "subject_id": subjects.to_numpy()}
    )
    for column, role_of in roles.items():
        folds[column] = folds["subject_id"].map(role_of)
    check_folds(folds)
    return folds


def _roles(rest: np.ndarray, test_subjects, val_fraction: float) -> dict[str, str]:
    # the first val_fraction of the shuffled rest val (at least one, and one left to train)
    n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    return {
        **dict.fromkeys(rest[n_val:], "train"),
        **dict.fromkeys(rest[:n_val], "val"),
        **dict.fromkeys(test_subjects, "test"),
    }


def make_folds(index: pd.DataFrame, k: int = 5, seed: int = 0, val_fraction: float = 0.1) -> pd.DataFrame:
    """Every image of ``index`` a role in each of ``k`` folds: the subjects, shuffled with ``seed``, dealt
    into ``k`` test groups; the rest of fold k shuffled again (``[seed, k]``) and split into train and val."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    subjects = index["subject_id"].astype(str)
    unique = np.array(sorted(subjects.unique()))
    if len(unique) < k + 2:
        raise ValueError(f"{len(unique)} subjects cannot make {k} folds with train and val; need {k + 2}")
    shuffled = np.random.default_rng(seed).permutation(unique)
    roles = {}
    for fold, test_subjects in enumerate(np.array_split(shuffled, k)):
        rest = np.setdiff1d(shuffled, test_subjects)  # sorted, then shuffled per fold
        roles[f"role_{fold}"] = _roles(
            np.random.default_rng([seed, fold]).permutation(rest), test_subjects, val_fraction
        )
    return _table(index, subjects, roles)


def official_folds(index: pd.DataFrame, seed: int = 0, val_fraction: float = 0.1) -> pd.DataFrame:
    """One fold (``role_0``) testing the official test images (``split`` column, Kermany's) and the other
    images of their subjects (with a warning); the other subjects, shuffled with ``seed``, train and val."""
    if "split" not in index.columns:
        raise DataError("the index has no 'split' column: the official split needs a source that keeps it")
    subjects = index["subject_id"].astype(str)
    official = index["split"].astype(str) == "test"
    test_subjects = sorted(subjects[official].unique())
    rest = sorted(set(subjects) - set(test_subjects))
    if not test_subjects or len(rest) < 2:
        raise DataError(
            f"official split: {len(test_subjects)} test and {len(rest)} other subjects; it needs 1 and 2+"
        )
    straddling = ~official & subjects.isin(test_subjects)
    if straddling.any():
        warnings.warn(
            f"{subjects[straddling].nunique()} patients (e.g. {subjects[straddling].iloc[0]}) have images in "
            f"the official test split and outside it; their {int(straddling.sum())} other images are tested",
            stacklevel=2,
        )
    role_of = _roles(np.random.default_rng(seed).permutation(rest), test_subjects, val_fraction)
    return _table(index, subjects, {"role_0": role_of})


def check_folds(folds: pd.DataFrame, index: pd.DataFrame | None = None, source: str = "folds") -> None:
    """Raise :class:`LeakageError` naming image or subject where ``folds`` leak or differ from ``index``."""
    missing = [c for c in ("dicom_id", "subject_id") if c not in folds.columns]
    if missing:
        raise LeakageError(f"{source}: missing column {missing[0]!r}")
    roles = _role_columns(folds)
    if roles != [f"role_{k}" for k in range(len(roles))] or not roles:
        raise LeakageError(f"{source}: fold columns {roles} are not role_0 .. role_(K-1)")
    duplicated = folds["dicom_id"].duplicated()
    if duplicated.any():
        raise LeakageError(f"{source}: image {folds['dicom_id'][duplicated].iloc[0]!r} is listed twice")
    rows, columns = np.nonzero(~folds[roles].isin(ROLES).to_numpy())
    if len(rows):
        where, role = f"{roles[columns[0]]}, line {rows[0] + 2}", folds[roles[columns[0]]].iloc[rows[0]]
        raise LeakageError(f"{source}: {where}: role {role!r} is not one of {ROLES}")
    mixed = folds.groupby("subject_id")[roles].nunique() > 1
    if mixed.any().any():
        column = mixed.any().idxmax()
        subject = mixed.index[mixed[column]][0]
        seen = sorted(folds.loc[folds["subject_id"] == subject, column].unique())
        raise LeakageError(
            f"{source}: subject {subject} is in roles {seen} of fold {column[5:]}: patient-level leakage"
        )
    times_test = (folds[roles] == "test").sum(axis=1)
    if len(roles) > 1 and (times_test != 1).any():  # one fold (an official split) tests what the split says
        row = folds[times_test != 1].iloc[0]
        raise LeakageError(
            f"{source}: image {row['dicom_id']!r} (subject {row['subject_id']}) is test in "
            f"{int(times_test[times_test != 1].iloc[0])} folds, not exactly 1"
        )
    if index is not None:
        both = folds[["dicom_id", "subject_id"]].merge(
            index[["dicom_id", "subject_id"]].astype(str), on="dicom_id", how="outer", indicator=True
        )
        differ = both[both["subject_id_x"] != both["subject_id_y"]]  # a missing subject too
        if len(differ):
            row = differ.iloc[0]
            where = {"left_only": "the folds", "right_only": "the index"}.get(row["_merge"])
            subjects = f"belongs to subject {row['subject_id_y']} in the index but {row['subject_id_x']} here"
            raise LeakageError(
                f"{source}: image {row['dicom_id']!r} {f'is only in {where}' if where else subjects}; "
                "the folds do not match the index"
            )


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Check and write ``folds.csv`` atomically (identical bytes for identical folds)."""
    check_folds(folds)
    return write_csv_atomic(folds, path, lineterminator="\n")


def read_folds(path: str | os.PathLike, index: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read ``folds.csv`` and run :func:`check_folds` on it (and against ``index`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"fold file not found: {path}")
    read_header(path)  # an empty file, bytes that are not UTF-8 or a repeated column: one line
    folds = read_csv_text(path, dtype=str, keep_default_na=False)
    check_folds(folds, index, source=str(path))
    return folds


def num_folds(folds: pd.DataFrame) -> int:
    """K, the number of folds in a fold table."""
    return len(_role_columns(folds))


def fold_ids(folds: pd.DataFrame, fold: int, role: str) -> list[str]:
    """dicom_ids with ``role`` (train / val / test) in ``fold``, in file order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    if not 0 <= fold < num_folds(folds):
        raise ValueError(f"fold {fold} does not exist: the fold file has folds 0 .. {num_folds(folds) - 1}")
    return folds.loc[folds[f"role_{fold}"] == role, "dicom_id"].tolist()


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Images and subjects per role in each fold."""
    long = folds.melt("subject_id", _role_columns(folds), var_name="fold", value_name="role")
    long["fold"] = long["fold"].str[5:].astype(int)
    counts = long.groupby(["fold", "role"])["subject_id"].agg(images="size", subjects="nunique")
    return counts.unstack("role", fill_value=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--index", type=Path, required=True, help="index.csv (from python -m cxrlib.datasets)")
    add("--folds", type=int, default=5, help="number of folds K (default 5)")
    add("--seed", type=int, default=0, help="shuffling seed (default 0)")
    add("--val-fraction", type=float, default=0.1, help="share of non-test subjects in val")
    add("--out", type=Path, required=True, help="folds.csv to write")
    args = parser.parse_args(argv)
    try:
        folds = make_folds(read_index(args.index), args.folds, args.seed, args.val_fraction)
        write_folds(folds, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    subjects = folds["subject_id"].nunique()
    print(f"wrote {args.out}: {len(folds)} images of {subjects} subjects\n{fold_summary(folds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
