"""The synthetic phantom: MIMIC-CXR-JPG layout and schemas, determinism, label rates, rendered truth."""

import dataclasses
import gzip
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.labels import FINDINGS
from cxrlib.phantom.anatomy import sample_subject
from cxrlib.phantom.findings import (
    CARDIAC_GROUP,
    CTR_THRESHOLD,
    MEDIASTINUM_THRESHOLD,
    MIMIC_LABEL_COUNTS,
    MIMIC_STUDIES,
    PATHOLOGIES,
    PREVALENCES,
    REGISTRY,
    Design,
    FindingPlan,
    label_rates,
    sample_labels,
)
from cxrlib.phantom.writer import (
    finding_examples,
    image_relpath,
    main,
    make_phantom,
    output_size,
    plan_frontal,
    render_frontal,
)

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "p"
    make_phantom(out, subjects=8, seed=0, max_size=64, workers=1, lateral_fraction=0.3)
    return out


def read_gz(path):
    with gzip.open(path, "rt") as handle:  # fails unless the file really is gzip
        return pd.read_csv(handle, dtype={"dicom_id": str})


def test_layout_and_schemas_are_mimics(tiny):
    meta = read_gz(tiny / "mimic-cxr-2.0.0-metadata.csv.gz")
    labels = read_gz(tiny / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split = read_gz(tiny / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(meta.columns) == METADATA_COLUMNS
    assert list(labels.columns) == ["subject_id", "study_id", *FINDINGS]
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) <= {"train", "validate", "test"}
    assert meta["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert meta["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert meta["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert set(meta["ViewPosition"]) <= {"PA", "AP", "LATERAL"}
    assert labels["study_id"].is_unique and set(labels["study_id"]) == set(meta["study_id"])
    jpgs = sorted(p.relative_to(tiny) for p in tiny.rglob("*.jpg"))
    assert len(jpgs) == len(meta)
    for row in meta.itertuples():
        path = tiny / image_relpath(row.subject_id, row.study_id, row.dicom_id)
        assert path.relative_to(tiny).parts[1] == f"p{str(row.subject_id)[:2]}"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L"
            assert image.size == (row.Columns, row.Rows)
            assert max(image.size) <= 64
    assert "synthetic" in (tiny / "README.txt").read_text().lower()


def test_same_seed_same_bytes_for_any_worker_count_other_seed_differs(tmp_path, tiny):
    other_workers = tmp_path / "w2"
    make_phantom(other_workers, subjects=8, seed=0, max_size=64, workers=2, lateral_fraction=0.3)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other_workers) for p in other_workers.rglob("*") if p.is_file())
    for name in files:
        assert (tiny / name).read_bytes() == (other_workers / name).read_bytes(), name
    other_seed = tmp_path / "s1"
    make_phantom(other_seed, subjects=8, seed=1, max_size=64, workers=1, lateral_fraction=0.3)
    a = (tiny / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()
    assert a != (other_seed / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()


@pytest.mark.parametrize("prevalence", PREVALENCES)
def test_label_values_and_rates_match_the_documented_table(prevalence):
    n = 6000
    labels = sample_labels(np.random.default_rng(3), prevalence, n)
    assert list(labels.columns) == list(FINDINGS)
    assert set(np.unique(labels.to_numpy()[~np.isnan(labels.to_numpy())])) <= {1.0, 0.0, -1.0}
    rates = label_rates(prevalence)
    for finding, (pos, neg, unc) in rates.items():
        column = labels[finding]
        tolerance = 4 * np.sqrt(max(pos, 0.01) / n) + 0.005
        assert abs((column == 1).mean() - pos) < tolerance, finding
        assert abs((column == -1).mean() - unc) < 4 * np.sqrt(max(unc, 0.01) / n) + 0.005, finding
        assert abs((column == 0).mean() - neg) < 4 * np.sqrt(max(neg, 0.01) / n) + 0.005, finding
    no_finding = labels["No Finding"]
    assert set(no_finding.dropna()) == {1.0}
    sick = labels[[f for f in PATHOLOGIES if f != "Support Devices"]].isin([1, -1]).any(axis=1)
    assert (no_finding.isna() == sick).all()
    if prevalence == "mimic":
        mimic_rate = MIMIC_LABEL_COUNTS["No Finding"][0] / MIMIC_STUDIES
        assert abs((no_finding == 1).mean() - mimic_rate) < 0.03
        positives = labels[list(CARDIAC_GROUP)].eq(1).astype(float)
        assert positives.corr().to_numpy()[np.triu_indices(4, 1)].min() > 0.1  # co-occurrence
    else:
        positives = labels[list(PATHOLOGIES)].eq(1).astype(float)
        off_diagonal = positives.corr().to_numpy()[np.triu_indices(13, 1)]
        assert np.abs(off_diagonal).max() < 0.06  # independent findings


def test_truth_file_is_consistent_with_labels(tiny):
    truth = pd.read_csv(tiny / "phantom_truth.csv", dtype={"dicom_id": str})
    labels = read_gz(tiny / "mimic-cxr-2.0.0-chexpert.csv.gz")
    merged = truth.merge(labels, on=["subject_id", "study_id"], validate="many_to_one")
    assert len(merged) == len(truth)
    for finding in PATHOLOGIES:
        present = merged[f"present_{finding}"]
        assert (present[merged[finding] == 1] == 1).all(), finding
        assert (present[merged[finding].isna() | (merged[finding] == 0)] == 0).all(), finding
    assert ((merged["ctr"] > CTR_THRESHOLD) == (merged["present_Cardiomegaly"] == 1)).all()
    assert (
        (merged["mediastinum_ratio"] > MEDIASTINUM_THRESHOLD)
        == (merged["present_Enlarged Cardiomediastinum"] == 1)
    ).all()
    assert ((merged["No Finding"] == 1) <= (merged["present_No Finding"] == 1)).all()
    details = merged["details"].map(json.loads)
    for has, key in [("present_Lung Lesion", "nodules"), ("present_Pneumothorax", "pneumothorax")]:
        frontal = merged["view"] != "LATERAL"
        assert (details[frontal].map(lambda d, k=key: k in d) == (merged[has][frontal] == 1)).all()


def test_every_pathology_is_one_registered_finding_with_a_typed_plan():
    names = [finding.name for finding in REGISTRY]
    assert sorted(names) == sorted(PATHOLOGIES) and len(set(names)) == len(names)
    plan = plan_pair("Pneumothorax")[0]
    assert list(plan["findings"]) == names  # drawing order
    for name, finding_plan in plan["findings"].items():
        assert isinstance(finding_plan, FindingPlan) and dataclasses.is_dataclass(finding_plan), name
        assert finding_plan.state == ("strong" if name == "Pneumothorax" else "absent"), name


def plan_pair(finding, seed=4):
    """The same patient planned with and without one finding (strong)."""
    subject = sample_subject(np.random.default_rng(seed))
    absent = {f: "absent" for f in PATHOLOGIES}
    design = Design()
    plans = [
        plan_frontal(np.random.default_rng([seed, 1]), subject, dict(absent, **state), design)
        for state in ({finding: "strong"}, {})
    ]
    return plans


@pytest.mark.parametrize("finding", ["Lung Lesion", "Pneumothorax", "Fracture", "Support Devices"])
def test_fine_findings_change_the_image_only_where_drawn_and_vanish_at_low_resolution(finding):
    with_plan, without_plan = plan_pair(finding)
    width, height = output_size(with_plan["native_width"], with_plan["native_height"], 512)
    with_image, truth = render_frontal(with_plan, width, height)
    without_image, _ = render_frontal(without_plan, width, height)
    diff = with_image.astype(float) - without_image.astype(float)
    # Same noise, same anatomy: the difference is the finding (minus its decoy) and small in area
    # (at most two wires or rib breaks with their soft decoys' +-2 sigma bands: a few % of the image).
    assert np.abs(diff).max() > 20
    assert (np.abs(diff) > 8).mean() < 0.04
    # Where documented: the difference lies near the truth coordinates.
    key = {
        "Lung Lesion": "nodules",
        "Pneumothorax": "pneumothorax",
        "Fracture": "fractures",
        "Support Devices": "devices",
    }[finding]
    assert key in truth
    # Downscaled to 32 px the finding is no longer told apart from its decoy; at 256 px it is.
    energy = {}
    for r in (32, 256):
        pair = [
            np.asarray(Image.fromarray(im).resize((r, r), Image.Resampling.LANCZOS), float)
            for im in (with_image, without_image)
        ]
        energy[r] = np.abs(pair[0] - pair[1]).max()
    assert energy[256] > 4 * energy[32], energy


def test_nodule_difference_is_concentrated_at_its_centre():
    with_plan, without_plan = plan_pair("Lung Lesion", seed=7)
    with_image, truth = render_frontal(with_plan, 256, 307)
    without_image, _ = render_frontal(without_plan, 256, 307)
    diff = np.abs(with_image.astype(float) - without_image.astype(float))
    rows, cols = np.mgrid[: diff.shape[0], : diff.shape[1]]
    near = np.zeros(diff.shape, bool)
    for nodule in truth["nodules"]:
        cx, cy = nodule["centre_px"]
        near |= np.hypot(cols + 0.5 - cx, rows + 0.5 - cy) < 3 * nodule["radius_px"] + 6
    assert diff[near].sum() > 0.9 * diff.sum()


@pytest.mark.parametrize("finding", ["Cardiomegaly", "Enlarged Cardiomediastinum", "Edema"])
def test_coarse_findings_survive_downscaling(finding):
    examples = finding_examples(resolutions=(32, 256), seed=1, size=384)
    with32, without32 = (a.astype(float) for a in examples[finding][32])
    with256, without256 = (a.astype(float) for a in examples[finding][256])
    # The mean absolute difference per pixel is about as large at 32 px as at 256 px.
    low, high = np.abs(with32 - without32).mean(), np.abs(with256 - without256).mean()
    assert high > 0.3
    assert low > 0.6 * high, (low, high)


def test_finding_examples_shapes():
    examples = finding_examples(resolutions=(16, 48), seed=0, size=96)
    assert list(examples) == list(FINDINGS)
    for per_resolution in examples.values():
        assert sorted(per_resolution) == [16, 48]
        for r, (with_finding, without_finding) in per_resolution.items():
            assert with_finding.shape == without_finding.shape == (r, r)
            assert with_finding.dtype == np.uint8


def test_rendering_is_size_consistent():
    """The same plan rendered small or large looks the same once both are brought to one size."""
    plan = plan_pair("Cardiomegaly")[0]
    small, _ = render_frontal(plan, 96, 116)
    large, _ = render_frontal(plan, 384, 464)
    large_down = np.asarray(Image.fromarray(large).resize((96, 116), Image.Resampling.LANCZOS), float)
    assert np.abs(small.astype(float) - large_down).mean() < 6


def test_cli_and_bad_arguments(tmp_path):
    assert main(["--out", str(tmp_path / "c"), "--subjects", "2", "--max-size", "48", "--workers", "1"]) == 0
    assert (tmp_path / "c" / "mimic-cxr-2.0.0-split.csv.gz").is_file()
    # every design option is a flag: the same images as make_phantom with it, not the default's
    flags = ["--subjects", "2", "--max-size", "48", "--workers", "1", "--fine-contrast", "1.6"]
    flags += ["--noise", "0.05"]
    assert main(["--out", str(tmp_path / "e"), *flags]) == 0
    make_phantom(tmp_path / "f", 2, max_size=48, workers=1, fine_contrast=1.6, noise=0.05)
    images = {run: [p.read_bytes() for p in sorted((tmp_path / run).rglob("*.jpg"))] for run in "cef"}
    assert images["e"] == images["f"] != images["c"]
    with pytest.raises(ValueError, match="prevalence"):
        make_phantom(tmp_path / "d", subjects=1, prevalence="nope")
    with pytest.raises(ValueError, match="subjects"):
        make_phantom(tmp_path / "d", subjects=0)
