"""Stacked scale ensemble: recovers the informative scale, beats single scales, stays finite at +-100."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from cxrlib import ensemble, metrics
from cxrlib.fileio import write_csv_atomic
from cxrlib.labels import FINDINGS

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_scales(n, seed, n_findings=4, strong=1.5, weak=0.7, prevalence=0.3):
    """Calibrated logits of S = n_findings scales: scale f sees finding f clearly, the others weakly.

    Scale s observes ``z = a_fs * y + N(0, 1)`` and reports the exact posterior log-odds.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_findings)) < prevalence).astype(float)
    a = np.full((n_findings, n_findings), weak)
    np.fill_diagonal(a, strong)
    z = a[None] * y[..., None] + rng.normal(size=(n, n_findings, n_findings))
    logits = np.log(prevalence / (1 - prevalence)) + a[None] * z - a[None] ** 2 / 2
    return logits, y


def test_recovers_the_informative_scale_per_finding_and_beats_every_single_scale():
    train_logits, train_y = synthetic_scales(2000, seed=0)
    test_logits, test_y = synthetic_scales(2000, seed=1)
    fit = ensemble.fit_stacked_ensemble(train_logits, train_y)
    assert fit.converged and fit.loss_gap < 1e-3
    np.testing.assert_allclose(fit.weights.sum(axis=1), 1.0)
    for f in range(4):
        others = np.delete(fit.weights[f], f)
        assert fit.weights[f].argmax() == f
        assert fit.weights[f, f] > 3 * others.max()
    held_out = ensemble.ensemble_logits(test_logits, fit.weights)
    for f in range(4):
        best_single = max(roc_auc_score(test_y[:, f], test_logits[:, f, s]) for s in range(4))
        assert roc_auc_score(test_y[:, f], held_out[:, f]) >= best_single


def test_ensemble_is_eq3_and_the_average_is_the_mean_probability():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3, size=(50, 3, 4))
    weights = rng.dirichlet(np.ones(4), size=3)
    p = (weights[None] / (1 + np.exp(-logits))).sum(axis=-1)
    np.testing.assert_allclose(ensemble.ensemble_logits(logits, weights), np.log(p / (1 - p)), rtol=1e-9)
    mean_p = (1 / (1 + np.exp(-logits))).mean(axis=-1)
    np.testing.assert_allclose(ensemble.average_logits(logits), np.log(mean_p / (1 - mean_p)), rtol=1e-9)


def test_logits_of_plus_minus_100_stay_finite_in_loss_gradient_and_output():
    logits = torch.tensor([[[100.0, -100.0, 100.0]], [[-100.0, -100.0, -100.0]], [[100.0, 100.0, 100.0]]])
    labels = torch.tensor([[0.0], [1.0], [np.nan]])
    v = torch.zeros(1, 3, requires_grad=True)  # eq. 2's parameter: uniform weights
    log_p, log_q = ensemble.log_ensemble_probabilities(logits, F.log_softmax(v, dim=1))
    assert torch.isfinite(log_p).all() and torch.isfinite(log_q).all()
    assert log_p[1, 0].item() == pytest.approx(-100.0, abs=1e-4)  # p = sigmoid(-100), not 0
    assert log_q[2, 0].item() == pytest.approx(-100.0, abs=1e-4)  # 1 - p = sigmoid(-100), not 0
    loss = ensemble.ensemble_loss(log_p, log_q, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all()
    out = ensemble.ensemble_logits(logits.numpy(), np.full((1, 3), 1 / 3))
    assert np.isfinite(out).all() and out[2, 0] == pytest.approx(100.0) and out[1, 0] == pytest.approx(-100.0)
    fit = ensemble.fit_stacked_ensemble(logits.numpy(), labels.numpy(), epochs=20)
    assert np.isfinite(fit.weights).all() and np.isfinite(fit.history["loss"]).all()


def test_fold_ensembles_score_like_resolutions_and_weights_table(tmp_path):
    from test_metrics import make_run

    index, _ = make_run(tmp_path, resolutions=(32, 64), k=3)
    val = metrics.load_predictions(tmp_path, [32, 64], split="val")
    test = metrics.load_predictions(tmp_path, [32, 64], split="test")
    result = ensemble.fit_fold_ensembles(val, test, index, [32, 64])
    assert set(result.predictions) == {(name, k) for name in ("ensemble", "average") for k in range(3)}
    for (_name, fold), frame in result.predictions.items():
        assert list(frame.columns) == list(FINDINGS)
        assert set(frame.index) == set(test[(32, fold)].index)
        assert np.isfinite(frame.to_numpy()).all()
    assert len(result.weights) == 3 * len(FINDINGS) * 2
    assert list(result.convergence.columns[:2]) == ["fold", "converged"]
    aucs = metrics.auc_table({**test, **result.predictions}, index)
    table = metrics.table3(aucs)
    assert {"32", "64", "ensemble", "average"} <= set(table.columns)
    path = write_csv_atomic(ensemble.ensemble_weights_table(result.weights), tmp_path / "weights.csv")
    written = pd.read_csv(path)
    assert list(written.columns) == ["finding", "resolution", "weight", "std", "n_folds"]
    assert len(written) == len(FINDINGS) * 2
    np.testing.assert_allclose(written.groupby("finding")["weight"].sum(), 1.0)
    row = written[(written["finding"] == "Edema") & (written["resolution"] == 64)].iloc[0]
    per_fold = result.weights.query("finding == 'Edema' and resolution == 64")["weight"]
    assert row["weight"] == pytest.approx(per_fold.mean()) and row["std"] == pytest.approx(
        per_fold.std(ddof=1)
    )
