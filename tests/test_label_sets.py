"""A label set per data set: the index's finding columns drive the dataset, the tables and the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import metrics, plots
from cxrlib.cache import CXRDataset
from cxrlib.fileio import DataError
from cxrlib.index import drop_unlabelled_findings, index_findings, read_index, select_findings, write_index
from cxrlib.labels import FINDINGS, NIH_FINDINGS, finding_order, shared_findings

OWN = ["Nodule", "Tuberculosis", "No Finding"]


def own_index(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "dicom_id": [f"d{i}" for i in range(n)],
            "subject_id": [f"s{i // 2}" for i in range(n)],
            "study_id": [f"t{i}" for i in range(n)],
            "path": [f"/x/{i}.png" for i in range(n)],
            "view": "PA",
            "width": 64,
            "height": 64,
        }
    )
    for finding in OWN:
        frame[finding] = rng.integers(0, 2, n).astype(float)
    return frame


def test_index_keeps_its_own_label_set_through_a_round_trip(tmp_path):
    path = write_index(own_index(), tmp_path / "index.csv")
    back = read_index(path)
    assert index_findings(back) == OWN
    assert list(back.columns[-3:]) == OWN


def test_a_chexpert_index_reads_as_before(tmp_path):
    frame = own_index().drop(columns=OWN)
    for finding in FINDINGS:
        frame[finding] = np.nan
    back = read_index(write_index(frame, tmp_path / "index.csv"))
    assert index_findings(back) == list(FINDINGS)


def test_dataset_targets_have_one_column_per_finding(tmp_path):
    dataset = CXRDataset(own_index(), 32, tmp_path)
    assert dataset.findings == OWN
    assert dataset.targets.shape == (12, 3) and dataset.masks.shape == (12, 3)


def test_select_findings_keeps_a_subset_in_its_order_and_names_unknown_ones():
    index = own_index()
    assert index_findings(select_findings(index, ["No Finding", "Nodule"])) == ["No Finding", "Nodule"]
    with pytest.raises(DataError, match="Fibrosis"):
        select_findings(index, ["Fibrosis"])


def test_auc_tables_and_table3_name_the_index_findings():
    index = own_index(40)
    rng = np.random.default_rng(1)
    scores = pd.DataFrame(rng.normal(size=(40, 3)), index=index["dicom_id"], columns=OWN)
    aucs = metrics.auc_table({(32, 0): scores, (64, 0): scores * 2}, index)
    assert set(aucs["finding"]) == set(OWN)
    table = metrics.table3(aucs)
    assert list(table["finding"]) == [*OWN, "Average"]
    texts = figure_texts(plots.auc_vs_resolution(aucs))
    assert all(any(f in t for t in texts) for f in OWN)
    assert not any("Cardiomegaly" in t for t in texts)


def figure_texts(fig) -> list[str]:
    """Every piece of text drawn in a figure (titles, legends, tick labels)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_finding_order_and_shared_findings():
    assert finding_order(["Edema", "Atelectasis"]) == ["Atelectasis", "Edema"]  # CheXpert's order
    assert finding_order(["Nodule", "Mass"]) == ["Nodule", "Mass"]
    shared = shared_findings(NIH_FINDINGS, FINDINGS)
    assert shared["Effusion"] == "Pleural Effusion" and shared["No Finding"] == "No Finding"
    assert "Mass" not in shared and "Hernia" not in shared


def test_a_preset_can_train_and_report_a_subset_of_the_label_set(tmp_path):
    from PIL import Image

    from cxrlib import presets, study

    rows = []
    for k in range(6):
        Image.new("L", (8, 8), k * 30).save(tmp_path / f"im{k}.png")
        rows.append((f"im{k}.png", f"p{k}", ["Nodule|Mass", "No Finding", "Tuberculosis"][k % 3]))
    pd.DataFrame(rows, columns=["path", "patient_id", "labels"]).to_csv(tmp_path / "labels.csv", index=False)
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        "resolutions: [32]\n"
        f"data: {{source: csv, root: {tmp_path}, csv: labels.csv, findings: [Tuberculosis, Nodule],\n"
        "  csv_options: {labels_column: labels}}\n"
    )
    cfg = presets.resolve(str(preset), run_dir=str(tmp_path / "run"))
    assert index_findings(study.build_index(cfg)) == ["Tuberculosis", "Nodule"]
    cfg.data.findings = ["Fibrosis"]
    with pytest.raises(DataError, match=r"data.findings: findings \['Fibrosis'\] are not in"):
        study.build_index(cfg)


def test_findings_the_data_never_label_with_both_classes_are_left_out_of_the_label_set(tmp_path):
    """Kermany's CSV labels Pneumonia and No Finding only: the index, so the model head and every
    table, has those two, on the preset route and on the command line."""
    from PIL import Image

    from cxrlib import presets, study
    from cxrlib.datasets import main

    rows = []
    for k, finding in enumerate(["NORMAL", "PNEUMONIA", "PNEUMONIA", "NORMAL"]):
        Image.new("L", (8, 8), k * 30).save(tmp_path / f"im{k}.jpeg")
        rows.append((f"im{k}.jpeg", f"p{k}", finding))
    pd.DataFrame(rows, columns=["path", "patient_id", "finding"]).to_csv(tmp_path / "labels.csv", index=False)
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        f"resolutions: [32]\ndata: {{source: csv, root: {tmp_path}, csv: labels.csv, csv_options: {{\n"
        "  path_column: path, patient_column: patient_id, label_column: finding, label_map: kermany}}\n"
    )
    cfg = presets.resolve(str(preset), run_dir=str(tmp_path / "run"))
    left_out = (
        r"left out of the label set, never labelled with both classes: Atelectasis, .*\(no known label\)"
    )
    with pytest.warns(UserWarning, match=left_out):
        assert index_findings(study.build_index(cfg)) == ["No Finding", "Pneumonia"]
    argv = ["--dataset", "csv", "--csv", str(tmp_path / "labels.csv"), "--label-map", "kermany"]
    with pytest.warns(UserWarning, match=left_out):
        assert main([*argv, "--out", str(tmp_path / "index.csv")]) == 0
    assert index_findings(read_index(tmp_path / "index.csv")) == ["No Finding", "Pneumonia"]
    one_class = own_index().assign(Nodule=1.0, Tuberculosis=np.nan, **{"No Finding": 1.0})
    nothing_left = (
        r"mine: no finding is labelled with both classes: Tuberculosis \(no known label\); Nodule, No"
    )
    with pytest.raises(DataError, match=nothing_left):
        drop_unlabelled_findings(one_class, "mine")
