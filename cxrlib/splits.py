"""Patient-level K-fold cross-validation with a nested train/val split, and its leakage check.

Subjects (patients) are shuffled with a recorded seed and dealt into K groups of nearly
equal size; group k is fold k's test set (about 1/K of the subjects, 20% for K = 5). The
other subjects of fold k are shuffled again (seeded by ``seed`` and ``k``) and split
90/10 into train and val. Every image of a subject gets the subject's role, so no patient
is ever on two sides of a split. :func:`official_folds` makes one fold instead, whose test images
are the data's official test split (the index's ``split`` column, as Kermany's reader writes it).

``folds.csv`` has one row per image, in the index's order::

    dicom_id, subject_id, role_0, ..., role_{K-1}      (roles: train / val / test)

:func:`check_folds` runs whenever folds are made or read: it refuses a subject with two
roles in one fold, an image that is not test in exactly one fold, duplicate images and
unknown roles (a one-fold table tests what its split says). The same index and seed give the
same file, byte for byte.

Command line::

    python -m cxrlib.splits --index index.csv --folds 5 --seed 0 --out folds.csv
    python -m cxrlib.splits --check folds.csv [--index index.csv]
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

ROLES: tuple[str, ...] = ("train", "val", "test")


class LeakageError(DataError):
    """A fold file mixes a subject across roles, or does not test every image exactly once (or is not
    a fold file at all); one line, as every :class:`~cxrlib.fileio.DataError`."""


def role_columns(folds: pd.DataFrame) -> list[str]:
    """The ``role_<k>`` columns of a fold table, in fold order."""
    columns = [c for c in folds.columns if c.startswith("role_")]
    return sorted(columns, key=lambda c: int(c.split("_", 1)[1]))


def make_folds(index: pd.DataFrame, k: int = 5, seed: int = 0, val_fraction: float = 0.1) -> pd.DataFrame:
    """Assign every image of ``index`` a role in each of ``k`` patient-grouped folds.

    Needs ``dicom_id`` and ``subject_id`` columns. Raises ``ValueError`` when there are
    fewer than ``k`` subjects (or too few to leave a train and a val subject per fold).
    """
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    subjects = np.array(sorted(index["subject_id"].astype(str).unique()))
    if len(subjects) < k + 2:
        raise ValueError(
            f"{len(subjects)} subjects cannot make {k} folds with train and val subjects; "
            f"need at least {k + 2}"
        )
    shuffled = np.random.default_rng(seed).permutation(subjects)
    test_groups = np.array_split(shuffled, k)
    folds = pd.DataFrame(
        {
            "dicom_id": index["dicom_id"].astype(str).to_numpy(),
            "subject_id": index["subject_id"].astype(str).to_numpy(),
        }
    )
    for fold, test_subjects in enumerate(test_groups):
        rest = np.setdiff1d(shuffled, test_subjects)  # sorted, then shuffled per fold below
        role_of = _roles(np.random.default_rng([seed, fold]).permutation(rest), test_subjects, val_fraction)
        folds[f"role_{fold}"] = folds["subject_id"].map(role_of)
    check_folds(folds)
    return folds


def _roles(rest: np.ndarray, test_subjects: list[str] | np.ndarray, val_fraction: float) -> dict[str, str]:
    """``{subject: role}``: the first ``val_fraction`` of the shuffled ``rest`` val (at least one,
    and one left to train), the others train, ``test_subjects`` test."""
    n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    role_of = dict.fromkeys(rest[n_val:], "train")
    role_of.update(dict.fromkeys(rest[:n_val], "val"))
    role_of.update(dict.fromkeys(test_subjects, "test"))
    return role_of


def official_folds(index: pd.DataFrame, seed: int = 0, val_fraction: float = 0.1) -> pd.DataFrame:
    """One fold (``role_0``) whose test images are the index's official test images (``split``
    column ``test``); the other subjects, shuffled with ``seed``, split into train and val.

    A subject with images in the official test split and outside it is tested with all its images
    (a warning gives the count), so no patient is on two sides and no official test image is
    trained on.
    """
    if "split" not in index.columns:
        raise DataError("the index has no 'split' column: the official split needs a source that keeps it")
    subjects = index["subject_id"].astype(str)
    official = index["split"].astype(str) == "test"
    test_subjects = sorted(subjects[official].unique())
    rest = sorted(set(subjects) - set(test_subjects))
    if not test_subjects or len(rest) < 2:
        raise DataError(
            f"the official split has {len(test_subjects)} test and {len(rest)} other subjects; "
            "it needs a test subject and two others (train and val)"
        )
    straddling = ~official & subjects.isin(test_subjects)
    if straddling.any():
        warnings.warn(
            f"{subjects[straddling].nunique()} patients (e.g. {subjects[straddling].iloc[0]}) have images "
            f"in the official test split and outside it; their {int(straddling.sum())} other images "
            "are tested too",
            stacklevel=2,
        )
    role_of = _roles(np.random.default_rng(seed).permutation(rest), test_subjects, val_fraction)
    folds = pd.DataFrame(
        {"dicom_id": index["dicom_id"].astype(str).to_numpy(), "subject_id": subjects.to_numpy()}
    )
    folds["role_0"] = folds["subject_id"].map(role_of)
    check_folds(folds)
    return folds


def check_folds(folds: pd.DataFrame, index: pd.DataFrame | None = None, source: str = "folds") -> None:
    """Raise :class:`LeakageError` (naming the subject or image) if ``folds`` leaks or is malformed.

    With ``index``, also check that both list the same images with the same subjects.
    """
    for column in ("dicom_id", "subject_id"):
        if column not in folds.columns:
            raise LeakageError(f"{source}: missing column {column!r}")
    roles = role_columns(folds)
    if not roles:
        raise LeakageError(f"{source}: needs role_0 .. role_(K-1) columns, found none")
    expected = [f"role_{k}" for k in range(len(roles))]
    if roles != expected:
        raise LeakageError(f"{source}: fold columns {roles} are not {expected}")
    duplicated = folds["dicom_id"].duplicated()
    if duplicated.any():
        raise LeakageError(f"{source}: image {folds['dicom_id'][duplicated].iloc[0]!r} is listed twice")
    for column in roles:
        bad = ~folds[column].isin(ROLES)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise LeakageError(
                f"{source}: {column}, line {row + 2}: role {folds[column].iloc[row]!r} is not one of {ROLES}"
            )
        roles_per_subject = folds.groupby("subject_id")[column].nunique()
        mixed = roles_per_subject[roles_per_subject > 1]
        if len(mixed):
            subject = mixed.index[0]
            seen = sorted(folds.loc[folds["subject_id"] == subject, column].unique())
            raise LeakageError(
                f"{source}: subject {subject} is in roles {seen} of fold {column[5:]}: patient-level leakage"
            )
    times_test = (folds[roles] == "test").sum(axis=1)
    wrong = times_test != 1
    if len(roles) > 1 and wrong.any():  # one fold (an official split) tests what the split says
        row = int(np.flatnonzero(wrong.to_numpy())[0])
        raise LeakageError(
            f"{source}: image {folds['dicom_id'].iloc[row]!r} (subject "
            f"{folds['subject_id'].iloc[row]}) is test in {int(times_test.iloc[row])} folds, "
            f"not exactly 1"
        )
    if index is not None:
        merged = folds[["dicom_id", "subject_id"]].merge(
            index[["dicom_id", "subject_id"]].astype(str),
            on="dicom_id",
            how="outer",
            suffixes=("_folds", "_index"),
            indicator=True,
        )
        only = merged[merged["_merge"] != "both"]
        if len(only):
            row = only.iloc[0]
            where = "the folds" if row["_merge"] == "left_only" else "the index"
            raise LeakageError(
                f"{source}: image {row['dicom_id']!r} is only in {where}; the folds do not match the index"
            )
        differ = merged[merged["subject_id_folds"] != merged["subject_id_index"]]
        if len(differ):
            row = differ.iloc[0]
            raise LeakageError(
                f"{source}: image {row['dicom_id']!r} belongs to subject "
                f"{row['subject_id_index']} in the index but {row['subject_id_folds']} here"
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
    return len(role_columns(folds))


def fold_ids(folds: pd.DataFrame, fold: int, role: str) -> list[str]:
    """dicom_ids with ``role`` (train / val / test) in ``fold``, in file order."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    k = num_folds(folds)
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} does not exist: the fold file has folds 0 .. {k - 1}")
    return folds.loc[folds[f"role_{fold}"] == role, "dicom_id"].tolist()


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Images and subjects per role in each fold."""
    rows = []
    for k in range(num_folds(folds)):
        role = folds[f"role_{k}"]
        for name in ROLES:
            member = role == name
            images, subjects = int(member.sum()), int(folds.loc[member, "subject_id"].nunique())
            rows.append({"fold": k, "role": name, "images": images, "subjects": subjects})
    return pd.DataFrame(rows).pivot(index="fold", columns="role", values=["images", "subjects"])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", type=Path, help="index.csv (from python -m cxrlib.datasets)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of non-test subjects used for validation (default 0.1)",
    )
    parser.add_argument("--out", type=Path, help="folds.csv to write")
    parser.add_argument(
        "--check",
        type=Path,
        metavar="FOLDS_CSV",
        help="only check an existing fold file for leakage (with --index: against it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from .index import read_index

    try:
        if args.check is not None:
            index = read_index(args.index) if args.index else None
            folds = read_folds(args.check, index)
            print(
                f"{args.check}: {len(folds)} images, {folds['subject_id'].nunique()} subjects, "
                f"{num_folds(folds)} folds, no leakage"
            )
            return 0
        if args.index is None or args.out is None:
            get_args_parser().error("give --index and --out to make folds, or --check FOLDS_CSV")
        folds = make_folds(read_index(args.index), args.folds, args.seed, args.val_fraction)
        write_folds(folds, args.out)
    except (LeakageError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {
        k: (folds[f"role_{k}"].value_counts().reindex(list(ROLES), fill_value=0)).tolist()
        for k in range(args.folds)
    }
    print(
        f"wrote {args.out}: {len(folds)} images of {folds['subject_id'].nunique()} subjects; "
        f"train/val/test images per fold: {counts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
