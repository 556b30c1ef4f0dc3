"""AUC, Table 3, patient bootstrap and DeLong tests against plain reference computations."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxrlib import metrics
from cxrlib.fileio import write_csv_atomic
from cxrlib.labels import FINDINGS
from cxrlib.paths import predictions_path
from cxrlib.splits import fold_ids, make_folds, write_folds


def reference_delong(labels, scores_a, scores_b):
    """DeLong et al. (1988) written plainly: O(m n) structural components, then the z test."""
    labels = np.asarray(labels)
    components = []
    for scores in (np.asarray(scores_a), np.asarray(scores_b)):
        pos, neg = scores[labels == 1], scores[labels == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components
    m, n = len(v10_a), len(v01_a)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auc_a - auc_b) / np.sqrt(variance)
    return auc_a, auc_b, cov, 2 * stats.norm.sf(abs(z))


def noisy_scores(labels, signal, rng, ties=False):
    scores = signal * labels + rng.normal(size=len(labels))
    return np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_plain_structural_components(ties):
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.3).astype(float)
    a, b = noisy_scores(labels, 1.0, rng, ties), noisy_scores(labels, 0.6, rng, ties)
    aucs, cov = metrics.delong_covariance(labels, np.vstack([a, b]))
    ref_auc_a, ref_auc_b, ref_cov, ref_p = reference_delong(labels, a, b)
    np.testing.assert_allclose(aucs, [ref_auc_a, ref_auc_b], rtol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(labels, a), roc_auc_score(labels, b)], rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
    result = metrics.delong_test(labels, a, b)
    assert result["p"] == pytest.approx(ref_p, rel=1e-9)


def reference_clustered_delong(labels, scores, clusters):
    """Obuchowski (1997) written plainly: O(m n) components, summed per cluster, then the covariance."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    ids = sorted(set(clusters))
    pos, neg = labels == 1, labels == 0
    m, n, big_i = pos.sum(), neg.sum(), len(ids)
    i10, i01 = len(set(clusters[pos])), len(set(clusters[neg]))  # clusters holding a positive, a negative
    d_x, d_y, aucs = [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        auc = psi.mean()
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        d_x.append([v10[clusters[pos] == c].sum() - (clusters[pos] == c).sum() * auc for c in ids])
        d_y.append([v01[clusters[neg] == c].sum() - (clusters[neg] == c).sum() * auc for c in ids])
        aucs.append(auc)
    d_x, d_y = np.array(d_x), np.array(d_y)
    cov = np.zeros((len(scores), len(scores)))
    for a in range(len(scores)):
        for b in range(len(scores)):
            s10 = i10 / ((i10 - 1) * m) * np.sum(d_x[a] * d_x[b])
            s01 = i01 / ((i01 - 1) * n) * np.sum(d_y[a] * d_y[b])
            s11 = big_i / (big_i - 1) * (np.sum(d_x[a] * d_y[b]) + np.sum(d_x[b] * d_y[a]))
            cov[a, b] = s10 / m + s01 / n + s11 / (m * n)
    return np.array(aucs), cov


def clustered_sample(rng, subjects=150, signal=1.0):
    """Subjects with 1-4 images each; a subject effect shared by its images' scores and labels."""
    sizes = rng.integers(1, 5, subjects)
    clusters = np.repeat(np.arange(subjects), sizes)
    subject_effect = rng.normal(size=subjects)[clusters]
    labels = ((subject_effect + rng.normal(size=len(clusters))) > 0.3).astype(float)
    a = signal * labels + subject_effect + rng.normal(size=len(clusters))
    b = 0.5 * signal * labels + subject_effect + rng.normal(size=len(clusters))
    return labels, np.round(a, 1), np.round(b, 1), clusters  # rounded: ties too


def test_clustered_delong_matches_obuchowski_written_plainly():
    labels, a, b, clusters = clustered_sample(np.random.default_rng(3))
    aucs, cov = metrics.delong_covariance(labels, np.vstack([a, b]), clusters)
    ref_aucs, ref_cov = reference_clustered_delong(labels, [a, b], clusters)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9)
    result = metrics.delong_test(labels, a, b, clusters=clusters)
    se = np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert result["se"] == pytest.approx(se, rel=1e-9)
    half = stats.norm.ppf(0.975) * se  # the 95% interval of the difference, from the same se
    interval = (result["diff"] - half, result["diff"] + half)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(interval)


