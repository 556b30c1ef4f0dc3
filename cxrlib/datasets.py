"""Every data source as an image index, and the command line that writes one (``python -m cxrlib.datasets``).

Sources: MIMIC-CXR-JPG (and a written phantom, which has its layout), CheXpert, NIH ChestX-ray14,
Kermany's pediatric set and any CSV. Every error of an input file is a one-line
:class:`~cxrlib.fileio.DataError` naming the file, column and line.

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
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .cache import image_size
from .fileio import DataError, DataFileNotFound, read_csv_text
from .index import ID_COLUMNS, describe_index, drop_unlabelled_findings, validate_index, write_index
from .labels import (
    BLANK_OPTIONS,
    FINDINGS,
    NIH_FINDINGS,
    NO_FINDING,
    POLICIES,
    apply_policy,
    validate_raw_labels,
)

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "PA RLD", "AP RLD")

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
MIMIC_SPLITS: tuple[str, ...] = ("train", "validate", "test")

# Built-in label maps for index_from_csv: label column value -> {finding: raw label}.
LABEL_MAPS: dict[str, dict[str, dict[str, float]]] = {
    # ../shared/data/kermany-pediatric-cxr/README.md; the other 12 findings are unknown
    "kermany": {
        "PNEUMONIA": {"Pneumonia": 1, "No Finding": 0},
        "NORMAL": {"Pneumonia": 0, "No Finding": 1},
    },
}
LABEL_MAP_COLUMNS: dict[str, str] = {"kermany": "finding"}  # the label column a built-in map reads


# --------------------------------------------------------------------------- shared helpers


def _check_policy(policy: str, blank: str) -> None:
    if policy not in POLICIES:
        raise DataError(f"unknown uncertainty policy {policy!r}; choose one of {POLICIES}")
    if blank not in BLANK_OPTIONS:
        raise DataError(f"unknown blank option {blank!r}; choose one of {BLANK_OPTIONS}")


def _read_table(path: Path, required: Iterable[str], flags: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV (plain or .gz) as strings, blanks as NaN; refuse it when a required column is
    missing, naming the option that names it (``flags``: column -> option) when there is one."""
    if not path.is_file():
        raise DataFileNotFound(f"file not found: {path}")
    frame = read_csv_text(path, dtype=str, keep_default_na=False, na_values=[""])
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        options = [flags[c] for c in missing if c in (flags or {})]
        named = f"; give the CSV's own column name with {', '.join(options)}" if options else ""
        raise DataError(f"{path}: missing column(s) {missing}; its columns are {list(frame.columns)}{named}")
    duplicated = pd.Index(frame.columns).duplicated()  # " a" and "a" are one name once stripped
    if duplicated.any():
        name = frame.columns[duplicated][0]
        raise DataError(f"{path}: line 1: column {name!r} appears twice in the header")
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    frame["_line"] = np.arange(len(frame)) + 2  # CSV line of each row (the header is line 1)
    return frame


def _refuse_duplicates(frame: pd.DataFrame, columns: list[str], source: Path) -> None:
    duplicated = frame.duplicated(columns, keep=False)
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        same = frame[(frame[columns] == first[columns]).all(axis=1)]
        key = ", ".join(f"{c} {first[c]!r}" for c in columns)
        raise DataError(f"{source}: {key} is listed more than once (lines {same['_line'].tolist()[:5]})")


def _refuse_blanks(frame: pd.DataFrame, column: str, source: Path) -> None:
    blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
    if blank.any():
        raise DataError(f"{source}: column {column!r}, line {frame['_line'][blank].iloc[0]}: blank value")


