"""Every data source by name, and the command line that writes an index (``python -m cxrlib.datasets``).

Sources: ``mimic`` (and a written ``phantom``, which has MIMIC-CXR-JPG's layout), ``chexpert``,
``csv`` (:mod:`cxrlib.readers`), ``nih`` (:mod:`cxrlib.nih`) and ``kermany`` (:mod:`cxrlib.kermany`).

Command line::

    python -m cxrlib.datasets --dataset mimic --data-root MIMIC --out index.csv [--views frontal]
    python -m cxrlib.datasets --dataset chexpert --data-root CheXpert-v1.0 --csv valid.csv --out index.csv
    python -m cxrlib.datasets --dataset nih --data-root ChestX-ray14 --out index.csv [--nih-subset train_val]
    python -m cxrlib.datasets --dataset kermany --data-root data/chest_xray --out index.csv
    python -m cxrlib.datasets --dataset csv --csv ../shared/data/kermany-pediatric-cxr/labels.csv \\
        --label-map kermany --out index.csv
    python -m cxrlib.datasets --dataset csv --csv export.csv --labels-column "Finding Labels" \\
        --labels-separator "|" [--no-finding-token "No Finding"] [--findings Nodule,Tuberculosis] \\
        --out index.csv
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from .fileio import DataError, DataFileNotFound
from .index import describe_index, drop_unlabelled_findings, write_index
from .kermany import check_kermany_root, index_from_kermany
from .labels import BLANK_OPTIONS, POLICIES
from .nih import NIH_SUBSETS, find_nih_entry, index_from_nih
from .readers import (
    LABEL_MAPS,
    MIMIC_LABELS,
    MIMIC_METADATA,
    MIMIC_SPLITS,
    _require_mimic_file,
    index_from_chexpert,
    index_from_csv,
    index_from_mimic,
)

SOURCES: tuple[str, ...] = ("mimic", "chexpert", "nih", "kermany", "csv")


def check_data_root(source: str, root: str | os.PathLike, csv: str | os.PathLike | None = None) -> None:
    """Raise :class:`~cxrlib.fileio.DataFileNotFound` (a ``FileNotFoundError``) naming the first file
    that a ``mimic``, ``chexpert``, ``nih``, ``kermany`` or ``csv`` data root lacks (``csv``: the
    label file, relative to ``root`` unless absolute).

    A cheap check before any work; the index builders check every row again later.
    """
    root = Path(os.path.abspath(root))
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if source == "kermany":  # a missing root too: where to download the set and where to unpack it
        check_kermany_root(root)
        return
    if not root.is_dir():
        raise DataFileNotFound(f"data root not found: {root} (data source {source})")
    if source == "nih":
        find_nih_entry(root)
        return
    if source == "mimic":
        for name in (MIMIC_METADATA, MIMIC_LABELS):
            _require_mimic_file(root, name)
        return
    if csv is None:
        if source == "csv":
            raise DataError("a csv data source needs the name of its label file (data.csv, --csv)")
        csv = "train.csv"
    path = Path(csv) if Path(csv).is_absolute() else root / csv
    if not path.is_file():
        raise DataFileNotFound(f"{root}: label file {path.name} not found at {path} (data source {source})")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=SOURCES, required=True, help="source format")
    parser.add_argument("--data-root", type=Path, help="dataset folder (csv: default the CSV's folder)")
    parser.add_argument("--out", type=Path, required=True, help="index.csv to write")
    parser.add_argument(
        "--policy", choices=POLICIES, default="u-zeros", help="uncertain (-1) labels (default u-zeros)"
    )
    parser.add_argument("--blank", choices=BLANK_OPTIONS, default="zero", help="blank labels (default zero)")
    parser.add_argument("--views", default="all", help="all (default), frontal, or names such as PA,AP")
    parser.add_argument("--split", choices=MIMIC_SPLITS, help="mimic: keep one official split")
    parser.add_argument("--csv", help="chexpert: CSV in the data root (default train.csv); csv: the CSV file")
    parser.add_argument("--path-column", default="path", help="csv: image path column (default path)")
    parser.add_argument("--patient-column", default="patient_id", help="csv: patient id column")
    parser.add_argument("--study-column", help="csv: study id column (default: one study per image)")
    parser.add_argument("--id-column", help="csv: image id column (default: the file name)")
    parser.add_argument("--view-column", help="csv: view column")
    parser.add_argument("--view", default="", help="csv: view of every image when there is no view column")
    parser.add_argument("--label-column", help="csv: the column --label-map reads")
    parser.add_argument("--label-map", help=f"csv: {'|'.join(LABEL_MAPS)}, a JSON object or a JSON file")
    parser.add_argument(
        "--finding-columns", help="csv: comma-separated finding columns (default: all present)"
    )
    parser.add_argument(
        "--labels-column", help="csv: a multi-label column (findings joined by --labels-separator)"
    )
    parser.add_argument("--labels-separator", default="|", help="csv: between findings (default |)")
    parser.add_argument(
        "--no-finding-token", default="No Finding", help="csv: the value meaning none (default No Finding)"
    )
    parser.add_argument("--findings", help="csv: the label set, comma-separated (default: the values seen)")
    parser.add_argument(
        "--nih-subset", choices=NIH_SUBSETS, default="all", help="nih: all, or one of NIH's official lists"
    )
    parser.add_argument("--no-check-files", action="store_true", help="do not check that the images exist")
    return parser


def index_from_source(
    source: str,
    root: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    csv_options: dict | None = None,
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | None = None,
) -> pd.DataFrame:
    """The index of a data source as a preset names it: ``mimic`` (or a written ``phantom``, which
    has MIMIC-CXR-JPG's layout), ``chexpert`` (``csv`` default ``train.csv``), ``csv`` (a label
    file, relative to ``root`` unless absolute, read with ``csv_options``) or ``nih``
    (``csv_options`` may hold its ``subset``; NIH's labels are never uncertain, so no policy) or
    ``kermany`` (its official layout). Its label set is the findings the data label with both
    classes (:func:`drop_unlabelled_findings`)."""
    common = {"policy": policy, "blank": blank, "views": views}
    if source in ("phantom", "mimic"):
        index = index_from_mimic(root, **common)
    elif source == "chexpert":
        index = index_from_chexpert(root, csv=csv or "train.csv", **common)
    elif source == "nih":
        index = index_from_nih(root, views=views, **(csv_options or {}))
    elif source == "kermany":
        index = index_from_kermany(root, views)
    elif source == "csv":
        if not csv:
            raise DataError("data.csv must name the label file of a csv data source")
        path = Path(csv) if Path(csv).is_absolute() else Path(root) / csv
        index = index_from_csv(path, root=root, **{**(csv_options or {}), **common})
    else:
        raise DataError(f"unknown data source {source!r}")
    return drop_unlabelled_findings(index, f"{source} data in {root}")


def build_index(args: argparse.Namespace) -> pd.DataFrame:
    """The index the command-line arguments ask for."""
    common = {
        "policy": args.policy,
        "blank": args.blank,
        "views": args.views,
        "check_files": not args.no_check_files,
    }
    if args.dataset != "mimic" and args.split:
        raise DataError("--split is for --dataset mimic")
    if args.dataset == "nih":
        if args.data_root is None:
            raise DataError("--dataset nih needs --data-root")
        return index_from_nih(args.data_root, args.nih_subset, args.views, common["check_files"])
    if args.dataset == "kermany":
        if args.data_root is None:
            raise DataError("--dataset kermany needs --data-root (the chest_xray folder)")
        return index_from_kermany(args.data_root, args.views)
    if args.dataset == "mimic":
        if args.data_root is None:
            raise DataError("--dataset mimic needs --data-root")
        return index_from_mimic(args.data_root, split=args.split, **common)
    if args.dataset == "chexpert":
        if args.data_root is None:
            raise DataError("--dataset chexpert needs --data-root")
        return index_from_chexpert(args.data_root, args.csv or "train.csv", **common)
    if args.csv is None:
        raise DataError("--dataset csv needs --csv FILE")
    return index_from_csv(args.csv, root=args.data_root, **csv_arguments(args), **common)


def _names(text: str | None) -> list[str] | None:
    return [f.strip() for f in text.split(",") if f.strip()] if text else None


def csv_arguments(args: argparse.Namespace) -> dict:
    """The options of :func:`cxrlib.readers.index_from_csv` the command line gives."""
    return {
        "path_column": args.path_column,
        "patient_column": args.patient_column,
        "study_column": args.study_column,
        "id_column": args.id_column,
        "label_column": args.label_column,
        "label_map": args.label_map,
        "finding_columns": _names(args.finding_columns),
        "view_column": args.view_column,
        "view": args.view,
        "labels_column": args.labels_column,
        "labels_separator": args.labels_separator,
        "no_finding": args.no_finding_token or None,
        "findings": _names(args.findings),
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        index = drop_unlabelled_findings(build_index(args), str(args.csv or args.data_root))
        write_index(index, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    print(describe_index(index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