def test_clustered_delong_variance_where_few_clusters_hold_positives_is_obuchowskis_by_hand():
    # 4 patients, positives in only 2 of them. AUC = 12/15; per patient D_x = 0.2, -0.2, 0, 0 and
    # D_y = 3/15, -2/15, -4/15, 3/15, so with I10 = 2, I01 = I = 4:
    # S10 = 2/(1 x 3) x 0.08, S01 = 4/(3 x 5) x 38/225, S11 = 4/3 x 1/15, and
    # var = S10/3 + S01/5 + 2 S11/15 = 4/225 + 152/16875 + 8/675 = 652/16875.
    clusters = np.array([1, 1, 1, 2, 2, 3, 3, 4])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    scores = np.array([0.8, 0.6, 0.2, 0.4, 0.5, 0.1, 0.7, 0.3])
    aucs, cov = metrics.delong_covariance(labels, scores, clusters)
    assert aucs[0] == pytest.approx(12 / 15, rel=1e-12)
    assert cov[0, 0] == pytest.approx(652 / 16875, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 clusters each, got 1 and 4"):
        metrics.delong_covariance(labels, scores, np.array([1, 1, 1, 1, 2, 3, 3, 4]))


def test_clustered_delong_counts_patients_and_the_image_level_test_counts_copies():
    rng = np.random.default_rng(4)
    labels = (rng.random(400) < 0.35).astype(float)
    a, b = noisy_scores(labels, 1.0, rng), noisy_scores(labels, 0.7, rng)
    subjects = np.arange(len(labels))
    single = metrics.delong_test(labels, a, b)
    # One image per subject: the clustered test is the image-level one (I10 = M, I01 = N clusters).
    one_each = metrics.delong_test(labels, a, b, clusters=subjects)
    assert one_each["se"] == pytest.approx(single["se"], rel=1e-12)
    k = 4  # every image copied k times inside its subject: no new patients, no new evidence
    copied = [np.repeat(v, k) for v in (labels, a, b, subjects)]
    clustered = metrics.delong_test(*copied[:3], clusters=copied[3])
    image_level = metrics.delong_test(*copied[:3])
    assert clustered["diff"] == pytest.approx(single["diff"])
    assert clustered["se"] == pytest.approx(single["se"], rel=0.03)
    assert image_level["se"] == pytest.approx(single["se"] / np.sqrt(k), rel=0.03)
    assert clustered["p"] > image_level["p"]


def test_image_level_delong_agrees_with_an_independent_implementation():
    mlstatkit = pytest.importorskip("MLstatkit", reason="the test extra (pip install -e .[dev]) has it")
    rng = np.random.default_rng(5)
    for trial in range(5):
        labels = (rng.random(250) < 0.3).astype(int)
        a, b = noisy_scores(labels, 1.0, rng, ties=trial % 2 == 1), noisy_scores(labels, 0.5, rng)
        z, p = mlstatkit.Delong_test(labels, a, b, return_ci=False, return_auc=False)
        ours = metrics.delong_test(labels, a, b)
        assert ours["p"] == pytest.approx(p, rel=1e-8)
        assert abs(ours["z"]) == pytest.approx(abs(z), rel=1e-8)


def test_delong_identical_predictors_give_p_one_and_clearly_better_gives_small_p():
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.4).astype(float)
    good = noisy_scores(labels, 3.0, rng)
    useless = rng.normal(size=len(labels))
    assert metrics.delong_test(labels, good, good.copy())["p"] == 1.0
    result = metrics.delong_test(labels, good, useless)
    assert result["diff"] > 0.3
    assert result["p"] < 1e-10


