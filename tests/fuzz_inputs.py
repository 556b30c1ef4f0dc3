"""Malformed input files for every reader, drawn by hypothesis, and the check that each one ends
in a valid index or in one clear :class:`~cxrlib.fileio.DataError`.

Each reader has a small valid base (:data:`READERS`): the files of a data root as tables of
strings. A case draws a few mutations of one file (a column dropped or renamed, cells replaced by
wrong types, stray quotes, separators or values outside the label set, rows duplicated, paths to
missing or non-image files) and byte-level damage (an empty file, a header only, a cut, bytes that
are not UTF-8). :func:`run_case` writes it under a fresh root, calls the reader and classifies the
outcome; anything other than a valid index or a one-line ``DataError`` naming a file of the root
fails. ``tests/test_fuzz_readers.py`` runs a few dozen cases per reader, and
``benchmarks/fuzz_readers.py`` a few thousand with the counts per reader.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from cxrlib.datasets import index_from_chexpert, index_from_csv, index_from_mimic, index_from_nih
from cxrlib.fileio import DataError
from cxrlib.index import read_index, validate_index, write_index
from cxrlib.labels import FINDINGS
from cxrlib.splits import make_folds, read_folds

Table = list[list[str]]  # header then rows, every cell a string

CELLS = st.one_of(
    st.sampled_from(
        ["", "1", "0", "-1", "2", "1.0", "nan", "abc", "1e30", "-5", " 1 ", '"', 'a"b', "a,b", "x\ny"]
        + ["No Finding", "Mass|Nodule", "Effusion|", "|", "PA", "LATERAL", "00000001_000.png", "\x00"]
    ),
    st.text(max_size=6),
)


@dataclass
class Reader:
    """A reader under test: its base files and how to call it on a root."""

    name: str
    base: Callable[[Path], dict[str, Table]]  # shared image folder -> {file name: table}
    call: Callable[[Path, Path], object]  # (root, shared folder) -> an index or folds
    links: tuple[str, ...] = ()  # folders of the shared image folder linked into each root


def shared_images(folder: Path) -> Path:
    """Tiny images every case links to, and a file that is not an image."""
    rng = np.random.default_rng(0)
    for k in range(4):
        pixels = rng.integers(0, 255, (8 + k, 10), dtype=np.uint8)
        for sub, name in (
            (f"files/p10/p1000000{k}/s5000000{k}", f"d{k}.jpg"),
            (f"train/patient0000{k}/study1", "view1_frontal.jpg"),
            ("images", f"0000000{k}_000.png"),
        ):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / sub / name)
    (folder / "images" / "not_an_image.png").write_text("not an image")
    return folder


def _mimic_base(_: Path) -> dict[str, Table]:
    meta = [["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"]]
    labels = [["subject_id", "study_id", *FINDINGS]]
    for k in range(4):
        meta.append([f"d{k}", f"1000000{k}", f"5000000{k}", "PA", "10", f"{8 + k}"])
        labels.append([f"1000000{k}", f"5000000{k}", *["1", "0", "-1", ""] * 3, "1", "0"])
    return {"mimic-cxr-2.0.0-metadata.csv": meta, "mimic-cxr-2.0.0-chexpert.csv": labels}


def _chexpert_base(_: Path) -> dict[str, Table]:
    table = [["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]]
    for k in range(4):
        path = f"train/patient0000{k}/study1/view1_frontal.jpg"
        table.append([path, "Male", "50", "Frontal", "PA", *["1", "0", "-1", ""] * 3, "0", "1"])
    return {"train.csv": table}


def _nih_base(_: Path) -> dict[str, Table]:
    table = [
        ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender"]
        + ["View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    ]
    findings = ["No Finding", "Effusion|Mass", "Hernia", "Atelectasis|Cardiomegaly|Nodule"]
    for k in range(4):
        table.append([f"0000000{k}_000.png", findings[k], "0", str(k + 1), "40", "M", "PA"])
        table[-1] += [str(2000 + k), "2500", "0.143", "0.143"]
    return {"Data_Entry_2017_v2020.csv": table}


def _csv_base(shared: Path) -> dict[str, Table]:
    table = [["path", "patient_id", "Finding Labels", "Cardiomegaly", "Edema"]]
    labels = ["No Finding", "Nodule|Tuberculosis", "Tuberculosis", "Nodule"]
    for k in range(4):
        path = str(shared / "images" / f"0000000{k}_000.png")
        table.append([path, f"p{k // 2}", labels[k], ["1", "0", "-1", ""][k], "0"])
    return {"labels.csv": table}


def _index_base(shared: Path) -> dict[str, Table]:
    header = ["dicom_id", "subject_id", "study_id", "path", "view", "width", "height", "Nodule", "Mass"]
    rows = [[f"d{k}", f"s{k // 2}", f"t{k}", f"/x/{k}.png", "PA", "10", "12", "1", ""] for k in range(4)]
    return {"index.csv": [header, *rows]}


def _folds_base(_: Path) -> dict[str, Table]:
    folds = make_folds(_folds_index(), k=2, seed=0)
    return {"folds.csv": [list(folds.columns), *folds.astype(str).values.tolist()]}


def _folds_index():
    base = _index_base(Path("."))["index.csv"]
    rows = [[f"d{k}", f"s{k}", f"t{k}", f"/x/{k}.png", "PA", "10", "12", "1", "0"] for k in range(8)]
    import pandas as pd

    return validate_index(pd.DataFrame(rows, columns=base[0]))


def _call_csv(root: Path, _: Path):
    if (root / "mode").read_text() == "multi":
        return index_from_csv(root / "labels.csv", labels_column="Finding Labels", no_finding="No Finding")
    return index_from_csv(root / "labels.csv", finding_columns=["Cardiomegaly", "Edema"])


READERS: dict[str, Reader] = {
    "mimic": Reader("mimic", _mimic_base, lambda root, _: index_from_mimic(root), ("files",)),
    "chexpert": Reader("chexpert", _chexpert_base, lambda root, _: index_from_chexpert(root), ("train",)),
    "nih": Reader("nih", _nih_base, lambda root, _: index_from_nih(root), ("images",)),
    "csv": Reader("csv", _csv_base, _call_csv),
    "index": Reader("index", _index_base, lambda root, _: read_index(root / "index.csv")),
    "folds": Reader("folds", _folds_base, lambda root, _: read_folds(root / "folds.csv", _folds_index())),
}


MUTATIONS = ("drop", "rename", "cell", "cell", "duplicate", "path", "extra", "ragged", "none")


@st.composite
def mutated_table(draw, table: Table, shared: Path) -> Table:
    """``table`` with a few structural and cell mutations."""
    table = [list(row) for row in table]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["drop", "rename", "cell", "cell", "duplicate", "path", "extra", "ragged", "none"]
            )
        )
        column = draw(st.integers(0, len(table[0]) - 1)) if table[0] else 0
        row = draw(st.integers(1, max(1, len(table) - 1)))
        if kind == "drop" and len(table[0]) > 1:
            table = [r[:column] + r[column + 1 :] for r in table]
        elif kind == "rename" and table[0]:
            table[0][column] = draw(
                st.sampled_from(["", table[0][column].lower(), "x", " " + table[0][column]])
            )
        elif kind == "cell" and row < len(table) and column < len(table[row]):
            table[row][column] = draw(CELLS)
        elif kind == "duplicate" and len(table) > 1:
            table.append(list(table[row if row < len(table) else 1]))
        elif kind == "path" and row < len(table) and column < len(table[row]):
            table[row][column] = draw(
                st.sampled_from([str(shared / "images" / "not_an_image.png"), "/nowhere/x.png", "images"])
            )
        elif kind == "extra":
            table[0].append(draw(st.sampled_from(["Tuberculosis", "", "dicom_id", "Unnamed: 3"])))
            for r in table[1:]:
                r.append(draw(CELLS))
        elif kind == "ragged" and row < len(table):
            table[row] = table[row][: draw(st.integers(0, len(table[row])))]
    return table


def to_bytes(table: Table) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    return buffer.getvalue().encode("utf-8")


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """Byte-level damage to a file, or none."""
    kind = draw(st.sampled_from(["none", "none", "none", "empty", "header", "cut", "latin1", "quote", "bom"]))
    if kind == "empty":
        return b""
    if kind == "header":
        return data.split(b"\n", 1)[0] + b"\n"
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "cut":
        return data[:at]
    if kind == "latin1":
        return data[:at] + b"\xff\xfe\xe9" + data[at:]
    if kind == "quote":
        return data[:at] + b'"' + data[at:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    return data


@st.composite
def case(draw, reader: Reader, shared: Path) -> dict[str, bytes]:
    """The files of one case: the reader's base with one file mutated and maybe damaged (or a
    file of the base left out)."""
    files = {name: to_bytes(table) for name, table in reader.base(shared).items()}
    name = draw(st.sampled_from(sorted(files)))
    if draw(st.integers(0, 19)) == 0:
        del files[name]  # a file the reader needs is not there
        return files
    table = draw(mutated_table(reader.base(shared)[name], shared))
    files[name] = draw(damaged_bytes(to_bytes(table)))
    return files


def run_case(reader: Reader, files: dict[str, bytes], shared: Path, mode: str = "multi") -> str:
    """Write the case under a fresh root and call the reader: ``"index"`` for a valid result,
    ``"error"`` for a one-line ``DataError`` naming a file or folder of the root. Anything else
    raises ``AssertionError`` (or escapes, which the test reports)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for link in reader.links:
            os.symlink(shared / link, root / link)
        for name, data in files.items():
            (root / name).write_bytes(data)
        (root / "mode").write_text(mode)
        try:
            result = reader.call(root, shared)
        except DataError as error:
            message = str(error)
            assert "\n" not in message and message.strip(), f"not one line: {message!r}"
            assert str(root) in message, f"names no file: {message!r}"
            return "error"
        if reader.name != "folds":
            out = write_index(result, root / "out" / "index.csv")
            assert list(read_index(out).columns) == list(validate_index(result).columns)
        return "index"


OUTCOMES: dict[str, Counter] = {name: Counter() for name in READERS}
