"""Kermany's chest X-rays in their official layout: the reader, its errors, the official split as
the test fold, and the same rows as the CSV route on the real images."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from kermany_layout import TINY_TREE, arrange_csv_copy, write_tiny_tree

from cxrlib import pipeline, splits, study
from cxrlib.datasets import check_data_root, index_from_csv, index_from_kermany, main
from cxrlib.index import index_findings, read_index, write_index

CSV_COPY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-pediatric-cxr"
NO_REAL_IMAGES = (
    "no real Kermany images: set CXR_KERMANY_ROOT to an unpacked chest_xray/ folder "
    f"(or put this project's CSV copy at ../shared/data/{CSV_COPY.name})"
)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_tree(tmp_path_factory.mktemp("kermany") / "chest_xray")


@pytest.fixture(scope="module")
def real_root(tmp_path_factory) -> Path:
    """The real images in the official layout: CXR_KERMANY_ROOT, else the CSV copy arranged so."""
    if os.environ.get("CXR_KERMANY_ROOT"):
        return Path(os.environ["CXR_KERMANY_ROOT"])
    if not (CSV_COPY / "labels.csv").is_file():
        pytest.skip(NO_REAL_IMAGES)
    return arrange_csv_copy(CSV_COPY, tmp_path_factory.mktemp("arranged") / "chest_xray")


def test_the_reader_indexes_the_official_layout(tiny_tree, tmp_path):
    index = index_from_kermany(tiny_tree)
    expected = pd.DataFrame(
        [
            (str(tiny_tree / path), name.split(".")[0], patient, path.split("/")[0], subtype, w, h)
            for path, (patient, subtype, _, w, h) in TINY_TREE.items()
            for name in [path.rsplit("/", 1)[1]]
        ],
        columns=["path", "dicom_id", "subject_id", "split", "subtype", "width", "height"],
    )
    expected["Pneumonia"] = expected["path"].str.contains("/PNEUMONIA/").astype(float)
    expected["No Finding"] = 1.0 - expected["Pneumonia"]
    columns = list(expected.columns)
    got = index[columns].sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.sort_values("path").reset_index(drop=True), check_dtype=False)
    assert index_findings(index) == ["Pneumonia", "No Finding"]  # the .DS_Store is not an image
    assert (index["view"] == "").all() and (index["study_id"] == index["dicom_id"]).all()
    back = read_index(write_index(index, tmp_path / "index.csv"))  # the notes survive a round trip
    pd.testing.assert_frame_equal(back[columns], index[columns], check_dtype=False)


@pytest.mark.parametrize(
    "name",
    ["NORMAL/scan-0001.jpeg", "PNEUMONIA/person2_fungus_1.jpeg", "PNEUMONIA/IM-0001-0001.jpeg"],
)
def test_a_file_name_without_a_patient_is_one_line_naming_it(tiny_tree, tmp_path, name):
    root = Path(shutil.copytree(tiny_tree, tmp_path / "chest_xray"))
    shutil.copy(root / "test/NORMAL/IM-0001-0001.jpeg", root / "val" / name)
    with pytest.raises(ValueError, match=re.escape(f"{root / 'val' / name}: the file name names no patient")):
        index_from_kermany(root)


def test_a_missing_root_says_where_to_download_and_unpack(tmp_path, capsys):
    nowhere = tmp_path / "data" / "chest_xray"
    for call in (lambda: index_from_kermany(nowhere), lambda: check_data_root("kermany", nowhere)):
        with pytest.raises(FileNotFoundError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and "https://doi.org/10.17632/rscbjbr9sj.2" in message
        assert f"unpack it so that {nowhere}/train/NORMAL/ exists" in message
    run = ["--run-dir", str(tmp_path / "run"), "--figures-dir", str(tmp_path / "figures")]
    assert pipeline.main(["--preset", "kermany", "--data-root", str(nowhere), *run]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_the_official_test_images_are_the_test_fold_and_never_trained_on(tiny_tree):
    index = index_from_kermany(tiny_tree)
    with pytest.warns(UserWarning, match=r"1 patients \(e.g. IM-0115\) .*their 1 other images are tested"):
        folds = splits.official_folds(index, seed=0)
    assert splits.num_folds(folds) == 1
    role = folds.set_index("dicom_id")["role_0"]
    assert (role[index.loc[index["split"] == "test", "dicom_id"]] == "test").all()
    assert role["IM-0115-0001"] == "test"  # the official split's only patient on both sides
    assert set(role[role != "test"].index) == set(index.loc[index["subject_id"] != "IM-0115"].query(
        "split != 'test'")["dicom_id"])  # fmt: skip
    assert set(role) == {"train", "val", "test"}
    splits.check_folds(folds, index)
    with pytest.raises(ValueError, match="no 'split' column"):
        splits.official_folds(index.drop(columns="split"))


@pytest.mark.parametrize("split", ["official", "patients"])
def test_the_kermany_preset_reads_the_layout_and_makes_the_chosen_folds(tiny_tree, tmp_path, split):
    args = pipeline.get_args_parser().parse_args(
        ["--preset", "kermany", "--data-root", str(tiny_tree), "--kermany-split", split]
    )
    preset = pipeline.resolve_run(
        args.preset, data_root=args.data_root, run_dir=str(tmp_path / "run"), fold_split=args.fold_split
    ).preset
    if split == "official":
        with pytest.warns(UserWarning, match="IM-0115"):
            index, folds = study.prepare_data(preset)
    else:
        index, folds = study.prepare_data(preset)
    assert index_findings(index) == ["Pneumonia", "No Finding"] and len(index) == len(TINY_TREE)
    assert splits.num_folds(folds) == (1 if split == "official" else 5) == preset.fold_count
    study.load_data(preset)  # read back and checked against the index


def test_the_command_line_writes_the_index(tiny_tree, tmp_path, capsys):
    out = tmp_path / "index.csv"
    assert main(["--dataset", "kermany", "--data-root", str(tiny_tree), "--out", str(out)]) == 0
    assert (
        len(read_index(out)) == len(TINY_TREE)
        and "findings (2): Pneumonia, No Finding" in capsys.readouterr().out
    )


@pytest.mark.skipif(
    not (CSV_COPY / "labels.csv").is_file(), reason=f"no CSV copy at ../shared/data/{CSV_COPY.name}"
)
def test_the_csv_copy_arranged_as_the_release_gives_the_csv_routes_rows(tmp_path):
    root = arrange_csv_copy(CSV_COPY, tmp_path / "chest_xray")
    layout = index_from_kermany(root)
    csv = index_from_csv(CSV_COPY / "labels.csv", label_map="kermany")
    table = pd.read_csv(CSV_COPY / "labels.csv", dtype=str)
    csv["subtype"] = table["subtype"].to_numpy()  # index_from_csv keeps the CSV's row order
    layout["path"] = layout["path"].map(os.path.realpath)
    columns = ["path", "subject_id", "Pneumonia", "No Finding", "subtype", "width", "height"]
    rows = [frame[columns].sort_values("path").reset_index(drop=True) for frame in (layout, csv)]
    pd.testing.assert_frame_equal(*rows, check_dtype=False)
    assert len(layout) == 777 and set(layout["split"]) == {"train", "val", "test"}


def test_the_real_images_in_the_official_layout(real_root):
    index = index_from_kermany(real_root)
    assert set(index["subtype"]) == {"normal", "bacteria", "virus"}
    assert (index["Pneumonia"] + index["No Finding"] == 1).all()
    folds = splits.official_folds(index)
    roles = folds.groupby("subject_id")["role_0"].nunique()
    assert (roles == 1).all()  # no patient on two sides
    official_test = index.loc[index["split"] == "test", "dicom_id"]
    assert (folds.set_index("dicom_id").loc[official_test, "role_0"] == "test").all()
