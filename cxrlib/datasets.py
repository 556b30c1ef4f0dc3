"""Every data source (``mimic`` and the phantom, ``chexpert``, ``nih``, ``kermany``, ``csv``) as an index; an
input file's error is one line naming file, column and CSV line. Layouts, label sets, options: docs/data.md::

    python -m cxrlib.datasets --dataset mimic --data-root MIMIC --out index.csv [--views frontal]
    python -m cxrlib.datasets --dataset csv --csv labels.csv --label-map kermany --out index.csv
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .fileio import DataError, DataFileNotFound, read_csv_text
from .index import NATIVE_SIZE_COLUMNS, describe_index, drop_unlabelled_findings, validate_index, write_index
from .labels import BLANK_OPTIONS, FINDINGS, NIH_FINDINGS, POLICIES, apply_policy

SOURCES: tuple[str, ...] = ("mimic", "chexpert", "nih", "kermany", "csv")
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "PA RLD", "AP RLD")
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
NIH_ENTRY_FILES: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_SUBSETS: tuple[str, ...] = ("all", "train_val", "test")  # the lists: train_val_list.txt, test_list.txt
# index_from_csv's built-in label maps (label column value -> {finding: raw label}) and the column each reads.
LABEL_MAPS: dict[str, dict[str, dict[str, float]]] = {
    "kermany": {"PNEUMONIA": {"Pneumonia": 1, "No Finding": 0}, "NORMAL": {"Pneumonia": 0, "No Finding": 1}},
}
LABEL_MAP_COLUMNS: dict[str, str] = {"kermany": "finding"}
KERMANY_SPLITS: tuple[str, ...] = ("train", "val", "test")
KERMANY_NAMES: dict[str, re.Pattern] = {  # class folder -> file name without extension
    "NORMAL": re.compile(r"(?P<patient>(?:NORMAL\d*-)?IM-\d+)(?:-\d+)+"),
    "PNEUMONIA": re.compile(r"(?P<patient>person\d+)_(?P<subtype>bacteria|virus)_\d+"),
}
KERMANY_SOURCE = "Kermany et al., Mendeley Data v2, https://doi.org/10.17632/rscbjbr9sj.2, CC BY 4.0"
_CHEXPERT_PATH = re.compile(r"patient(\d+)[/\\](study\d+)[/\\]([^/\\]+?)\.[^./\\]+$")
_NO_FILES_HINT = "check --data-root, or pass check_files=False (--no-check-files)"


def _read_table(path: Path, required: Iterable[str], flags: Mapping[str, str] | None = None) -> pd.DataFrame:
    # strings, blanks as NaN, each row's CSV line in _line; flags: column -> the option that names it
    if not path.is_file():
        raise DataFileNotFound(f"file not found: {path}")
    frame = read_csv_text(path, dtype=str, keep_default_na=False, na_values=[""])
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        options = [flags[c] for c in missing if c in (flags or {})]
        named = f"; give the CSV's own column name with {', '.join(options)}" if options else ""
        raise DataError(f"{path}: missing column(s) {missing}; its columns are {list(frame.columns)}{named}")
    twice = frame.columns[frame.columns.duplicated()]  # " a" and "a" are one name once stripped
    if len(twice):
        raise DataError(f"{path}: line 1: column {twice[0]!r} appears twice in the header")
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    frame["_line"] = np.arange(len(frame)) + 2
    return frame


def _refuse(frame: pd.DataFrame, bad: pd.Series, column: str, source: Path, why: str) -> None:
    if bad.any():
        row = frame[bad].iloc[0]
        raise DataError(f"{source}: column {column!r}, line {row['_line']}: {row[column]!r} {why}")


def _refuse_blanks(frame: pd.DataFrame, column: str, source: Path) -> None:
    blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
    _refuse(frame, blank, column, source, "is blank")


def _refuse_duplicates(frame: pd.DataFrame, columns: list[str], source: Path) -> None:
    duplicated = frame.duplicated(columns, keep=False)
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        same = frame[(frame[columns] == first[columns]).all(axis=1)]
        key = ", ".join(f"{c} {first[c]!r}" for c in columns)
        raise DataError(f"{source}: {key} is listed more than once (lines {same['_line'].tolist()[:5]})")


def _key_columns(frame: pd.DataFrame, columns: list[str], source: Path, unique: list | None = None) -> None:
    for column in columns:
        _refuse_blanks(frame, column, source)
        frame[column] = frame[column].str.strip()
    _refuse_duplicates(frame, unique or columns, source)


def _int_column(frame: pd.DataFrame, column: str, source: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | (values <= 0) | (values != values.round())
    _refuse(frame, bad, column, source, "is not a positive integer")
    return values.astype("int64")


def _filter_views(frame: pd.DataFrame, views, source: Path, frontal: pd.Series | None = None) -> pd.DataFrame:
    # views: None / "all", "frontal" or names such as "PA,AP"; frontal: rows the source calls frontal
    if views is None or (isinstance(views, str) and views.strip().lower() == "all"):
        return frame
    wanted = {str(v).strip().upper() for v in (views.split(",") if isinstance(views, str) else views)} - {""}
    if not wanted:
        raise DataError("views: give 'all', 'frontal' or view names such as 'PA,AP'")
    if "FRONTAL" in wanted:
        wanted = (wanted - {"FRONTAL"}) | set(FRONTAL_VIEWS)
    keep = frame["view"].str.upper().isin(wanted)
    if frontal is not None and wanted >= set(FRONTAL_VIEWS):
        keep |= frontal
    if not keep.any():
        present = frame["view"].replace("", "(blank)").value_counts().to_dict() or "none"
        raise DataError(f"{source}: no image has a view in {sorted(wanted)}; views present: {present}")
    return frame[keep]


def _refuse_missing_files(frame: pd.DataFrame, source: Path, hint: str) -> None:
    paths = tqdm(frame["path"], desc="checking files", leave=False, disable=len(frame) < 5000)
    exists = np.array([os.path.isfile(p) for p in paths], dtype=bool)
    if not exists.all():
        missing = frame[~exists]
        examples = "; ".join(f"line {n}: {p}" for n, p in missing[["_line", "path"]].head(3).to_numpy())
        raise DataFileNotFound(
            f"{source}: {len(missing)} of {len(frame)} listed images are missing on disk ({examples}); {hint}"
        )


def _image_sizes(frame: pd.DataFrame, source: Path, check_files: bool = True, hint: str = "") -> pd.DataFrame:
    if not check_files:
        return frame.assign(width=pd.NA, height=pd.NA)
    if hint:
        _refuse_missing_files(frame, source, hint)
    sizes, lines = [], frame["_line"] if "_line" in frame else [None] * len(frame)
    paths = tqdm(frame["path"], desc="reading sizes", leave=False, disable=len(frame) < 5000)
    for line, path in zip(lines, paths, strict=True):
        try:
            with Image.open(path) as image:  # the header only
                sizes.append(image.size)
        except Exception as error:  # name the row, whatever Pillow raised
            where = f"line {line}: " if line else ""
            raise DataError(f"{source}: {where}cannot read image {path}: {error}") from error
    sizes = pd.DataFrame(sizes, index=frame.index, columns=["width", "height"], dtype="int64")
    return frame.assign(width=sizes["width"], height=sizes["height"])


def _finish(frame: pd.DataFrame, labels: pd.DataFrame, source: Path, extra: Sequence = ()) -> pd.DataFrame:
    columns = ["dicom_id", "subject_id", "study_id", "path", "view", "width", "height", *extra]
    index = pd.concat([frame[columns], labels.loc[frame.index]], axis=1)
    return validate_index(index.reset_index(drop=True), source=str(source))


def _resolve(paths: pd.Series, root: Path) -> pd.Series:
    # a first component equal to root's name (CheXpert-v1.0/train/... under CheXpert-v1.0) is root itself
    paths = paths.astype(str)
    if not (root / root.name).exists():
        paths = paths.str.replace(rf"^(?:\.[/\\]+)*{re.escape(root.name)}[/\\]+(?=[^/\\])", "", regex=True)
    return paths.map(lambda path: os.path.normpath(os.path.join(root, path)))  # an absolute path stays


def _ids_from_paths(paths: pd.Series, root: Path) -> pd.Series:
    stems = paths.map(lambda p: Path(p).stem)
    if not stems.duplicated().any():
        return stems
    relative = paths.map(lambda p: os.path.splitext(os.path.relpath(p, root))[0])
    return relative.str.replace(r"[/\\]", "__", regex=True).str.lstrip(".")


def _multi_label_targets(
    table: pd.DataFrame, column: str, label_set: Sequence[str] | None, separator: str, no_finding: str | None,
    source: Path, no_finding_column: bool | None = False,
) -> pd.DataFrame:  # fmt: skip
    # a finding listed in a row ("Mass|Nodule") is 1.0, one not listed 0.0; label_set None: the values seen;
    # no_finding means none (never beside a finding), no_finding_column adds it (None: when a row gives it)
    if not separator:
        raise DataError("labels separator: give a character such as '|' (--labels-separator)")
    _refuse_blanks(table, column, source)
    parts = [[p.strip() for p in str(v).split(separator) if p.strip()] for v in table[column]]
    seen = sorted({p for row in parts for p in row} - {no_finding})
    label_set = seen if label_set is None else list(label_set)
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
    extra = no_finding_column and no_finding and no_finding not in label_set
    columns = [*label_set, *([no_finding] if extra else [])]
    values = [[float(f in set(row)) for f in columns] for row in parts]
    return pd.DataFrame(values, index=table.index, columns=columns, dtype=float)


def _first_file(root: Path, names: Sequence[str], holding: str) -> Path:
    for path in (root / name for name in names):
        if path.is_file():
            return path
    raise DataFileNotFound(f"{root}: neither {' nor '.join(names)} found; --data-root must be {holding}")


def _mimic_file(root: Path, name: str) -> Path:
    return _first_file(root, (f"{name}.gz", name), "the MIMIC-CXR-JPG folder that holds the CSVs and files/")


def index_from_mimic(
    root: str | os.PathLike,
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Index of MIMIC-CXR-JPG, a study's labels on each of its images; ``views``: all, frontal, PA,AP ..."""
    root = Path(os.path.abspath(root))
    meta_path, labels_path = _mimic_file(root, MIMIC_METADATA), _mimic_file(root, MIMIC_LABELS)
    meta = _read_table(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"))
    _key_columns(meta, ["dicom_id", "subject_id", "study_id"], meta_path, ["dicom_id"])
    meta["width"] = _int_column(meta, "Columns", meta_path)
    meta["height"] = _int_column(meta, "Rows", meta_path)
    meta["view"] = meta["ViewPosition"].fillna("").str.strip()
    keys = ["subject_id", "study_id"]
    raw = _read_table(labels_path, (*keys, *FINDINGS))
    targets = apply_policy(raw, policy, blank, source=str(labels_path))  # a bad value named by its CSV line
    _key_columns(raw, keys, labels_path)
    frame = meta.merge(pd.concat([raw[keys], targets], axis=1), on=keys, how="left", indicator=True)
    unlabeled = frame["_merge"] == "left_only"
    frame.loc[unlabeled, list(FINDINGS)] = 0.0 if blank == "zero" else np.nan  # all blank
    if unlabeled.any():
        studies = frame.loc[unlabeled, keys].drop_duplicates()
        warnings.warn(
            f"{labels_path}: {len(studies)} studies ({int(unlabeled.sum())} images) have no label row (e.g. "
            f"study {studies['study_id'].iloc[0]}); their labels are taken as blank (blank={blank})",
            stacklevel=2,
        )
    frame = _filter_views(frame, views, meta_path)
    subject, sep = frame["subject_id"], os.sep
    folder = f"{root}{sep}files{sep}p" + subject.str[:2] + f"{sep}p" + subject + f"{sep}s" + frame["study_id"]
    frame = frame.assign(path=folder + sep + frame["dicom_id"] + ".jpg")
    if check_files:
        _refuse_missing_files(frame, meta_path, _NO_FILES_HINT)
    return _finish(frame, frame[list(FINDINGS)], meta_path)


def index_from_chexpert(
    root: str | os.PathLike,
    csv: str | os.PathLike = "train.csv",
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Index of CheXpert from its ``train.csv`` or ``valid.csv`` under ``root`` (``CheXpert-v1.0`` or up)."""
    root = Path(os.path.abspath(root))
    csv_path = root / csv
    table = _read_table(csv_path, ("Path", "Frontal/Lateral", "AP/PA", *FINDINGS))
    labels = apply_policy(table, policy, blank, source=str(csv_path))
    _refuse_blanks(table, "Path", csv_path)
    parts = table["Path"].str.extract(_CHEXPERT_PATH)
    _refuse(table, parts.isna().any(axis=1), "Path", csv_path, "does not end in patientNNNNN/studyN/<image>")
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
    return _finish(_image_sizes(frame, csv_path, check_files, _NO_FILES_HINT), labels, csv_path)


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
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | Iterable[str] | None = None,
    check_files: bool = True,
    labels_column: str | None = None,
    labels_separator: str = "|",
    no_finding: str | None = "No Finding",
    findings: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Index of any CSV with an image path and a patient id per row, labelled by CheXpert-named
    ``finding_columns``, by a ``label_column`` through a ``label_map`` (``{value: {finding: 1 / 0 / -1}}``,
    JSON or a built-in name), or by a multi-label ``labels_column`` (docs/data.md has every option)."""
    csv_path = Path(os.path.abspath(csv))
    root = Path(os.path.abspath(root)) if root is not None else csv_path.parent
    if isinstance(label_map, str) and label_column is None:
        label_column = LABEL_MAP_COLUMNS.get(label_map.strip())
    if (label_map is None) != (label_column is None):
        raise DataError("give both label_column (--label-column) and label_map (--label-map), or neither")
    if sum(given is not None for given in (labels_column, label_column, finding_columns)) > 1:
        raise DataError("give one of finding_columns, label_column with label_map, or labels_column")
    flags = {  # every column the CSV must have, and the option that names it
        path_column: "--path-column", patient_column: "--patient-column", study_column: "--study-column",
        id_column: "--id-column", view_column: "--view-column", labels_column: "--labels-column",
        label_column: "--label-column",
    }  # fmt: skip
    table = _read_table(csv_path, [c for c in flags if c], flags)
    for column in (path_column, patient_column):
        _refuse_blanks(table, column, csv_path)
    if labels_column is not None:
        own = None if findings is None else False  # the values seen: the no-finding token when given
        labels = _multi_label_targets(
            table, labels_column, findings, labels_separator, no_finding, csv_path, own
        )
    else:
        labels = _csv_labels(table, csv_path, label_column, label_map, finding_columns, policy, blank)
    paths = _resolve(table[path_column], root)
    dicom_ids = table[id_column].str.strip() if id_column else _ids_from_paths(paths, root)
    frame = table.assign(
        dicom_id=dicom_ids,
        subject_id=table[patient_column].str.strip(),
        study_id=table[study_column].str.strip() if study_column else dicom_ids,
        view=table[view_column].fillna("").str.strip() if view_column else "",
        path=paths,
    )
    _refuse_duplicates(frame, ["dicom_id"], csv_path)
    frame = _filter_views(frame, views, csv_path)
    if check_files:
        _refuse_missing_files(
            frame, csv_path, "check the paths and --data-root (the CSV's folder by default)"
        )
    if "width" in frame.columns and "height" in frame.columns:  # sizes given: no image is opened
        frame["width"] = _int_column(frame, "width", csv_path)
        frame["height"] = _int_column(frame, "height", csv_path)
    else:
        frame = _image_sizes(frame, csv_path, check_files)
    return _finish(frame, labels, csv_path)


def _csv_labels(
    table, csv_path: Path, label_column, label_map, finding_columns, policy, blank
) -> pd.DataFrame:
    if label_column is not None:
        mapping = _parse_label_map(label_map)
        values = table[label_column].fillna("").str.strip()
        unknown = ~values.isin(list(mapping))
        same = [key for key in mapping if unknown.any() and key.lower() == values[unknown].iloc[0].lower()]
        case = f": it differs from {same[0]!r} only in case" if same else ""
        why = f"is not in the label map (its values: {sorted(mapping)}){case}"
        _refuse(table, unknown, label_column, csv_path, why)
        raw = pd.DataFrame([mapping[v] for v in values], index=table.index, columns=list(FINDINGS))
        given = {f for labels in mapping.values() for f in labels}
        blank = "unknown"  # a finding a value's map leaves out is not known for that value
    else:
        if finding_columns is None:
            finding_columns = [f for f in FINDINGS if f in table.columns]
        mapped = isinstance(finding_columns, Mapping)
        columns = dict(finding_columns) if mapped else {f: f for f in finding_columns}
        if not columns:
            raise DataError(
                f"{csv_path}: no labels: name finding columns (--finding-columns) or a label column and map "
                f"(--label-column, --label-map); its columns: {[c for c in table.columns if c != '_line']}"
            )
        for column, finding in columns.items():
            if finding not in FINDINGS:
                raise DataError(f"finding_columns: {finding!r} is not one of the 14 findings")
            if column not in table.columns:
                raise DataError(f"{csv_path}: missing column {column!r} (finding {finding})")
        raw = pd.DataFrame({f: table[c] for c, f in columns.items()}, columns=list(FINDINGS))
        given = set(columns.values())
    labels = apply_policy(raw, policy, blank, source=str(csv_path))
    labels[[f for f in FINDINGS if f not in given]] = np.nan
    return labels


def _parse_label_map(label_map: str | Mapping) -> dict[str, dict[str, float]]:
    text = label_map.strip() if isinstance(label_map, str) else ""
    if text in LABEL_MAPS:
        label_map = LABEL_MAPS[text]
    elif text:
        try:
            label_map = json.loads(text if text.startswith("{") else Path(text).read_text())
        except (OSError, ValueError) as error:  # a JSONDecodeError is a ValueError
            what = f"not a built-in map {sorted(LABEL_MAPS)}, a JSON object or a JSON file"
            raise DataError(f"label map {text[:200]!r} is {what}: {error}") from None
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


def _nih_entry(root: Path) -> Path:
    names = [n for name in NIH_ENTRY_FILES for n in (name, f"{name}.gz")]
    return _first_file(root, names, "the NIH ChestX-ray14 folder with them and images_001/ .. (or images/)")


def _nih_list(path: Path) -> set[str]:
    if not path.is_file():
        raise DataFileNotFound(f"{path}: not found; NIH's official lists sit beside the metadata CSV")
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines()} - {""}
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def index_from_nih(
    root: str | os.PathLike, subset: str = "all", views: str | None = None, check_files: bool = True
) -> pd.DataFrame:
    """Index of NIH ChestX-ray14 (14 findings, No Finding); ``subset``: all, NIH's train_val or test list."""
    if subset not in NIH_SUBSETS:
        raise DataError(f"unknown NIH subset {subset!r}; choose one of {NIH_SUBSETS}")
    root = Path(os.path.abspath(root))
    entry = _nih_entry(root)
    sizes = ("OriginalImage[Width", "Height]")  # the original size: the PNGs are resized
    table = _read_table(entry, ("Image Index", "Finding Labels", "Patient ID", "View Position", *sizes))
    _refuse_blanks(table, "Patient ID", entry)
    _key_columns(table, ["Image Index"], entry)
    findings, no_finding = NIH_FINDINGS[:-1], NIH_FINDINGS[-1]
    labels = _multi_label_targets(table, "Finding Labels", findings, "|", no_finding, entry, True)
    names = table["Image Index"]
    bad = names.str.contains(r"[/\\]", regex=True) | ~names.str.lower().str.endswith(".png")
    _refuse(table, bad, "Image Index", entry, "is not a PNG file name")
    found = {}  # file name -> path of the PNGs in images_*/images/ and images/
    for folder in [*sorted(root.glob("images_*/images")), root / "images"] if check_files else []:
        for file in os.scandir(folder) if folder.is_dir() else []:
            if file.name.lower().endswith(".png"):
                found.setdefault(file.name, file.path)
    frame = table.assign(
        dicom_id=names.str[:-4],
        subject_id=table["Patient ID"].str.strip(),
        study_id=names.str[:-4],  # one image per visit (Follow-up #) in NIH's release
        view=table["View Position"].fillna("").str.strip().str.upper(),
        native_width=_int_column(table, sizes[0], entry),
        native_height=_int_column(table, sizes[1], entry),
        path=[found.get(name, str(root / "images" / name)) for name in names],
    )
    if subset != "all":
        frame = frame[frame["Image Index"].isin(_nih_list(listed := root / f"{subset}_list.txt"))]
        if frame.empty:
            raise DataError(f"{listed}: names no image of {entry.name}")
    frame = _filter_views(frame, views, entry)
    hint = "check --data-root (images_*/images/ or images/ under it)"
    return _finish(_image_sizes(frame, entry, check_files, hint), labels, entry, NATIVE_SIZE_COLUMNS)


def _kermany_root(root: str | os.PathLike) -> Path:
    root = Path(os.path.abspath(root))
    if not any((root / split).is_dir() for split in KERMANY_SPLITS):
        raise DataFileNotFound(
            f"Kermany's chest X-rays not found: {root} has no train/ or test/ folder; download "
            f"ChestXRay2017.zip ({KERMANY_SOURCE}) and unpack it so that {root}/train/NORMAL/ exists"
        )
    return root


def index_from_kermany(root: str | os.PathLike, views: str | None = None) -> pd.DataFrame:
    """Index of Kermany's ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/`` with ``split``, ``subtype``."""
    root = _kermany_root(root)
    rows = []
    for split in KERMANY_SPLITS:
        for finding, pattern in KERMANY_NAMES.items():
            folder = root / split / finding
            for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
                stem, suffix = os.path.splitext(name)
                if name.startswith(".") or suffix.lower() not in (".jpeg", ".jpg", ".png"):
                    continue  # .DS_Store and other files that are not images
                match = pattern.fullmatch(stem)
                if match is None:
                    example = "IM-0115-0001.jpeg" if finding == "NORMAL" else "person1_bacteria_1.jpeg"
                    raise DataError(f"{folder / name}: the file name names no patient (named like {example})")
                subtype = match.groupdict().get("subtype") or "normal"
                rows.append((str(folder / name), split, finding, match["patient"], subtype))
    if not rows:
        raise DataError(f"{root}: no image in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    frame = pd.DataFrame(rows, columns=["path", "split", "finding", "subject_id", "subtype"])
    dicom_ids = _ids_from_paths(frame["path"], root)
    frame = _filter_views(frame.assign(dicom_id=dicom_ids, study_id=dicom_ids, view=""), views, root)
    mapping = LABEL_MAPS["kermany"]
    labels = pd.DataFrame([mapping[f] for f in frame["finding"]], index=frame.index, dtype=float)
    return _finish(_image_sizes(frame, root), labels[["Pneumonia", "No Finding"]], root, ("split", "subtype"))


def check_data_root(source: str, root: str | os.PathLike, csv: str | os.PathLike | None = None) -> None:
    """Raise :class:`~cxrlib.fileio.DataFileNotFound` naming the first file a data root lacks (cheap)."""
    root = Path(os.path.abspath(root))
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if source == "kermany":  # a missing root too: where to download the set and where to unpack it
        _kermany_root(root)
    elif not root.is_dir():
        raise DataFileNotFound(f"data root not found: {root} (data source {source})")
    elif source == "nih":
        _nih_entry(root)
    elif source == "mimic":
        for name in (MIMIC_METADATA, MIMIC_LABELS):
            _mimic_file(root, name)
    elif csv is None and source == "csv":
        raise DataError("a csv data source needs the name of its label file (data.csv, --csv)")
    elif not (path := root / (csv or "train.csv")).is_file():
        raise DataFileNotFound(f"{root}: label file {path.name} not found at {path} (data source {source})")


def index_from_source(
    source: str,
    root: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    csv_options: dict | None = None,
    policy: str = "u-zeros",
    blank: str = "zero",
    views: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """The index of a data source by name (``csv``: the label file, ``csv_options``: the reader's own)."""
    common = {"views": views, "check_files": check_files}
    options = dict(csv_options or {})
    if source in ("phantom", "mimic"):
        index = index_from_mimic(root, policy, blank, **common, **options)
    elif source == "chexpert":
        index = index_from_chexpert(root, csv or "train.csv", policy, blank, **common)
    elif source == "nih":
        index = index_from_nih(root, **{**common, **options})  # never uncertain: no policy
    elif source == "kermany":
        index = index_from_kermany(root, views)
    elif source == "csv":
        if not csv:
            raise DataError("data.csv must name the label file of a csv data source")
        options = {"policy": policy, "blank": blank, **common, **options}
        index = index_from_csv(Path(root or "") / csv, root, **options)
    else:
        raise DataError(f"unknown data source {source!r}")
    return drop_unlabelled_findings(index, f"{source} data in {root or Path(csv).parent}")


def _names(text: str) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", choices=SOURCES, required=True, help="source format")
    add("--data-root", type=Path, help="dataset folder (csv: default the CSV's folder)")
    add("--out", type=Path, required=True, help="index.csv to write")
    add("--policy", choices=POLICIES, default="u-zeros", help="uncertain (-1) labels (default u-zeros)")
    add("--blank", choices=BLANK_OPTIONS, default="zero", help="blank labels (default zero)")
    add("--views", default="all", help="all (default), frontal, or names such as PA,AP")
    add("--nih-subset", choices=NIH_SUBSETS, default="all", help="nih: all, or one of NIH's official lists")
    add("--csv", help="chexpert: CSV in the data root (default train.csv); csv: the CSV file")
    add("--no-check-files", action="store_true", help="do not check that the images exist")
    csv = parser.add_argument_group("csv options (index_from_csv's)").add_argument
    csv("--path-column", default="path", help="image path column (default path)")
    csv("--patient-column", default="patient_id", help="patient id column (default patient_id)")
    csv("--study-column", help="study id column (default: one study per image)")
    csv("--id-column", help="image id column (default: the file name)")
    csv("--view-column", help="view column")
    csv("--label-column", help="the column --label-map reads")
    csv("--label-map", help=f"{'|'.join(LABEL_MAPS)}, a JSON object or a JSON file")
    csv("--finding-columns", type=_names, help="comma-separated finding columns (default: all present)")
    csv("--labels-column", help="a multi-label column (findings joined by --labels-separator)")
    csv("--labels-separator", default="|", help="between findings (default |)")
    csv("--no-finding-token", dest="no_finding", default="No Finding", help="the value meaning none")
    csv("--findings", type=_names, help="the label set, comma-separated (default: the values seen)")
    args = parser.parse_args(argv)
    source, root = args.dataset, args.data_root
    if (args.csv if source == "csv" else root) is None:
        parser.error(f"--dataset {source} needs {'--csv FILE' if source == 'csv' else '--data-root'}")
    options = {"subset": args.nih_subset} if source == "nih" else {}
    if source == "csv":  # the CSV relative to here, not to the data root (chexpert's is in the data root)
        reader = inspect.signature(index_from_csv).parameters
        options = {name: value for name, value in vars(args).items() if name in reader and name != "csv"}
        args.csv = os.path.abspath(args.csv)
    try:
        common = (args.policy, args.blank, args.views, not args.no_check_files)
        index = index_from_source(source, root, args.csv, options, *common)
        write_index(index, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}\n{describe_index(index)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
