"""NIH ChestX-ray14 in its official layout (a copy written from the phantom), and multi-label CSV columns."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nih_layout import write_nih_layout

from cxrlib import plots
from cxrlib.datasets import index_from_csv, index_from_nih, main
from cxrlib.fileio import DataError
from cxrlib.index import index_findings, read_index
from cxrlib.labels import NIH_FINDINGS
from cxrlib.phantom import ensure_phantom


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih")
    ensure_phantom(root / "phantom", 14, seed=3, max_size=96, prevalence="balanced")
    return write_nih_layout(root / "phantom", root / "nih", stored_size=48, images_per_folder=8)


@pytest.fixture
def nih_copy(nih_root, tmp_path) -> Path:
    return Path(shutil.copytree(nih_root, tmp_path / "nih"))


def entry(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "Data_Entry_2017_v2020.csv", dtype=str)


def test_every_image_is_indexed_with_the_findings_the_column_lists(nih_root):
    index = index_from_nih(nih_root)
    table = entry(nih_root)
    assert len(index) == len(table) == len(list(nih_root.glob("images_*/images/*.png")))
    assert index_findings(index) == list(NIH_FINDINGS)
    by_id = index.set_index("dicom_id")
    for name, labels in zip(table["Image Index"], table["Finding Labels"], strict=True):
        listed = set(labels.split("|"))
        row = by_id.loc[name[:-4]]
        assert {f for f in NIH_FINDINGS if row[f] == 1.0} == listed
    assert by_id[list(NIH_FINDINGS)].notna().all().all()  # NIH's labels are never unknown
    assert table["Finding Labels"].str.contains("|", regex=False).any()  # some rows list several
    assert index["Effusion"].sum() > 0 and index["Pleural_Thickening"].sum() > 0  # the phantom's, renamed


def test_native_size_comes_from_the_metadata_and_the_stored_size_from_the_file(nih_root):
    index = index_from_nih(nih_root)
    table = entry(nih_root).set_index("Image Index")
    assert (index["width"] == 48).all() and (index["height"] == 48).all()
    native = table.loc[index["dicom_id"] + ".png", ["OriginalImage[Width", "Height]"]].astype(int)
    assert (index["native_width"].to_numpy() == native.iloc[:, 0].to_numpy()).all()
    assert (index["native_height"].to_numpy() == native.iloc[:, 1].to_numpy()).all()
    assert plots.native_size_columns(index) == ["native_width", "native_height"]
    fig = plots.fig3_image_sizes(index)
    scatter = [
        c.get_offsets() for ax in fig.axes for c in ax.collections if len(c.get_offsets()) == len(index)
    ]
    points = np.asarray(scatter[0])
    assert set(map(tuple, points.astype(int))) == set(zip(native.iloc[:, 0], native.iloc[:, 1], strict=True))


def test_official_lists_select_images_and_keep_test_patients_out(nih_root):
    train_val, test = index_from_nih(nih_root, "train_val"), index_from_nih(nih_root, "test")
    assert len(train_val) + len(test) == len(index_from_nih(nih_root))
    assert not set(train_val["subject_id"]) & set(test["subject_id"])


def test_command_line_writes_the_index_with_native_sizes(nih_root, tmp_path, capsys):
    out = tmp_path / "index.csv"
    with pytest.warns(UserWarning, match=r"left out of the label set.*Mass.*\(only negative labels\)"):
        assert main(["--dataset", "nih", "--data-root", str(nih_root), "--out", str(out)]) == 0
    index, full = read_index(out), index_from_nih(nih_root)
    assert index_findings(index) == [f for f in NIH_FINDINGS if full[f].nunique() == 2]  # the phantom's
    assert {"native_width", "native_height"} <= set(index.columns)
    assert "Pleural_Thickening" in capsys.readouterr().out


def test_older_file_name_and_one_images_folder(nih_copy):
    (nih_copy / "Data_Entry_2017_v2020.csv").rename(nih_copy / "Data_Entry_2017.csv")
    (nih_copy / "images").mkdir()
    for png in nih_copy.glob("images_*/images/*.png"):
        png.rename(nih_copy / "images" / png.name)
    index = index_from_nih(nih_copy)
    assert index["path"].str.contains("/images/").all() and len(index) == len(entry_of(nih_copy))


def entry_of(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "Data_Entry_2017.csv")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.assign(**{"Finding Labels": "Effusion|Tuberculosis"}), "'Tuberculosis' is not in"),
        (lambda t: t.assign(**{"Finding Labels": "No Finding|Mass"}), "beside a finding"),
        (lambda t: t.assign(**{"Height]": "tall"}), "column 'Height]', line 2"),
        (lambda t: t.drop(columns=["Patient ID"]), "missing column"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "listed more than once"),
    ],
)
def test_bad_metadata_is_one_line_naming_file_column_and_line(nih_copy, change, message):
    path = nih_copy / "Data_Entry_2017_v2020.csv"
    change(entry(nih_copy)).to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as error:
        index_from_nih(nih_copy)
    assert "\n" not in str(error.value) and "Data_Entry_2017_v2020.csv" in str(error.value)


def test_csv_multi_label_column_takes_its_label_set_from_the_values(tmp_path):
    csv = tmp_path / "export.csv"
    pd.DataFrame(
        {
            "file": ["a.png", "b.png", "c.png", "d.png"],
            "patient": ["p1", "p1", "p2", "p3"],
            "labels": ["Nodule;Tuberculosis", "none", "Tuberculosis", "Nodule"],
            "width": 10,
            "height": 12,
        }
    ).to_csv(csv, index=False)
    options = {"path_column": "file", "patient_column": "patient", "check_files": False}
    index = index_from_csv(csv, labels_column="labels", labels_separator=";", no_finding="none", **options)
    assert index_findings(index) == ["Nodule", "Tuberculosis", "none"]
    assert index["Nodule"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert index["Tuberculosis"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert index["none"].tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(DataError, match=r"line 2: 'Nodule' is not in the label set \['Tuberculosis'\]"):
        index_from_csv(
            csv, labels_column="labels", labels_separator=";", no_finding="none", findings=["Tuberculosis"],
            **options,
        )  # fmt: skip
    three = index_from_csv(
        csv, labels_column="labels", labels_separator=";", no_finding="none",
        findings=["Tuberculosis", "Nodule", "Mass"], **options,
    )  # fmt: skip
    assert index_findings(three) == ["Tuberculosis", "Nodule", "Mass"]
    assert three["Mass"].sum() == 0


def test_csv_multi_label_command_line(tmp_path, capsys):
    csv = tmp_path / "export.csv"
    pd.DataFrame(
        {
            "path": ["a.png", "b.png"],
            "patient_id": ["p1", "p2"],
            "Finding Labels": ["Mass|Nodule", "No Finding"],
        }
    ).assign(width=8, height=8).to_csv(csv, index=False)
    out = tmp_path / "index.csv"
    argv = ["--dataset", "csv", "--csv", str(csv), "--labels-column", "Finding Labels", "--out", str(out)]
    assert main([*argv, "--no-check-files"]) == 0
    assert index_findings(read_index(out)) == ["Mass", "Nodule", "No Finding"]
    assert "findings (3): Mass, Nodule, No Finding" in capsys.readouterr().out


def test_the_gzipped_metadata_file_is_read(nih_copy, tmp_path):
    entry = nih_copy / "Data_Entry_2017_v2020.csv"
    expected = index_from_nih(nih_copy)
    with gzip.open(f"{entry}.gz", "wb") as packed:
        packed.write(entry.read_bytes())
    entry.unlink()
    pd.testing.assert_frame_equal(index_from_nih(nih_copy), expected)
    out = tmp_path / "index.csv"
    assert main(["--dataset", "nih", "--data-root", str(nih_copy), "--out", str(out)]) == 0
