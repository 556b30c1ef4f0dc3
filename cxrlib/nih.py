"""NIH ChestX-ray14 in its official layout -> an image index with NIH's 14 findings and No Finding.

The release (Wang et al. 2017) as distributed::

    Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv; either may be gzipped, .csv.gz)
    images_001/images/*.png .. images_012/images/*.png   (or one images/ folder)
    train_val_list.txt, test_list.txt                     (one image name per line)

``Data_Entry_2017_v2020.csv`` has the columns ``Image Index``, ``Finding Labels`` (findings joined
by ``|``, or ``No Finding``), ``Follow-up #``, ``Patient ID``, ``Patient Age``, ``Patient Gender``,
``View Position``, ``OriginalImage[Width``, ``Height]``, ``OriginalImagePixelSpacing[x``, ``y]``
(the header really splits ``OriginalImage[Width,Height]`` into two columns).

The index's label set is :data:`cxrlib.labels.NIH_FINDINGS`: a finding listed is 1, one not listed
0, and ``No Finding`` 1 exactly when the column says so. ``width`` / ``height`` are the stored
PNG's (1024 x 1024 in the release); ``native_width`` / ``native_height`` the original acquisition's,
from the metadata, which is what Fig. 3 draws.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .fileio import DataError, DataFileNotFound
from .index import validate_index
from .labels import NIH_FINDINGS, NO_FINDING
from .readers import (
    _filter_views,
    _image_sizes,
    _int_column,
    _read_table,
    _refuse_blanks,
    _refuse_duplicates,
    _refuse_missing_files,
    multi_label_targets,
)

NIH_ENTRY_FILES: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_REQUIRED: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "View Position",
    "OriginalImage[Width",
    "Height]",
)
NIH_LISTS: dict[str, str] = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
NIH_SUBSETS: tuple[str, ...] = ("all", "train_val", "test")


def find_nih_entry(root: str | os.PathLike) -> Path:
    """The metadata CSV (or .csv.gz) of an NIH ChestX-ray14 folder; a one-line error when there is none."""
    for name in NIH_ENTRY_FILES:
        for path in (Path(root) / name, Path(root) / f"{name}.gz"):
            if path.is_file():
                return path
    raise DataFileNotFound(
        f"{root}: neither {' nor '.join(NIH_ENTRY_FILES)} (nor .gz) found; --data-root must be the NIH "
        "ChestX-ray14 folder that holds them and images_001/ .. images_012/ (or images/)"
    )


def find_nih_images(root: str | os.PathLike) -> dict[str, str]:
    """``{file name: path}`` of the PNGs in ``images_*/images/`` and ``images/`` under ``root``."""
    root = Path(root)
    folders = sorted(root.glob("images_*/images")) + [root / "images"]
    found: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.lower().endswith(".png"):
                    found.setdefault(entry.name, entry.path)
    return found


def read_nih_list(path: Path) -> set[str]:
    """The image names of ``train_val_list.txt`` / ``test_list.txt`` (one per line, blanks skipped)."""
    if not path.is_file():
        raise DataFileNotFound(f"{path}: not found; NIH's official lists sit beside the metadata CSV")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    names = [line.strip() for line in text.splitlines()]
    for number, name in enumerate(names, start=1):
        if name and (os.sep in name or "/" in name or "," in name):
            raise DataError(f"{path}: line {number}: {name!r} is not an image file name")
    return {name for name in names if name}


def index_from_nih(
    root: str | os.PathLike,
    subset: str = "all",
    views: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Index of NIH ChestX-ray14 from its official release (see the module docs).

    Args:
        root: the folder holding ``Data_Entry_2017_v2020.csv`` and the image folders.
        subset: ``all`` images, only NIH's ``train_val`` list (its official test patients stay out
            of the folds) or only its ``test`` list.
        views: None / ``"all"``, ``"frontal"`` or names such as ``"PA,AP"`` (``View Position``).
        check_files: refuse the index when a listed image is not on disk, and read the stored size.
    """
    if subset not in NIH_SUBSETS:
        raise DataError(f"unknown NIH subset {subset!r}; choose one of {NIH_SUBSETS}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataFileNotFound(f"NIH ChestX-ray14 folder not found: {root}")
    entry = find_nih_entry(root)
    table = _read_table(entry, NIH_REQUIRED)
    for column in ("Image Index", "Patient ID", "Finding Labels"):
        _refuse_blanks(table, column, entry)
    table["Image Index"] = table["Image Index"].str.strip()
    _refuse_duplicates(table, ["Image Index"], entry)
    labels = multi_label_targets(
        table, "Finding Labels", NIH_FINDINGS[:-1], "|", NO_FINDING, entry, no_finding_column=True
    )
    frame = _nih_frame(table, root, entry, check_files)
    if subset != "all":
        frame = frame[frame["Image Index"].isin(read_nih_list(root / NIH_LISTS[subset]))]
        if frame.empty:
            raise DataError(f"{root / NIH_LISTS[subset]}: names no image of {entry.name}")
    frame = _filter_views(frame, views, entry)
    if check_files:
        _refuse_missing_files(frame, entry, "check --data-root (images_*/images/ or images/ under it)")
        frame[["width", "height"]] = _image_sizes(frame, entry)
    else:
        frame["width"] = frame["height"] = pd.NA
    columns = ["dicom_id", "subject_id", "study_id", "path", "view", "width", "height"]
    index = pd.concat([frame[[*columns, "native_width", "native_height"]], labels.loc[frame.index]], axis=1)
    return validate_index(index.reset_index(drop=True), source=str(entry))


def _nih_frame(table: pd.DataFrame, root: Path, entry: Path, check_files: bool) -> pd.DataFrame:
    """The metadata with the index's ids, view, native size and image path."""
    names = table["Image Index"]
    bad = names.str.contains(r"[/\\]", regex=True) | ~names.str.lower().str.endswith(".png")
    if bad.any():
        row = table[bad].iloc[0]
        raise DataError(
            f"{entry}: column 'Image Index', line {row['_line']}: {row['Image Index']!r} "
            "is not a PNG file name"
        )
    found = find_nih_images(root) if check_files else {}
    stems = names.str[:-4]
    return table.assign(
        dicom_id=stems,
        subject_id=table["Patient ID"].str.strip(),
        study_id=stems,  # one image per visit (Follow-up #) in NIH's release
        view=table["View Position"].fillna("").str.strip().str.upper(),
        native_width=_int_column(table, "OriginalImage[Width", entry),
        native_height=_int_column(table, "Height]", entry),
        path=[found.get(name, str(root / "images" / name)) for name in names],
    )
