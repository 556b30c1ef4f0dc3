"""Index builders (MIMIC-CXR-JPG, CheXpert, any CSV), their errors, the CLI and CXRDataset."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib.cache import CXRDataset, ImageReadError, collate_skip_none
from cxrlib.datasets import index_from_chexpert, index_from_csv, index_from_mimic, main
from cxrlib.index import BASE_COLUMNS, index_findings, read_index, summarize_index
from cxrlib.labels import FINDINGS

KERMANY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-pediatric-cxr"


def expected_label(raw: str, policy: str, blank: str) -> float:
    """The policy table of cxrlib.labels, written out by hand."""
    if raw == "1.0":
        return 1.0
    if raw == "0.0":
        return 0.0
    if raw == "-1.0":
        return {"u-zeros": 0.0, "u-ones": 1.0, "u-ignore": math.nan}[policy]
    return 0.0 if blank == "zero" else math.nan


def expected_matrix(fake, index, policy, blank) -> np.ndarray:
    by_study = fake.labels.set_index("study_id")
    return np.array(
        [
            [expected_label(by_study.at[study, f], policy, blank) for f in FINDINGS]
            for study in index["study_id"]
        ]
    )


def rewrite_gz(path: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(path, index=False, compression="gzip")


# --------------------------------------------------------------------------- MIMIC


def test_mimic_index_gives_each_image_its_study_labels(fake_mimic):
    index = index_from_mimic(fake_mimic.root)
    assert list(index.columns) == [*BASE_COLUMNS, *FINDINGS]
    assert index["dicom_id"].tolist() == fake_mimic.metadata["dicom_id"].tolist()
    meta = fake_mimic.metadata.set_index("dicom_id")
    assert (index["width"].to_numpy() == meta.loc[index["dicom_id"], "Columns"].to_numpy()).all()
    assert (index["height"].to_numpy() == meta.loc[index["dicom_id"], "Rows"].to_numpy()).all()
    assert index["view"].tolist() == fake_mimic.metadata["ViewPosition"].fillna("").tolist()
    for dicom_id, path in zip(index["dicom_id"], index["path"], strict=True):
        assert Path(path).is_absolute() and Path(path) == fake_mimic.image_path(dicom_id)
    np.testing.assert_array_equal(
        index[list(FINDINGS)].to_numpy(), expected_matrix(fake_mimic, index, "u-zeros", "zero")
    )
    studies_with_two_images = index.groupby("study_id").filter(lambda g: len(g) > 1)
    assert (studies_with_two_images.groupby("study_id")[list(FINDINGS)].nunique() <= 1).all().all()


@pytest.mark.parametrize("policy", ["u-zeros", "u-ones", "u-ignore"])
@pytest.mark.parametrize("blank", ["zero", "unknown"])
def test_each_label_policy_flows_through_the_mimic_index(fake_mimic, policy, blank):
    index = index_from_mimic(fake_mimic.root, policy=policy, blank=blank)
    np.testing.assert_array_equal(
        index[list(FINDINGS)].to_numpy(), expected_matrix(fake_mimic, index, policy, blank)
    )
    first = index.iloc[0]  # the planted study: Atelectasis 1, Cardiomegaly -1, Edema blank
    assert first["Atelectasis"] == 1.0
    assert (
        np.isnan(first["Cardiomegaly"])
        if policy == "u-ignore"
        else first["Cardiomegaly"] == (policy == "u-ones")
    )
    assert np.isnan(first["Edema"]) if blank == "unknown" else first["Edema"] == 0.0


@pytest.mark.parametrize(
    "views, expected",
    [
        ("frontal", {"PA", "AP"}),
        ("PA,AP", {"PA", "AP"}),
        (("lateral",), {"LATERAL"}),
        (["LL", "LATERAL"], {"LL", "LATERAL"}),
        ("all", {"PA", "AP", "LATERAL", "LL", ""}),
        (None, {"PA", "AP", "LATERAL", "LL", ""}),
    ],
)
def test_mimic_view_filter(fake_mimic, views, expected):
    index = index_from_mimic(fake_mimic.root, views=views)
    assert set(index["view"]) == expected
    assert len(index) == fake_mimic.metadata["ViewPosition"].fillna("").isin(expected).sum()


def test_mimic_needs_no_split_file(fake_mimic_copy):
    (fake_mimic_copy.root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    assert len(index_from_mimic(fake_mimic_copy.root)) == len(fake_mimic_copy.metadata)


def test_plain_csv_files_are_read_like_gzipped_ones(fake_mimic_copy):
    root = fake_mimic_copy.root
    for name in ("metadata", "chexpert"):
        gz = root / f"mimic-cxr-2.0.0-{name}.csv.gz"
        (root / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    index = index_from_mimic(root)
    assert len(index) == len(fake_mimic_copy.metadata)
    assert index["dicom_id"].tolist() == fake_mimic_copy.metadata["dicom_id"].astype(str).tolist()


@pytest.mark.parametrize("blank, value", [("zero", 0.0), ("unknown", math.nan)])
def test_a_study_without_a_label_row_gets_blank_labels_and_a_warning(fake_mimic_copy, blank, value):
    labels = fake_mimic_copy.labels
    study = labels["study_id"].iloc[3]
    rewrite_gz(fake_mimic_copy.root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels.drop(index=3))
    with pytest.warns(UserWarning, match=r"1 studies \(\d+ images\).*no label row"):
        index = index_from_mimic(fake_mimic_copy.root, blank=blank)
    assert len(index) == len(fake_mimic_copy.metadata)
    unlabeled = index[index["study_id"] == study][list(FINDINGS)].to_numpy()
    assert unlabeled.size and (np.isnan(unlabeled).all() if np.isnan(value) else (unlabeled == value).all())


def test_a_missing_label_column_is_named(fake_mimic_copy):
    path = fake_mimic_copy.root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    rewrite_gz(path, fake_mimic_copy.labels.drop(columns=["Edema"]))
    with pytest.raises(ValueError, match=r"mimic-cxr-2.0.0-chexpert.csv.gz: missing column\(s\) \['Edema'\]"):
        index_from_mimic(fake_mimic_copy.root)


def test_a_missing_metadata_column_is_named(fake_mimic_copy):
    path = fake_mimic_copy.root / "mimic-cxr-2.0.0-metadata.csv.gz"
    rewrite_gz(path, fake_mimic_copy.metadata.drop(columns=["ViewPosition"]))
    with pytest.raises(ValueError, match=r"metadata.csv.gz: missing column\(s\) \['ViewPosition'\]"):
        index_from_mimic(fake_mimic_copy.root)


def test_an_unknown_label_value_is_named_with_column_and_line(fake_mimic_copy):
    labels = fake_mimic_copy.labels
    labels.loc[4, "Pleural Effusion"] = "2.0"
    rewrite_gz(fake_mimic_copy.root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels)
    with pytest.raises(ValueError, match=r"chexpert.csv.gz: column 'Pleural Effusion', row 6 .*'2.0'"):
        index_from_mimic(fake_mimic_copy.root)


def test_a_missing_image_file_is_named_with_the_count(fake_mimic_copy):
    dicom_id = fake_mimic_copy.metadata["dicom_id"].iloc[5]
    missing = fake_mimic_copy.image_path(dicom_id)
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 18 listed images are missing.*line 7: {missing}"):
        index_from_mimic(fake_mimic_copy.root)
    index = index_from_mimic(fake_mimic_copy.root, check_files=False)
    assert dicom_id in set(index["dicom_id"])


def test_duplicate_images_and_studies_are_refused(fake_mimic_copy):
    meta_path = fake_mimic_copy.root / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta = fake_mimic_copy.metadata
    rewrite_gz(meta_path, pd.concat([meta, meta.iloc[[2]]], ignore_index=True))
    with pytest.raises(
        ValueError,
        match=rf"dicom_id '{meta['dicom_id'].iloc[2]}' is listed more than once \(lines \[4, 20\]\)",
    ):
        index_from_mimic(fake_mimic_copy.root)
    rewrite_gz(meta_path, meta)
    labels = fake_mimic_copy.labels
    rewrite_gz(
        fake_mimic_copy.root / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.concat([labels, labels.iloc[[1]]])
    )
    with pytest.raises(
        ValueError, match=rf"study_id '{labels['study_id'].iloc[1]}' is listed more than once"
    ):
        index_from_mimic(fake_mimic_copy.root)


def test_nothing_left_after_filtering_is_an_error(fake_mimic, tmp_path):
    with pytest.raises(ValueError, match=r"no image has a view in \['XX'\]; views present: .*'PA'"):
        index_from_mimic(fake_mimic.root, views="XX")
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        index_from_mimic(tmp_path)


# --------------------------------------------------------------------------- CheXpert


def write_fake_chexpert(parent: Path) -> pd.DataFrame:
    """CheXpert-v1.0/{train.csv, train/patientNNNNN/studyN/viewN_*.jpg} under ``parent``."""
    root = parent / "CheXpert-v1.0"
    rows = []
    for i, (patient, study, view, frontal, ap_pa, size) in enumerate(
        [
            (1, 1, "view1_frontal", "Frontal", "AP", (40, 32)),
            (1, 1, "view2_lateral", "Lateral", "", (32, 40)),
            (1, 2, "view1_frontal", "Frontal", "PA", (36, 36)),
            (2, 1, "view1_frontal", "Frontal", "AP", (48, 30)),
        ]
    ):
        relative = f"CheXpert-v1.0/train/patient{patient:05d}/study{study}/{view}.jpg"
        (parent / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 60 + 40 * i).save(parent / relative)
        labels = dict.fromkeys(FINDINGS, "")
        labels.update({"Cardiomegaly": ["1.0", "-1.0", "0.0", ""][i], "No Finding": "1.0" if i == 3 else ""})
        rows.append(
            {
                "Path": relative,
                "Sex": "Female",
                "Age": 60,
                "Frontal/Lateral": frontal,
                "AP/PA": ap_pa,
                **labels,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(root / "train.csv", index=False)
    return table


@pytest.mark.parametrize("inside", [True, False], ids=["root-is-CheXpert-v1.0", "root-holds-it"])
def test_chexpert_index(tmp_path, inside):
    write_fake_chexpert(tmp_path)
    root = tmp_path / "CheXpert-v1.0" if inside else tmp_path
    index = index_from_chexpert(root, "train.csv" if inside else "CheXpert-v1.0/train.csv", policy="u-ones")
    assert index["subject_id"].tolist() == ["patient00001"] * 3 + ["patient00002"]
    assert index["study_id"].tolist() == ["patient00001/study1"] * 2 + [
        "patient00001/study2",
        "patient00002/study1",
    ]
    assert index["dicom_id"].tolist() == [
        "00001_study1_view1_frontal",
        "00001_study1_view2_lateral",
        "00001_study2_view1_frontal",
        "00002_study1_view1_frontal",
    ]
    assert index["view"].tolist() == ["AP", "LATERAL", "PA", "AP"]
    assert index["width"].tolist() == [40, 32, 36, 48] and index["height"].tolist() == [32, 40, 36, 30]
    assert all(Path(p).is_file() for p in index["path"])
    assert index["Cardiomegaly"].tolist() == [1.0, 1.0, 0.0, 0.0]  # u-ones: -1 -> 1; blank -> 0
    frontal = index_from_chexpert(root, "train.csv" if inside else "CheXpert-v1.0/train.csv", views="frontal")
    assert frontal["view"].tolist() == ["AP", "PA", "AP"]


def test_chexpert_frontal_images_with_ll_or_rl_in_ap_pa_stay_frontal(tmp_path):
    table = write_fake_chexpert(tmp_path)
    table.loc[[2, 3], "AP/PA"] = ["LL", "RL"]  # Frontal in Frontal/Lateral
    table.to_csv(tmp_path / "CheXpert-v1.0" / "train.csv", index=False)
    frontal = index_from_chexpert(tmp_path / "CheXpert-v1.0", "train.csv", views="frontal")
    assert frontal["view"].tolist() == ["AP", "LL", "RL"]
    assert index_from_chexpert(tmp_path / "CheXpert-v1.0", "train.csv", views="PA,AP")["view"].tolist() == [
        "AP"
    ]


def test_blank_unknown_leaves_no_finding_without_negatives_out_with_a_warning(tmp_path, capsys):
    write_fake_chexpert(tmp_path)
    out = tmp_path / "index.csv"
    argv = ["--dataset", "chexpert", "--data-root", str(tmp_path / "CheXpert-v1.0"), "--out", str(out)]
    with pytest.warns(UserWarning, match=r"left out of the label set.*No Finding \(only positive labels\)"):
        assert main([*argv, "--blank", "unknown"]) == 0
    assert index_findings(read_index(out)) == ["Cardiomegaly"]  # the only finding with both classes
    with pytest.warns(UserWarning, match="Atelectasis"):  # blank zero: No Finding has negatives
        assert main(argv) == 0
    assert index_findings(read_index(out)) == ["Cardiomegaly", "No Finding"]


def test_chexpert_errors_name_the_file_and_line(tmp_path):
    table = write_fake_chexpert(tmp_path)
    root = tmp_path / "CheXpert-v1.0"
    table.loc[2, "Path"] = "CheXpert-v1.0/train/somebody/view1.jpg"
    table.to_csv(root / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: column 'Path', line 4: .*patientNNNNN"):
        index_from_chexpert(root, "bad.csv")
    table.drop(columns=["AP/PA"]).to_csv(root / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['AP/PA'\]"):
        index_from_chexpert(root, "bad.csv")


# --------------------------------------------------------------------------- any CSV


def write_kermany_like(folder: Path, with_sizes: bool = True) -> pd.DataFrame:
    rows = []
    for i, (cls, patient) in enumerate(
        [("NORMAL", "IM-0001"), ("PNEUMONIA", "person1"), ("PNEUMONIA", "person1"), ("NORMAL", "IM-0002")]
    ):
        relative = f"images/{cls}/{patient}-{i}.jpg"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (30 + i, 20 + i), 100).save(folder / relative)
        rows.append(
            {
                "path": relative,
                "patient_id": patient,
                "finding": cls,
                "subtype": "x",
                "width": 30 + i,
                "height": 20 + i,
            }
        )
    table = pd.DataFrame(rows)
    (table if with_sizes else table.drop(columns=["width", "height"])).to_csv(
        folder / "labels.csv", index=False
    )
    return table


@pytest.mark.parametrize("with_sizes", [True, False])
def test_kermany_like_csv_maps_the_label_column(tmp_path, with_sizes):
    write_kermany_like(tmp_path, with_sizes)
    index = index_from_csv(tmp_path / "labels.csv", label_map="kermany")
    assert index["Pneumonia"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert index["No Finding"].tolist() == [1.0, 0.0, 0.0, 1.0]
    others = [f for f in FINDINGS if f not in ("Pneumonia", "No Finding")]
    assert index[others].isna().all().all()  # unknown, never 0
    assert index["subject_id"].tolist() == ["IM-0001", "person1", "person1", "IM-0002"]
    assert index["dicom_id"].tolist() == ["IM-0001-0", "person1-1", "person1-2", "IM-0002-3"]
    assert index["study_id"].tolist() == index["dicom_id"].tolist()
    assert index["width"].tolist() == [30, 31, 32, 33] and index["height"].tolist() == [20, 21, 22, 23]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in index["path"])


def test_csv_label_values_outside_the_map_are_named(tmp_path):
    table = write_kermany_like(tmp_path)
    table.loc[2, "finding"] = "COVID"
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(
        ValueError, match=r"labels.csv: column 'finding', line 4: 'COVID' is not in the label map"
    ):
        index_from_csv(tmp_path / "labels.csv", label_map="kermany")
    custom = {"NORMAL": {"No Finding": 1}, "PNEUMONIA": {"Pneumonia": 1}, "COVID": {"Pneumonia": -1}}
    index = index_from_csv(
        tmp_path / "labels.csv", label_column="finding", label_map=custom, policy="u-ignore"
    )
    assert index["Pneumonia"].isna().tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="'Pneumonitis' is not one of the 14 findings"):
        index_from_csv(
            tmp_path / "labels.csv", label_column="finding", label_map={"NORMAL": {"Pneumonitis": 0}}
        )


def test_csv_errors_name_the_option_or_the_case_that_fixes_them(tmp_path):
    table = write_kermany_like(tmp_path)
    table.rename(columns={"path": "file"}).to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['path'\].*with --path-column$"):
        index_from_csv(tmp_path / "renamed.csv", label_map="kermany")
    table.assign(finding=table["finding"].str.capitalize()).to_csv(tmp_path / "case.csv", index=False)
    with pytest.raises(
        ValueError, match=r"line 2: 'Normal' is not in .*: it differs from 'NORMAL' only in case"
    ):
        index_from_csv(tmp_path / "case.csv", label_map="kermany")


@pytest.mark.parametrize("policy", ["u-zeros", "u-ones", "u-ignore"])
def test_csv_with_finding_columns(tmp_path, policy):
    for i in range(3):
        Image.new("L", (16, 16)).save(tmp_path / f"img{i}.png")
    pd.DataFrame(
        {
            "file": ["img0.png", "img1.png", str(tmp_path / "img2.png")],
            "pid": ["a", "a", "b"],
            "Cardiomegaly": ["1", "-1", ""],
            "Edema": ["0", "1", "-1"],
        }
    ).to_csv(tmp_path / "mine.csv", index=False)
    index = index_from_csv(
        tmp_path / "mine.csv", path_column="file", patient_column="pid", policy=policy, blank="unknown"
    )
    uncertain = {"u-zeros": 0.0, "u-ones": 1.0, "u-ignore": math.nan}[policy]
    np.testing.assert_array_equal(index["Cardiomegaly"], [1.0, uncertain, math.nan])
    np.testing.assert_array_equal(index["Edema"], [0.0, 1.0, uncertain])
    assert (
        index.drop(columns=["Cardiomegaly", "Edema"])[
            [f for f in FINDINGS if f not in ("Cardiomegaly", "Edema")]
        ]
        .isna()
        .all()
        .all()
    )
    assert index["width"].tolist() == [16, 16, 16]  # from the headers
    pd.DataFrame({"file": ["img0.png"], "pid": ["a"], "Edema": ["2.0"]}).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(ValueError, match=r"bad.csv: column 'Edema', row 2"):
        index_from_csv(tmp_path / "bad.csv", path_column="file", patient_column="pid")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['patient_id'\]"):
        index_from_csv(tmp_path / "bad.csv", path_column="file")


@pytest.mark.skipif(
    not (KERMANY / "labels.csv").is_file(), reason="the real pediatric set is not beside the repo"
)
def test_the_real_kermany_csv():
    index = index_from_csv(KERMANY / "labels.csv", label_map="kermany")
    assert len(index) == 777 and index["subject_id"].nunique() == 601
    assert (index["Pneumonia"] == 1).sum() == 571 and (index["No Finding"] == 1).sum() == 206
    assert index[[f for f in FINDINGS if f not in ("Pneumonia", "No Finding")]].isna().all().all()


def test_summarize_index_counts_and_prevalence():
    labels = {f: [np.nan] * 4 for f in FINDINGS}
    labels["Edema"] = [1.0, 0.0, 0.0, np.nan]
    index = pd.DataFrame({"dicom_id": list("abcd"), **labels})
    summary = summarize_index(index)
    assert summary.loc["Edema"].tolist() == [1, 2, 1, pytest.approx(1 / 3, abs=1e-4)]
    assert summary.loc["Fracture", "unknown"] == 4 and np.isnan(summary.loc["Fracture", "prevalence"])


# --------------------------------------------------------------------------- command line


def test_cli_round_trip_mimic(fake_mimic, tmp_path, capsys):
    out = tmp_path / "index.csv"
    argv = ["--dataset", "mimic", "--data-root", str(fake_mimic.root), "--out", str(out)]
    argv += ["--policy", "u-ignore", "--blank", "unknown", "--views", "frontal"]
    with pytest.warns(UserWarning, match=r"left out of the label set.*No Finding.*\(only negative labels\)"):
        assert main(argv) == 0
    written = read_index(out)
    built = index_from_mimic(fake_mimic.root, policy="u-ignore", blank="unknown", views="frontal")
    one_class = [f for f in FINDINGS if built[f].nunique() < 2]
    assert "No Finding" in one_class and index_findings(written) == [
        f for f in FINDINGS if f not in one_class
    ]
    pd.testing.assert_frame_equal(written, built.drop(columns=one_class), check_dtype=False)
    printed = capsys.readouterr().out
    assert f"{len(built)} images" in printed and "prevalence" in printed and "PA" in printed


def test_cli_round_trip_kermany_like_and_errors(tmp_path, capsys):
    write_kermany_like(tmp_path)
    out = tmp_path / "index.csv"
    assert (
        main(
            [
                "--dataset",
                "csv",
                "--csv",
                str(tmp_path / "labels.csv"),
                "--label-map",
                "kermany",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_index(out)["Pneumonia"].tolist() == [0.0, 1.0, 1.0, 0.0]
    capsys.readouterr()
    assert (
        main(
            [
                "--dataset",
                "csv",
                "--csv",
                str(tmp_path / "labels.csv"),
                "--label-column",
                "finding",
                "--label-map",
                "nope",
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert error.startswith("error: label map 'nope'") and error.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()
    assert main(["--dataset", "mimic", "--data-root", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 1
    assert "mimic-cxr-2.0.0-metadata.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------- CXRDataset


@pytest.mark.parametrize("resolution", [16, 32])
def test_dataset_items_have_shapes_dtypes_and_masks(fake_mimic, resolution):
    index = index_from_mimic(fake_mimic.root, policy="u-ignore", blank="unknown")
    dataset = CXRDataset(index, resolution)
    image, target, mask = dataset[0]
    assert image.shape == (1, resolution, resolution) and image.dtype == torch.uint8
    assert target.shape == mask.shape == (14,) and target.dtype == mask.dtype == torch.float32
    labels = index[list(FINDINGS)].to_numpy()
    for i in range(len(dataset)):
        _, target, mask = dataset[i]
        known = ~np.isnan(labels[i])
        np.testing.assert_array_equal(mask.numpy(), known.astype(np.float32))
        np.testing.assert_array_equal(target.numpy()[known], labels[i][known])
        assert (target.numpy()[~known] == 0).all()
    assert (~np.isnan(labels)).sum() < labels.size  # the mask really had zeros to show


def test_dataset_skips_or_raises_on_a_bad_image(fake_mimic_copy):
    dicom_id = fake_mimic_copy.metadata["dicom_id"].iloc[1]
    fake_mimic_copy.image_path(dicom_id).write_bytes(b"not an image")
    index = index_from_mimic(fake_mimic_copy.root).iloc[:4]
    with pytest.raises(ImageReadError, match=dicom_id):
        CXRDataset(index, 16)[1]
    dataset = CXRDataset(index, 16, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [dataset[i] for i in range(4)]
    assert items[1] is None
    batch = collate_skip_none(items)
    assert batch[0].shape == (3, 1, 16, 16) and batch[1].shape == batch[2].shape == (3, 14)
    assert collate_skip_none([None, None]) is None
