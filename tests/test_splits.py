"""Patient-grouped folds: leakage-free, reproducible byte for byte, and a checker that refuses leaks."""

import numpy as np
import pandas as pd
import pytest

from cxrlib.index import validate_index, write_index
from cxrlib.splits import LeakageError, check_folds, fold_ids, main, make_folds, read_folds, write_folds


def small_index(n_subjects=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for i in range(rng.integers(1, 5)):
            rows.append({"dicom_id": f"d{s:03d}_{i}", "subject_id": f"{10000000 + s}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [2, 5])
def test_folds_are_patient_grouped_and_test_each_image_once(k):
    index = small_index()
    folds = make_folds(index, k=k, seed=3)
    roles = [f"role_{i}" for i in range(k)]
    assert ((folds[roles] == "test").sum(axis=1) == 1).all()
    for column in roles:
        assert (folds.groupby("subject_id")[column].nunique() == 1).all()
        subjects = folds.groupby(column)["subject_id"].nunique()
        assert subjects["test"] in range(40 // k - 1, 40 // k + 2)
        non_test = subjects["train"] + subjects["val"]
        assert abs(subjects["val"] - 0.1 * non_test) <= 1


def test_same_seed_same_bytes_other_seed_other_folds(tmp_path):
    index = small_index()
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_folds(make_folds(index, seed=0), a)
    write_folds(make_folds(index, seed=0), b)
    write_folds(make_folds(index, seed=1), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_a_planted_leaked_subject_is_refused_by_name(tmp_path):
    folds = make_folds(small_index(), k=5, seed=0)
    subject = folds["subject_id"].iloc[0]
    rows = folds.index[folds["subject_id"] == subject]
    if len(rows) < 2:  # make the subject have two images
        folds = pd.concat([folds, folds.iloc[[0]].assign(dicom_id="extra")], ignore_index=True)
        rows = folds.index[folds["subject_id"] == subject]
    role = folds.at[rows[0], "role_0"]
    folds.at[rows[1], "role_0"] = "val" if role != "val" else "train"
    with pytest.raises(LeakageError, match=f"subject {subject} is in roles"):
        check_folds(folds)
    path = tmp_path / "leaky.csv"
    folds.to_csv(path, index=False)
    with pytest.raises(LeakageError, match=subject):
        read_folds(path)


def test_image_tested_twice_or_unknown_role_is_refused():
    folds = make_folds(small_index(), k=3, seed=0)
    twice = folds.copy()
    row = twice.index[twice["role_0"] != "test"][0]
    subject = twice.at[row, "subject_id"]
    twice.loc[twice["subject_id"] == subject, "role_0"] = "test"
    with pytest.raises(LeakageError, match="test in 2 folds"):
        check_folds(twice)
    bad = folds.copy()
    bad.loc[0, "role_1"] = "holdout"
    with pytest.raises(LeakageError, match="'holdout'"):
        check_folds(bad)


def test_folds_must_match_the_index():
    index = small_index()
    folds = make_folds(index, k=3, seed=0)
    check_folds(folds, index)
    with pytest.raises(LeakageError, match="only in the index"):
        check_folds(folds.iloc[1:], index)
    with pytest.raises(LeakageError, match="only in the folds"):
        check_folds(folds, index.iloc[1:])
    moved = index.assign(subject_id=index["subject_id"].where(index.index != 0, "99"))
    with pytest.raises(LeakageError, match=r"belongs to subject 99 in the index but 10000000 here"):
        check_folds(folds, moved)


def test_cli_writes_the_folds_make_folds_makes(tmp_path, capsys):
    index = small_index()
    index = validate_index(
        index.assign(study_id=index["dicom_id"], path="x.png", view="", width=1, height=1, Edema=1.0)
    )
    write_index(index, tmp_path / "index.csv")
    out = [
        "--index",
        str(tmp_path / "index.csv"),
        "--folds",
        "3",
        "--seed",
        "2",
        "--out",
        str(tmp_path / "f.csv"),
    ]
    assert main(out) == 0 and "wrote" in capsys.readouterr().out
    write_folds(make_folds(index, k=3, seed=2), tmp_path / "expected.csv")
    assert (tmp_path / "f.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()
    assert main([*out[:2], "--out", str(tmp_path / "g.csv")]) == 0
    assert main(["--index", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "h.csv")]) == 1


def test_fold_ids_and_errors():
    folds = make_folds(small_index(), k=3, seed=0)
    ids = fold_ids(folds, 1, "test")
    assert set(ids) == set(folds.loc[folds["role_1"] == "test", "dicom_id"])
    with pytest.raises(ValueError, match="fold 3 does not exist"):
        fold_ids(folds, 3, "test")
    with pytest.raises(ValueError, match="subjects cannot make"):
        make_folds(small_index(4), k=5)
