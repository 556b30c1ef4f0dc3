"""Every figure renders from tiny data into a Figure, and save_figure writes a PNG."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cxrlib import metrics, plots, run_folder
from cxrlib.labels import FINDINGS
from cxrlib.receptive_field import ERFResult

RESOLUTIONS = (32, 64, 128)


def gaussian_erf(size, sigma):
    rows, cols = np.indices((size, size))
    return np.exp(-((rows - size / 2) ** 2 + (cols - size / 2) ** 2) / (2 * sigma**2))


def tiny_auc_long(seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        (finding, resolution, fold, 0.6 + 0.3 * rng.random(), 10, 20, "")
        for finding in FINDINGS[:5]
        for resolution in (*RESOLUTIONS, "ensemble", "average")
        for fold in range(3)
    ]
    return pd.DataFrame(rows, columns=list(metrics.AUC_COLUMNS))


def check_png(fig, tmp_path, name):
    assert isinstance(fig, Figure)
    path = plots.save_figure(fig, tmp_path / "figures" / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left behind


def test_fig3_image_sizes(tmp_path):
    rng = np.random.default_rng(0)
    index = pd.DataFrame(
        {"width": rng.choice([2500, 3056, 2000], 40), "height": rng.choice([3056, 2500], 40)}
    )
    check_png(plots.fig3_image_sizes(index), tmp_path, "fig3_image_sizes.png")
    with pytest.raises(ValueError, match="width"):
        plots.fig3_image_sizes(index.drop(columns="width"))


@pytest.mark.parametrize("with_states", [False, True])
def test_fig1_erf(tmp_path, with_states):
    results = {}
    for resolution in RESOLUTIONS:
        erf = gaussian_erf(resolution, resolution / 6)
        result = ERFResult(erf, (2, 2), (4, 4), 2, 2, 8, "estimator", 4, 8, "reflect")
        results[(resolution, "trained") if with_states else resolution] = result
        if with_states:
            results[(resolution, "init")] = ERFResult(
                erf**2, (2, 2), (4, 4), 2, 2, 8, "exact", None, 8, "reflect"
            )
    fig = plots.fig1_erf(results)
    assert len([ax for ax in fig.axes if ax.images]) == len(results)
    assert all(len(ax.patches) == 2 for ax in fig.axes if ax.images)  # 50% and 90% circles
    check_png(fig, tmp_path, "fig1_erf.png")


def test_fig4_gradcam(tmp_path):
    rng = np.random.default_rng(1)
    findings = ("Cardiomegaly", "Pneumothorax")
    originals = {f: rng.integers(0, 255, (80, 70)).astype(np.uint8) for f in findings}
    maps = {f: {r: rng.random((r, r)) for r in RESOLUTIONS} for f in findings}
    probabilities = {f: {r: rng.random(len(FINDINGS)) for r in RESOLUTIONS} for f in findings}
    truth = {"Cardiomegaly": ["Cardiomegaly"], "Pneumothorax": []}
    fig = plots.fig4_gradcam(originals, maps, probabilities, truth)
    assert len(fig.axes) == 2 * (len(RESOLUTIONS) + 1)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "ground truth: Cardiomegaly" in texts and "ground truth: none" in texts
    check_png(fig, tmp_path, "fig4_gradcam.png")


def test_fig5_ensemble_weights(tmp_path):
    rng = np.random.default_rng(2)
    weights = rng.dirichlet(np.ones(len(RESOLUTIONS)), size=len(FINDINGS))
    table = pd.DataFrame(
        [(f, r, weights[i, j]) for i, f in enumerate(FINDINGS) for j, r in enumerate(RESOLUTIONS)],
        columns=["finding", "resolution", "weight"],
    )
    fig = plots.fig5_ensemble_weights(table)
    bars = fig.axes[0].patches
    assert len(bars) == len(FINDINGS) * len(RESOLUTIONS)
    assert max(b.get_x() + b.get_width() for b in bars) == pytest.approx(100.0)
    check_png(fig, tmp_path, "fig5_ensemble_weights.png")


def test_auc_vs_resolution_with_std_and_with_bootstrap_ci(tmp_path):
    auc_long = tiny_auc_long()
    fig = plots.auc_vs_resolution(auc_long)
    assert [ax.get_title() for ax in fig.axes if ax.axison][:2] == ["Average", FINDINGS[0]]
    check_png(fig, tmp_path, "auc_vs_resolution.png")
    ci = auc_long[auc_long["resolution"].isin(RESOLUTIONS)].groupby(["finding", "resolution"])["auc"].mean()
    ci = ci.reset_index().assign(ci_low=lambda d: d["auc"] - 0.05, ci_high=lambda d: d["auc"] + 0.05)
    assert isinstance(plots.auc_vs_resolution(auc_long, ci=ci, findings=FINDINGS[:2]), Figure)


def test_training_curves_and_phantom_examples(tmp_path):
    histories = {
        (r, k): pd.DataFrame(
            {
                "epoch": [1, 2, 3],
                "train_loss": [0.7, 0.5, 0.4],
                "val_loss": [0.6, 0.55, 0.5],
                "lr": [1e-3, 1e-3, 5e-4],
            }
        )
        for r in RESOLUTIONS
        for k in range(2)
    }
    fig = plots.training_curves(histories)
    assert len(fig.axes[0].lines) == 2 * len(histories)
    check_png(fig, tmp_path / "b", "curves.png")

    rng = np.random.default_rng(3)
    examples = {}
    for finding in ("Cardiomegaly", "Lung Lesion"):
        examples[finding] = {}
        for r in RESOLUTIONS:
            without = rng.integers(0, 200, (r, r)).astype(np.uint8)
            with_ = without.copy()
            with_[r // 2, r // 2] = 255
            examples[finding][r] = (with_, without)
    fig = plots.phantom_examples(examples)
    assert len(fig.axes) == 2 * 2 * len(RESOLUTIONS)
    check_png(fig, tmp_path / "c", "phantom.png")


def test_read_histories_skips_missing_runs(tmp_path):
    path = tmp_path / "res32" / "fold0" / "history.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"epoch": [1], "train_loss": [0.5], "val_loss": [0.4], "lr": [1e-3]}).to_csv(
        path, index=False
    )
    histories = run_folder.read_histories(tmp_path, [32, 64], [0, 1])
    assert list(histories) == [(32, 0)]


def test_an_auc_axis_spans_at_least_a_tenth_so_a_tiny_difference_does_not_look_like_a_drop():
    rows = [("Pneumonia", r, 0, auc, 10, 20, "") for r, auc in ((32, 0.9955), (64, 0.9967), (128, 0.996))]
    fig = plots.auc_vs_resolution(pd.DataFrame(rows, columns=list(metrics.AUC_COLUMNS)))
    for ax in fig.axes[:2]:  # Average and Pneumonia
        low, high = ax.get_ylim()
        assert high - low >= plots.MIN_AUC_SPAN - 1e-9 and low < 0.9955 and 0.9967 < high <= 1.0
    rows = [("Edema", r, 0, auc, 10, 20, "") for r, auc in ((32, 0.50), (64, 0.75))]
    low, high = (
        plots.auc_vs_resolution(pd.DataFrame(rows, columns=list(metrics.AUC_COLUMNS))).axes[0].get_ylim()
    )
    assert low < 0.5 and high > 0.75  # a wide range keeps matplotlib's own limits