def _int_column(frame: pd.DataFrame, column: str, source: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | (values <= 0) | (values != values.round())
    if bad.any():
        row = frame[bad].iloc[0]
        raise DataError(
            f"{source}: column {column!r}, line {row['_line']}: {row[column]!r} is not a positive integer"
        )
    return values.astype("int64")


def _wanted_views(views: str | Iterable[str] | None) -> set[str] | None:
    """``None`` / ``"all"`` -> None (keep all); ``"frontal"``, ``"PA,AP"`` or a list -> upper-case set."""
    if views is None:
        return None
    if isinstance(views, str):
        if views.strip().lower() == "all":
            return None
        views = views.split(",")
    wanted = {str(v).strip().upper() for v in views if str(v).strip()}
    if "FRONTAL" in wanted:
        wanted = (wanted - {"FRONTAL"}) | set(FRONTAL_VIEWS)
    if not wanted:
        raise DataError("views: give 'all', 'frontal' or view names such as 'PA,AP'")
    return wanted


def _filter_views(frame: pd.DataFrame, views, source: Path, frontal: pd.Series | None = None) -> pd.DataFrame:
    """The rows whose view is wanted. ``frontal`` marks the rows a source itself calls frontal
    (CheXpert's Frontal/Lateral column): asking for frontal views keeps them whatever their view."""
    wanted = _wanted_views(views)
    if wanted is None:
        return frame
    keep = frame["view"].str.upper().isin(wanted)
    if frontal is not None and wanted >= set(FRONTAL_VIEWS):
        keep |= frontal
    kept = frame[keep]
    if kept.empty:
        present = frame["view"].replace("", "(blank)").value_counts().to_dict()
        raise DataError(
            f"{source}: no image has a view in {sorted(wanted)}; views present: {present or 'none'}"
        )
    return kept


def _refuse_missing_files(frame: pd.DataFrame, source: Path, hint: str) -> None:
    paths = frame["path"].tolist()
    exists = np.array(
        [
            os.path.isfile(p)
            for p in tqdm(paths, desc="checking files", leave=False, disable=len(paths) < 5000)
        ],
        dtype=bool,
    )
    if not exists.all():
        missing = frame[~exists]
        examples = "; ".join(
            f"line {line}: {path}"
            for line, path in zip(missing["_line"][:3], missing["path"][:3], strict=True)
        )
        raise DataFileNotFound(
            f"{source}: {len(missing)} of {len(frame)} listed images are missing on disk ({examples}); {hint}"
        )


def _image_sizes(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    """``width`` and ``height`` columns read from the image headers; errors name the CSV line."""
    sizes = []
    rows = zip(frame["_line"], frame["path"], strict=True)
    for line, path in tqdm(
        rows, total=len(frame), desc="reading sizes", leave=False, disable=len(frame) < 5000
    ):
        try:
            sizes.append(image_size(path))
        except Exception as error:  # name the row, whatever Pillow raised
            raise DataError(f"{source}: line {line}: cannot read image {path}: {error}") from error
    return pd.DataFrame(sizes, index=frame.index, columns=["width", "height"], dtype="int64")


def _finish(frame: pd.DataFrame, labels: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Assemble the schema's columns in order and validate."""
    index = pd.concat(
        [frame[["dicom_id", "subject_id", "study_id", "path", "view", "width", "height"]], labels], axis=1
    )
    return validate_index(index.reset_index(drop=True), source=str(source))


def _resolve(paths: pd.Series, root: Path) -> pd.Series:
    """Absolute paths: absolute ones kept, others under ``root``; a first component equal to
    ``root``'s own name (CheXpert's ``CheXpert-v1.0/train/...`` with root ``CheXpert-v1.0``) is
    taken as root itself."""
    inside = not (root / root.name).exists()

    def one(path: str) -> str:
        parts = Path(path).parts
        if Path(path).is_absolute():
            return os.path.normpath(path)
        if inside and len(parts) > 1 and parts[0] == root.name:
            parts = parts[1:]
        return os.path.normpath(os.path.join(root, *parts))

    return paths.astype(str).map(one)


# --------------------------------------------------------------------------- MIMIC-CXR-JPG


def find_mimic_file(root: str | os.PathLike, name: str) -> Path | None:
    """``root/name.gz`` or ``root/name``, whichever exists (None when neither)."""
    for candidate in (Path(root) / f"{name}.gz", Path(root) / name):
        if candidate.is_file():
            return candidate
    return None


def _require_mimic_file(root: Path, name: str) -> Path:
    path = find_mimic_file(root, name)
    if path is None:
        raise DataFileNotFound(
            f"{root}: neither {name}.gz nor {name} found; --data-root must be the MIMIC-CXR-JPG "
            f"folder that holds the CSVs and files/"
        )
    return path


def index_from_mimic(
    root: str | os.PathLike,
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    split: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Index of MIMIC-CXR-JPG from its official CSVs; each study's labels go to all its images.

    Args:
        root: the folder holding ``mimic-cxr-2.0.0-{metadata,chexpert,split}.csv[.gz]`` and ``files/``.
        policy, blank: uncertainty policy and blank handling (:func:`cxrlib.labels.apply_policy`).
        views: None or ``"all"`` (every view, as in the paper), ``"frontal"``, or view names
            such as ``("PA", "AP")`` or ``"PA,AP"`` (matched to ``ViewPosition``, any case).
        split: keep only the official ``train`` / ``validate`` / ``test`` images (needs the split CSV).
        check_files: refuse the index when a listed image is not on disk.

    A study with images but no label row (MIMIC has a few) gets blank labels, which the
    policy maps (0 with ``blank="zero"``); a warning gives the count.
    """
    _check_policy(policy, blank)
    if split is not None and split not in MIMIC_SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {MIMIC_SPLITS}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataFileNotFound(f"MIMIC-CXR-JPG folder not found: {root}")
    metadata_path = _require_mimic_file(root, MIMIC_METADATA)
    labels_path = _require_mimic_file(root, MIMIC_LABELS)
    meta = _mimic_metadata(metadata_path)
    raw = _mimic_labels(labels_path)
    frame = meta.merge(
        raw[["subject_id", "study_id", *FINDINGS]], on=["subject_id", "study_id"], how="left", indicator=True
    )
    _warn_unlabeled(frame, labels_path, metadata_path, f"{policy}, blank={blank}")
    if split is not None:
        frame = _keep_split(frame, root, split, metadata_path)
    frame = _filter_views(frame, views, metadata_path)
    frame = frame.assign(path=_mimic_image_paths(frame, root))
    if check_files:
        _refuse_missing_files(
            frame, metadata_path, "check --data-root, or pass check_files=False (--no-check-files)"
        )
    labels = apply_policy(frame[list(FINDINGS)], policy, blank, source=str(labels_path))
    return _finish(frame, labels, metadata_path)


def _mimic_metadata(path: Path) -> pd.DataFrame:
    """The metadata CSV with stripped ids and the index's ``width``, ``height`` and ``view`` columns."""
    meta = _read_table(path, ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"))
    for column in ID_COLUMNS:
        _refuse_blanks(meta, column, path)
        meta[column] = meta[column].str.strip()
    _refuse_duplicates(meta, ["dicom_id"], path)
    meta["width"] = _int_column(meta, "Columns", path)
    meta["height"] = _int_column(meta, "Rows", path)
    meta["view"] = meta["ViewPosition"].fillna("").str.strip()
    return meta


def _mimic_labels(path: Path) -> pd.DataFrame:
    """The raw labels per study (one row per subject and study), checked."""
    raw = _read_table(path, ("subject_id", "study_id", *FINDINGS))
    validate_raw_labels(raw, str(path))
    for column in ("subject_id", "study_id"):
        _refuse_blanks(raw, column, path)
        raw[column] = raw[column].str.strip()
    _refuse_duplicates(raw, ["subject_id", "study_id"], path)
    return raw


def _warn_unlabeled(frame: pd.DataFrame, labels_path: Path, metadata_path: Path, taken_as: str) -> None:
    """Warn about images whose study has no label row (their labels are blank)."""
    unlabeled = frame["_merge"] == "left_only"
    if unlabeled.any():
        studies = frame.loc[unlabeled, ["subject_id", "study_id"]].drop_duplicates()
        warnings.warn(
            f"{labels_path}: {len(studies)} studies ({int(unlabeled.sum())} images) of {metadata_path.name} "
            f"have no label row (e.g. study {studies['study_id'].iloc[0]}); their labels are taken as "
            f"blank ({taken_as})",
            stacklevel=3,  # the caller of index_from_mimic
        )


def _keep_split(frame: pd.DataFrame, root: Path, split: str, metadata_path: Path) -> pd.DataFrame:
    """The images of one official split, from the split CSV."""
    split_path = _require_mimic_file(root, MIMIC_SPLIT)
    splits = _read_table(split_path, ("dicom_id", "split"))
    splits["dicom_id"] = splits["dicom_id"].str.strip()
    _refuse_duplicates(splits, ["dicom_id"], split_path)
    bad = ~splits["split"].isin(MIMIC_SPLITS)
    if bad.any():
        row = splits[bad].iloc[0]
        raise DataError(
            f"{split_path}: column 'split', line {row['_line']}: {row['split']!r} "
            f"is not one of {MIMIC_SPLITS}"
        )
    frame = frame[frame["dicom_id"].isin(splits.loc[splits["split"] == split, "dicom_id"])]
    if frame.empty:
        raise DataError(f"{split_path}: no image of {metadata_path.name} is in split {split!r}")
    return frame


def _mimic_image_paths(frame: pd.DataFrame, root: Path) -> pd.Series:
    """``root/files/p<2 digits>/p<subject>/s<study>/<dicom_id>.jpg`` of every row."""
    subject, study = frame["subject_id"], frame["study_id"]
    files = str(root / "files")
    return (
        files
        + os.sep
        + "p"
        + subject.str[:2]
        + os.sep
        + "p"
        + subject
        + os.sep
        + "s"
        + study
        + os.sep
        + frame["dicom_id"]
        + ".jpg"
    )


# --------------------------------------------------------------------------- CheXpert

_CHEXPERT_PATH = re.compile(r"patient(\d+)[/\\](study\d+)[/\\]([^/\\]+?)\.[^./\\]+$")


def index_from_chexpert(
    root: str | os.PathLike,
    csv: str | os.PathLike = "train.csv",
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Index of CheXpert from its ``train.csv`` / ``valid.csv`` (Path, Frontal/Lateral, AP/PA, findings).

    ``Path`` (``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``) is resolved
    under ``root``, which may be the folder holding ``CheXpert-v1.0/`` or that folder itself.
    ``subject_id`` is ``patient00001``, ``study_id`` ``patient00001/study1``, and ``dicom_id``
    ``00001_study1_view1_frontal`` (digits first, so the cache spreads images over 100 folders).
    ``view`` is the ``AP/PA`` column for frontal images (``AP``, ``PA``, and ``LL`` / ``RL`` for a
    few, which ``views="frontal"`` keeps as the Frontal/Lateral column says) and ``LATERAL`` for
    lateral ones. Width and height come from the image headers (not read when ``check_files`` is False).
    """
    _check_policy(policy, blank)
    root = Path(os.path.abspath(root))
    csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    table = _read_table(csv_path, ("Path", "Frontal/Lateral", "AP/PA", *FINDINGS))
    labels = apply_policy(table, policy, blank, source=str(csv_path))
    _refuse_blanks(table, "Path", csv_path)
    parts = table["Path"].str.extract(_CHEXPERT_PATH)
    unparsed = parts.isna().any(axis=1)
    if unparsed.any():
        row = table[unparsed].iloc[0]
        raise DataError(
            f"{csv_path}: column 'Path', line {row['_line']}: {row['Path']!r} does not end in "
            f"patientNNNNN/studyN/<image>.jpg"
        )
    patient = "patient" + parts[0]
    lateral = table["Frontal/Lateral"].fillna("").str.strip().str.lower() == "lateral"
    frame = table.assign(
        subject_id=patient,
        study_id=patient + "/" + parts[1],
        dicom_id=parts[0] + "_" + parts[1] + "_" + parts[2],
        view=table["AP/PA"].fillna("").str.strip().where(~lateral, "LATERAL"),
        path=_resolve(table["Path"], root),
    )
    _refuse_duplicates(frame, ["dicom_id"], csv_path)
    frame = _filter_views(frame, views, csv_path, frontal=~lateral)
    labels = labels.loc[frame.index]
    if check_files:
        _refuse_missing_files(
            frame, csv_path, "check --data-root, or pass check_files=False (--no-check-files)"
        )
        frame[["width", "height"]] = _image_sizes(frame, csv_path)
    else:
        frame["width"] = frame["height"] = pd.NA
    return _finish(frame, labels, csv_path)


# --------------------------------------------------------------------------- any CSV


def _parse_label_map(label_map: str | Mapping) -> dict[str, dict[str, float]]:
    """A built-in name, a JSON string, a JSON file or a dict -> {value: {finding: raw label}}, checked."""
    if isinstance(label_map, str):
        text = label_map.strip()
        if text in LABEL_MAPS:
            label_map = LABEL_MAPS[text]
        elif text.startswith("{"):
            try:
                label_map = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"label map: invalid JSON: {error}") from error
        elif Path(text).is_file():
            try:
                label_map = json.loads(Path(text).read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"label map {text}: invalid JSON: {error}") from error
        else:
            raise DataError(
                f"label map {text!r} is not a built-in map {sorted(LABEL_MAPS)}, a JSON object or a JSON file"
            )
    checked: dict[str, dict[str, float]] = {}
    for value, findings in dict(label_map).items():
        if not isinstance(findings, Mapping):
            raise DataError(f"label map: value {value!r} must map to {{finding: 0 or 1}}, got {findings!r}")
        for finding, label in findings.items():
            if finding not in FINDINGS:
                raise DataError(f"label map: value {value!r}: {finding!r} is not one of the 14 findings")
            if label not in (0, 1, -1):
                raise DataError(f"label map: value {value!r}, {finding!r}: {label!r} is not 1, 0 or -1")
        checked[str(value).strip()] = {f: float(v) for f, v in findings.items()}
    if not checked:
        raise DataError("label map: empty")
    return checked


def _ids_from_paths(paths: pd.Series, root: Path) -> pd.Series:
    """File names without extension, or, when two files share a name, their path under root."""
    stems = paths.map(lambda p: Path(p).stem)
    if not stems.duplicated().any():
        return stems
    relative = paths.map(lambda p: os.path.splitext(os.path.relpath(p, root))[0])
    return relative.str.replace(r"[/\\]", "__", regex=True).str.lstrip(".")


def index_from_csv(
    csv: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_column: str = "path",
    patient_column: str = "patient_id",
    study_column: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    label_map: str | Mapping | None = None,
    finding_columns: Iterable[str] | Mapping[str, str] | None = None,
    view_column: str | None = None,
    view: str = "",
    width_column: str = "width",
    height_column: str = "height",
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    check_files: bool = True,
    labels_column: str | None = None,
    labels_separator: str = "|",
    no_finding: str | None = "No Finding",
    findings: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Index of any CSV: an image path and a patient id per row, and labels given one of three ways.

    * finding columns (1 / 0 / -1 / blank, mapped by ``policy`` and ``blank``):
      ``finding_columns`` lists finding names that are CSV columns, or maps CSV column ->
      finding; by default every CSV column named like a finding is used;
    * one ``label_column`` whose values ``label_map`` ({value: {finding: 1 / 0 / -1}}, a
      built-in name such as ``"kermany"``, or JSON) turns into findings; a value not in the
      map is an error;
    * one multi-label ``labels_column`` (``"Mass|Nodule"``, split at ``labels_separator``): a
      finding listed is 1, one not listed 0, ``no_finding`` means none. The label set is then the
      index's own: ``findings`` as declared, or the values seen (sorted, then ``no_finding`` when
      a row gives it); :func:`cxrlib.index.describe_index` lists it.

    With the first two, the label set is CheXpert's 14 and findings the CSV does not give are
    unknown (NaN), never 0. Paths are relative to
    ``root`` (default: the CSV's folder) unless absolute. ``dicom_id`` comes from
    ``id_column`` or else the file name; ``study_id`` from ``study_column`` or else the
    image id (one study per image); ``view`` from ``view_column`` or else ``view``; width and
    height from their columns when present, else from the image headers.
    """
    _check_policy(policy, blank)
    csv_path = Path(os.path.abspath(csv))
    root = Path(os.path.abspath(root)) if root is not None else csv_path.parent
    if isinstance(label_map, str) and label_column is None:
        label_column = LABEL_MAP_COLUMNS.get(label_map.strip())
    if (label_map is None) != (label_column is None):
        raise DataError("give both label_column (--label-column) and label_map (--label-map), or neither")
    flags = {  # every column the CSV must have, and the option that names it
        path_column: "--path-column", patient_column: "--patient-column", study_column: "--study-column",
        id_column: "--id-column", view_column: "--view-column", labels_column: "--labels-column",
        label_column: "--label-column",
    }  # fmt: skip
    if labels_column is not None and (label_column is not None or finding_columns is not None):
        raise DataError("give labels_column (--labels-column) alone, without a label map or finding columns")
    if label_column is not None and finding_columns is not None:
        raise DataError("give finding_columns or label_column with label_map, not both")
    table = _read_table(csv_path, [c for c in flags if c], flags)
    for column in (path_column, patient_column):
        _refuse_blanks(table, column, csv_path)
    labels = _csv_labels(
        table, csv_path, (label_column, label_map, finding_columns, policy, blank),
        (labels_column, labels_separator, no_finding, findings),
    )  # fmt: skip

    frame = _csv_frame(table, root, path_column, patient_column, study_column, id_column, view_column, view)
    _refuse_duplicates(frame, ["dicom_id"], csv_path)
    frame = _filter_views(frame, views, csv_path)
    labels = labels.loc[frame.index]
    if check_files:
        _refuse_missing_files(
            frame, csv_path, "check the paths and --data-root (the CSV's folder by default)"
        )
    frame = _csv_sizes(frame, width_column, height_column, check_files, csv_path)
    return _finish(frame, labels, csv_path)


def _csv_labels(table: pd.DataFrame, csv_path: Path, single: tuple, multi: tuple) -> pd.DataFrame:
    """The CSV's targets: from its multi-label column (``multi``: column, separator, no-finding
    token, label set), else from a mapped label column or finding columns (``single``)."""
    labels_column, separator, no_finding, findings = multi
    if labels_column is not None:
        if findings is None:  # the values seen, and the no-finding token where a row gives it
            return multi_label_targets(table, labels_column, None, separator, no_finding, csv_path, None)
        return multi_label_targets(table, labels_column, list(findings), separator, no_finding, csv_path)
    label_column, label_map, finding_columns, policy, blank = single
    if label_column is not None:
        raw, given = _mapped_labels(table, label_column, _parse_label_map(label_map), csv_path)
        blank = "unknown"  # a finding a value's map leaves out is not known for that value
    else:
        raw, given = _column_labels(table, finding_columns, csv_path)
    labels = apply_policy(raw, policy, blank, source=str(csv_path))
    labels[[f for f in FINDINGS if f not in given]] = np.nan
    return labels


def _csv_frame(
    table: pd.DataFrame,
    root: Path,
    path_column: str,
    patient_column: str,
    study_column: str | None,
    id_column: str | None,
    view_column: str | None,
    view: str,
) -> pd.DataFrame:
    """The CSV with the index's ``dicom_id``, ``subject_id``, ``study_id``, ``view`` and ``path`` columns."""
    paths = _resolve(table[path_column], root)
    dicom_ids = table[id_column].str.strip() if id_column else _ids_from_paths(paths, root)
    return table.assign(
        dicom_id=dicom_ids,
        subject_id=table[patient_column].str.strip(),
        study_id=table[study_column].str.strip() if study_column else dicom_ids,
        view=table[view_column].fillna("").str.strip() if view_column else view,
        path=paths,
    )


def _no_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Raw labels of every finding blank (NaN), one row per CSV row."""
    return pd.DataFrame(np.nan, index=table.index, columns=list(FINDINGS), dtype=object)


def _mapped_labels(
    table: pd.DataFrame, label_column: str, mapping: dict[str, dict[str, float]], csv_path: Path
) -> tuple[pd.DataFrame, list[str]]:
    """Raw labels from one label column through a checked label map; and the findings it gives."""
    raw = _no_labels(table)
    values = table[label_column].fillna("").str.strip()
    unknown = ~values.isin(list(mapping))
    if unknown.any():
        row = table[unknown].iloc[0]
        same = [key for key in mapping if key.lower() == values[unknown].iloc[0].lower()]
        case = f": it differs from {same[0]!r} only in case" if same else ""
        raise DataError(
            f"{csv_path}: column {label_column!r}, line {row['_line']}: {row[label_column]!r} is not "
            f"in the label map (its values: {sorted(mapping)}){case}"
        )
    for value, findings in mapping.items():
        for finding, label in findings.items():
            raw.loc[values == value, finding] = label
    return raw, sorted({f for findings in mapping.values() for f in findings})


def _column_labels(
    table: pd.DataFrame, finding_columns: Iterable[str] | Mapping[str, str] | None, csv_path: Path
) -> tuple[pd.DataFrame, list[str]]:
    """Raw labels from finding columns (by default every column named like a finding); and those findings."""
    raw = _no_labels(table)
    if finding_columns is None:
        columns = {f: f for f in FINDINGS if f in table.columns}
    elif isinstance(finding_columns, Mapping):
        columns = dict(finding_columns)
    else:
        columns = {f: f for f in finding_columns}
    if not columns:
        columns_present = [c for c in table.columns if c != "_line"]
        raise DataError(
            f"{csv_path}: no labels: name finding columns (--finding-columns) or a label column and "
            f"map (--label-column, --label-map); its columns: {columns_present}"
        )
    for column, finding in columns.items():
        if finding not in FINDINGS:
            raise DataError(f"finding_columns: {finding!r} is not one of the 14 findings")
        if column not in table.columns:
            raise DataError(f"{csv_path}: missing column {column!r} (finding {finding})")
        raw[finding] = table[column]
    return raw, list(columns.values())


def split_labels(table: pd.DataFrame, column: str, separator: str, source: Path) -> list[list[str]]:
    """Each row's findings of a multi-label column (``"Mass|Nodule"``): stripped, blanks dropped;
    a blank cell is an error naming its line."""
    if not separator:
        raise DataError("labels separator: give a character such as '|' (--labels-separator)")
    _refuse_blanks(table, column, source)
    return [[p.strip() for p in str(v).split(separator) if p.strip()] for v in table[column]]


def multi_label_targets(
    table: pd.DataFrame,
    column: str,
    findings: Sequence[str] | None,
    separator: str,
    no_finding: str | None,
    source: Path,
    no_finding_column: bool | None = False,
) -> pd.DataFrame:
    """Targets of a multi-label column: a finding listed is 1.0, one not listed 0.0.

    ``findings`` is the label set (None: the values seen, sorted); a value outside it is an error
    naming the file, column and line. ``no_finding`` is the token meaning none (it may not stand
    beside a finding); ``no_finding_column`` adds it as the last finding (1 where it is given).
    """
    parts = split_labels(table, column, separator, source)
    seen = {p for row in parts for p in row} - {no_finding}
    label_set = sorted(seen) if findings is None else list(findings)
    if not label_set:
        raise DataError(f"{source}: column {column!r}: no finding is listed in any row")
    allowed = set(label_set) | ({no_finding} if no_finding else set())
    for line, row in zip(table["_line"], parts, strict=True):
        unknown = [p for p in row if p not in allowed]
        if unknown:
            raise DataError(
                f"{source}: column {column!r}, line {line}: {unknown[0]!r} is not in the label set "
                f"{label_set}{f' or {no_finding!r}' if no_finding else ''}"
            )
        if no_finding in row and len(row) > 1:
            raise DataError(f"{source}: column {column!r}, line {line}: {no_finding!r} beside a finding")
    if no_finding_column is None:
        no_finding_column = any(no_finding in row for row in parts)
    extra = [no_finding] if no_finding_column and no_finding and no_finding not in label_set else []
    columns = [*label_set, *extra]
    values = [[float(f in set(row)) for f in columns] for row in parts]
    return pd.DataFrame(values, index=table.index, columns=columns, dtype=float)


def _csv_sizes(
    frame: pd.DataFrame, width_column: str, height_column: str, check_files: bool, csv_path: Path
) -> pd.DataFrame:
    """``width`` and ``height`` from their CSV columns when present, else from the image headers."""
    if width_column in frame.columns and height_column in frame.columns:
        frame["width"] = _int_column(frame, width_column, csv_path)
        frame["height"] = _int_column(frame, height_column, csv_path)
    elif check_files:
        frame[["width", "height"]] = _image_sizes(frame, csv_path)
    else:
        frame["width"] = frame["height"] = pd.NA
    return frame


# --------------------------------------------------------------------------- NIH ChestX-ray14

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


# --------------------------------------------------------------------------- Kermany

KERMANY_SPLITS: tuple[str, ...] = ("train", "val", "test")
KERMANY_FINDINGS: tuple[str, ...] = ("Pneumonia", "No Finding")
KERMANY_NAMES: dict[str, re.Pattern] = {  # class folder -> file name without extension
    "NORMAL": re.compile(r"(?P<patient>(?:NORMAL\d*-)?IM-\d+)(?:-\d+)+"),
    "PNEUMONIA": re.compile(r"(?P<patient>person\d+)_(?P<subtype>bacteria|virus)_\d+"),
}
KERMANY_SOURCE = (
    "Kermany et al., Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for "
    "Classification, Mendeley Data v2, https://doi.org/10.17632/rscbjbr9sj.2, CC BY 4.0"
)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")


def check_kermany_root(root: str | os.PathLike) -> Path:
    """``root`` as an absolute path when it holds ``train/`` or ``test/``; else one line saying
    where to download the set and where to unpack it."""
    root = Path(os.path.abspath(root))
    if not any((root / split).is_dir() for split in KERMANY_SPLITS):
        raise DataFileNotFound(
            f"Kermany's chest X-rays not found: {root} has no train/ or test/ folder; download "
            f"ChestXRay2017.zip ({KERMANY_SOURCE}) and unpack it so that {root}/train/NORMAL/ exists"
        )
    return root


def kermany_files(root: Path) -> pd.DataFrame:
    """One row per image under ``root/<split>/<NORMAL|PNEUMONIA>/``: path, split, class folder,
    patient and subtype, sorted by path; a file name that fits no pattern is an error naming it."""
    rows = []
    for split in KERMANY_SPLITS:
        for folder, pattern in KERMANY_NAMES.items():
            directory = root / split / folder
            names = sorted(os.listdir(directory)) if directory.is_dir() else []
            for name in names:
                stem, suffix = os.path.splitext(name)
                if name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES:
                    continue  # .DS_Store and other files that are not images
                match = pattern.fullmatch(stem)
                if match is None:
                    example = "IM-0115-0001.jpeg" if folder == "NORMAL" else "person1_bacteria_1.jpeg"
                    raise DataError(
                        f"{directory / name}: the file name names no patient (a {folder} image is "
                        f"named like {example})"
                    )
                subtype = match.groupdict().get("subtype") or "normal"
                rows.append((str(directory / name), split, folder, match["patient"], subtype))
    if not rows:
        raise DataError(f"{root}: no image in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    return pd.DataFrame(rows, columns=["path", "split", "finding", "subject_id", "subtype"])


def index_from_kermany(root: str | os.PathLike, views: str | None = None) -> pd.DataFrame:
    """Index of Kermany's chest X-rays from the official layout (see the module docs).

    ``views``: None / ``"all"`` keeps every image (the release names no view, so ``view`` is blank).
    Width and height are read from each image's header.
    """
    root = check_kermany_root(root)
    frame = kermany_files(root)
    dicom_ids = _ids_from_paths(frame["path"], root)
    frame = frame.assign(dicom_id=dicom_ids, study_id=dicom_ids, view="")
    frame = _filter_views(frame, views, root)
    sizes = []
    for path in frame["path"]:
        try:
            sizes.append(image_size(path))
        except Exception as error:  # name the file, whatever Pillow raised
            raise DataError(f"{path}: cannot read the image: {error}") from error
    frame[["width", "height"]] = pd.DataFrame(sizes, index=frame.index, dtype="int64")
    mapping = LABEL_MAPS["kermany"]
    labels = pd.DataFrame([mapping[f] for f in frame["finding"]], index=frame.index, dtype=float)
    columns = ["dicom_id", "subject_id", "study_id", "path", "view", "width", "height", "split", "subtype"]
    index = pd.concat([frame[columns], labels[list(KERMANY_FINDINGS)]], axis=1)
    return validate_index(index.reset_index(drop=True), source=str(root))


# ------------------------------------------------------------------ every source by name, the command line

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