def test_delong_ignores_unknown_labels_and_refuses_too_few_cases():
    rng = np.random.default_rng(2)
    labels = (rng.random(100) < 0.5).astype(float)
    a, b = rng.normal(size=100), rng.normal(size=100)
    with_nan = labels.copy()
    with_nan[:10] = np.nan
    expected = metrics.delong_test(labels[10:], a[10:], b[10:])
    assert metrics.delong_test(with_nan, a, b) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2 positives"):
        metrics.delong_test(np.r_[1.0, np.zeros(20)], rng.normal(size=21), rng.normal(size=21))


def test_holm_and_bh_match_hand_computed_values():
    p = [0.01, 0.04, np.nan, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, then running max.
    np.testing.assert_allclose(metrics.holm(p), [0.03, 0.06, np.nan, 0.06, 0.02])
    # BH: sorted times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04, then running min from the top.
    np.testing.assert_allclose(metrics.benjamini_hochberg(p), [0.02, 0.04, np.nan, 0.04, 0.02])


def test_finding_auc_masks_unknown_labels_and_states_why_it_is_nan():
    scores = np.array([0.1, 0.9, 0.4, 0.3])
    auc, n_pos, n_neg, reason = metrics.finding_auc(np.array([0.0, 1.0, np.nan, 0.0]), scores)
    assert auc == 1.0 and (n_pos, n_neg, reason) == (1, 2, "")
    auc, n_pos, n_neg, reason = metrics.finding_auc(np.array([0.0, 0.0, np.nan, 0.0]), scores)
    assert np.isnan(auc) and reason == metrics.REASON_ONE_CLASS_NEG and (n_pos, n_neg) == (0, 3)
    auc, _, _, reason = metrics.finding_auc(np.array([1.0, 1.0, 1.0, 1.0]), scores)
    assert np.isnan(auc) and reason == metrics.REASON_ONE_CLASS_POS
    auc, _, _, reason = metrics.finding_auc(np.full(4, np.nan), scores)
    assert np.isnan(auc) and reason == metrics.REASON_NO_LABELS


def test_weighted_auc_equals_sklearn_on_the_duplicated_sample():
    rng = np.random.default_rng(3)
    labels = (rng.random(60) < 0.4).astype(float)
    scores = np.round(rng.normal(size=60), 1)  # ties
    counts = rng.integers(0, 3, size=60).astype(float)
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], counts[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    got = metrics._weighted_auc_rows((w * y)[None], (w * (1 - y))[None], starts)[0]
    expected = roc_auc_score(np.repeat(labels, counts.astype(int)), np.repeat(scores, counts.astype(int)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_bootstrap_resamples_patients_so_a_patient_with_many_images_widens_the_ci():
    rng = np.random.default_rng(4)
    # 40 patients with one image each and an uninformative score, and one patient with
    # 100 images whose scores separate the classes: the AUC depends on whether it is drawn.
    labels = np.r_[rng.integers(0, 2, 40), np.repeat([0, 1], 50)].astype(float)
    scores = np.r_[rng.normal(size=40), np.r_[rng.normal(-2, 0.3, 50), rng.normal(2, 0.3, 50)]]
    groups = np.r_[np.arange(40), np.full(100, 99)]
    by_patient = metrics.bootstrap_auc_ci(labels, scores, groups, n_boot=400, seed=0)
    by_image = metrics.bootstrap_auc_ci(labels, scores, None, n_boot=400, seed=0)
    assert by_patient["auc"] == by_image["auc"] == pytest.approx(roc_auc_score(labels, scores))
    width_patient = by_patient["ci_high"] - by_patient["ci_low"]
    width_image = by_image["ci_high"] - by_image["ci_low"]
    assert width_patient > 2 * width_image
    # One image per patient: patient resampling is image resampling, draw for draw.
    singles = metrics.bootstrap_auc(labels, scores, np.arange(len(labels)), n_boot=50, seed=7)
    np.testing.assert_array_equal(singles, metrics.bootstrap_auc(labels, scores, None, n_boot=50, seed=7))


# ----------------------------------------------------------------------------- run-level helpers


def make_run(tmp_path, resolutions=(32, 64), n_subjects=30, k=3, seed=0):
    """A tiny run folder: index, folds and prediction files whose logits carry the labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for i in range(rng.integers(1, 4)):
            rows.append({"dicom_id": f"d{s:03d}_{i}", "subject_id": f"{1000 + s}"})
    index = pd.DataFrame(rows)
    labels = (rng.random((len(index), len(FINDINGS))) < 0.4).astype(float)
    labels[:5, 0] = np.nan  # unknown labels of Atelectasis
    labels[:, FINDINGS.index("Fracture")] = 0.0  # one class everywhere
    index = pd.concat([index, pd.DataFrame(labels, columns=list(FINDINGS))], axis=1)
    index.to_csv(tmp_path / "index.csv", index=False)
    folds = make_folds(index, k=k, seed=seed)
    write_folds(folds, tmp_path / "folds.csv")
    for r, resolution in enumerate(resolutions):
        for fold in range(k):
            for split in ("val", "test"):
                ids = fold_ids(folds, fold, split)
                y = index.set_index("dicom_id").loc[ids, list(FINDINGS)].fillna(0).to_numpy()
                logits = (1.0 + r) * y + rng.normal(size=y.shape)
                frame = pd.DataFrame(logits, columns=list(FINDINGS))
                frame.insert(0, "dicom_id", ids)
                path = predictions_path(tmp_path, resolution, fold, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                frame.to_csv(path, index=False)
    return index, folds


def test_load_predictions_checks_coverage_and_auc_table_and_table3(tmp_path):
    index, folds = make_run(tmp_path)
    predictions = metrics.load_predictions(tmp_path, [32, 64])
    assert set(predictions) == {(r, k) for r in (32, 64) for k in range(3)}
    aucs = metrics.auc_table(predictions, index)
    assert list(aucs.columns) == list(metrics.AUC_COLUMNS)
    assert len(aucs) == 2 * 3 * len(FINDINGS)
    fracture = aucs[aucs["finding"] == "Fracture"]
    assert fracture["auc"].isna().all() and (fracture["reason"] == metrics.REASON_ONE_CLASS_NEG).all()
    # Atelectasis on fold of the first images: NaN labels are dropped, not counted as negatives.
    row = aucs[(aucs["finding"] == "Atelectasis") & (aucs["resolution"] == 32)]
    known = index.set_index("dicom_id")["Atelectasis"].notna()
    for fold in range(3):
        ids = fold_ids(folds, fold, "test")
        n_known = int(known.loc[ids].sum())
        got = row[row["fold"] == fold].iloc[0]
        assert got["n_pos"] + got["n_neg"] == n_known
        scores = predictions[(32, fold)]["Atelectasis"]
        mask = known.loc[ids].to_numpy()
        y = index.set_index("dicom_id").loc[ids, "Atelectasis"].to_numpy()[mask]
        assert got["auc"] == pytest.approx(roc_auc_score(y, scores.to_numpy()[mask]))

    aucs_with_ens = pd.concat([aucs, aucs[aucs["resolution"] == 64].assign(resolution="ensemble")])
    table = metrics.table3(aucs_with_ens)
    assert list(table["finding"]) == list(FINDINGS) + ["Average"]
    assert [c for c in table.columns if not c.endswith(("_mean", "_std", "_n_folds"))] == [
        "finding",
        "32",
        "64",
        "ensemble",
    ]
    cardio = aucs[(aucs["finding"] == "Cardiomegaly") & (aucs["resolution"] == 32)]["auc"]
    got = table.set_index("finding").loc["Cardiomegaly"]
    assert got["32_mean"] == pytest.approx(cardio.mean())
    assert got["32_std"] == pytest.approx(cardio.std(ddof=1))
    assert got["32"] == f"{100 * cardio.mean():.1f} ± {100 * cardio.std(ddof=1):.1f}"
    per_fold_avg = aucs[aucs["resolution"] == 64].groupby("fold")["auc"].mean()  # NaN Fracture skipped
    average = table.set_index("finding").loc["Average"]
    assert average["64_mean"] == pytest.approx(per_fold_avg.mean())
    assert average["64_std"] == pytest.approx(per_fold_avg.std(ddof=1))
    assert table.set_index("finding").loc["Fracture", "64"] == "n/a"

    auc_path = write_csv_atomic(aucs_with_ens, tmp_path / "auc.csv")
    table_path = write_csv_atomic(metrics.table3(aucs_with_ens), tmp_path / "table3.csv")
    reread = metrics.table3(pd.read_csv(auc_path))
    pd.testing.assert_frame_equal(reread, pd.read_csv(table_path, keep_default_na=False, na_values=[""]))


def test_load_predictions_refuses_a_file_missing_an_image(tmp_path):
    make_run(tmp_path)
    path = predictions_path(tmp_path, 64, 1, "test")
    frame = pd.read_csv(path)
    frame.iloc[1:].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"res64.fold1.test_predictions.csv.*1 missing"):
        metrics.load_predictions(tmp_path, [32, 64])


def test_pairwise_delong_and_bootstrap_table_over_a_run(tmp_path):
    # 80 patients: enough that clustered tests corrected over all 3 x 14 comparisons have power
    index, _ = make_run(tmp_path, resolutions=(32, 64, 128), n_subjects=80)
    predictions = metrics.load_predictions(tmp_path, [32, 64, 128])
    pooled = metrics.pool_folds(predictions)
    assert len(pooled[(32, "all")]) == len(index)
    pairs = metrics.pairwise_delong(pooled, index)
    assert {(a, b) for a, b in zip(pairs["resolution_a"], pairs["resolution_b"], strict=True)} == {
        (32, 64),
        (32, 128),
        (64, 128),
    }
    fracture = pairs[pairs["finding"] == "Fracture"]
    assert fracture["p"].isna().all() and fracture["reason"].str.contains("positives").all()
    one = pairs[(pairs["resolution_a"] == 32) & (pairs["resolution_b"] == 128)]
    # One family: every pair x every finding of the fold, named in the table.
    np.testing.assert_allclose(pairs["p_holm"], metrics.holm(pairs["p"]))
    np.testing.assert_allclose(pairs["p_bh"], metrics.benjamini_hochberg(pairs["p"]))
    tested = int(pairs["p"].notna().sum())
    assert (pairs["correction_family"] == f"fold all: 3 pairs x 14 findings ({tested} tests)").all()
    # The 128 px scores carry three times the signal: most findings differ significantly.
    assert (one["p_holm"] < 0.05).sum() >= 10
    boot = metrics.bootstrap_table({(64, "all"): pooled[(64, "all")]}, index, n_boot=100)
    ok = boot.dropna(subset=["ci_low"])
    assert len(ok) == len(FINDINGS) - 1
    assert ((ok["ci_low"] <= ok["auc"]) & (ok["auc"] <= ok["ci_high"])).all()
    assert (boot["n_groups"] == index["subject_id"].nunique()).all()


def test_a_class_with_few_patients_flags_its_bootstrap_interval_in_a_column_and_one_warning():
    # Pneumonia: 8 negative images of 6 patients against 92 positive patients; Edema: balanced
    subjects = ["s0", "s0", "s1", "s1", "s2", "s3", "s4", "s5"] + [f"p{i}" for i in range(8, 100)]
    index = pd.DataFrame({"dicom_id": [f"d{i}" for i in range(100)], "subject_id": subjects})
    index["Pneumonia"] = [0.0] * 8 + [1.0] * 92
    index["Edema"] = [float(int(s[1:]) % 2) for s in subjects]
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        rng.normal(size=(100, 2)) + index[["Pneumonia", "Edema"]].to_numpy(),
        index=index["dicom_id"],
        columns=["Pneumonia", "Edema"],
    )
    with pytest.warns(UserWarning, match=r"unreliable for 1 of 2 .* e\.g\. Pneumonia at 64: 6 patients"):
        table = metrics.bootstrap_table({(64, 0): scores}, index, n_boot=1000).set_index("finding")
    assert table.loc["Pneumonia", "caution"].startswith("6 patients with a negative label (< 20)")
    assert table.loc["Edema", "caution"] == "" and table.loc["Edema", "n_boot_valid"] == 1000
