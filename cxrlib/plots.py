"""Every figure as a function from data to a ``matplotlib.figure.Figure``, in one style.

Figures are built without pyplot (``matplotlib.figure.Figure``), so a loop that makes many
does not accumulate open windows, and a notebook shows each returned figure once. Without a
display (a server, CI) and without ``MPLBACKEND`` set, the non-interactive Agg backend is
selected on import. :func:`save_figure` writes a PNG atomically.

====================== =========================== =============================================
file                   function                    data
====================== =========================== =============================================
fig1_erf.png           :func:`fig1_erf`             ERF results per resolution (receptive_field)
fig3_image_sizes.png   :func:`fig3_image_sizes`     the index (native width and height)
fig4_gradcam.png       :func:`fig4_gradcam`         Grad-CAM maps and probabilities per resolution
fig5_ensemble_weights  :func:`fig5_ensemble_weights` ensemble_weights.csv
auc_vs_resolution.png  :func:`auc_vs_resolution`    auc.csv (optionally bootstrap CIs)
(optional)             :func:`delong_heatmap`       metrics.pairwise_delong output
cross_resolution.png   :func:`cross_resolution_heatmap` cross_resolution_auc.csv (study.cross_resolution)
(notebooks)            :func:`training_curves`      history.csv files (run_folder.read_histories)
(notebooks)            :func:`phantom_examples`     cxrlib.phantom.finding_examples output
====================== =========================== =============================================
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

if (
    not os.environ.get("MPLBACKEND")
    and "ipykernel" not in sys.modules
    and sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
):
    matplotlib.use("Agg")

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .fileio import atomic_write
from .labels import FINDINGS, finding_order

FIGURE_FILES: dict[str, str] = {
    "erf": "fig1_erf.png",
    "image_sizes": "fig3_image_sizes.png",
    "gradcam": "fig4_gradcam.png",
    "ensemble_weights": "fig5_ensemble_weights.png",
    "auc_vs_resolution": "auc_vs_resolution.png",
}
MIN_AUC_SPAN = 0.1  # an AUC axis spans at least this, so that 0.001 does not look like a drop
ENSEMBLE_STYLES: dict[str, dict] = {
    "ensemble": {"color": "black", "linestyle": "--", "label": "stacked ensemble"},
    "average": {"color": "0.45", "linestyle": ":", "label": "average ensemble"},
}


def show_inline() -> None:
    """In a notebook, show returned figures as images (IPython's inline display, as
    ``%matplotlib inline``): these figures are built without pyplot, so nothing else turns it on."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        shell.run_line_magic("matplotlib", "inline")
    set_style()


def set_style() -> None:
    """The one style of every figure: seaborn's whitegrid at paper scale, readable fonts."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    matplotlib.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "axes.titlesize": "medium",
            "axes.titleweight": "bold",
            "image.interpolation": "nearest",
        }
    )


def _figure(width: float, height: float) -> Figure:
    set_style()
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (parent folders created); returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def resolution_label(resolution: int | str) -> str:
    """``256`` -> ``"256x256"``; ensemble names unchanged."""
    try:
        value = int(resolution)
    except (TypeError, ValueError):
        return str(resolution)
    return f"{value}x{value}"


def _auc_axis(ax) -> None:
    """Widen an AUC axis to at least :data:`MIN_AUC_SPAN` around its data, not above 1 unless they are."""
    low, high = ax.get_ylim()
    if high - low < MIN_AUC_SPAN:
        top = min(max(high, 1.0), (low + high + MIN_AUC_SPAN) / 2)
        ax.set_ylim(top - MIN_AUC_SPAN, top)


def _split_resolutions(values) -> tuple[list[int], list[str]]:
    numbers, names = [], []
    for value in dict.fromkeys(values):
        try:
            numbers.append(int(value))
        except (TypeError, ValueError):
            names.append(str(value))
    return sorted(set(numbers)), names


# ----------------------------------------------------------------------------- Fig 3


def native_size_columns(index: pd.DataFrame) -> list[str]:
    """The index's columns of the native image size: ``native_width`` / ``native_height`` where it
    has them (a data set whose files were resized), else ``width`` / ``height``."""
    native = all(c in index.columns for c in ("native_width", "native_height"))
    if native and pd.to_numeric(index["native_width"], errors="coerce").notna().any():
        return ["native_width", "native_height"]
    return ["width", "height"]


def fig3_image_sizes(index: pd.DataFrame, max_points: int = 50_000, seed: int = 0) -> Figure:
    """Native width x height of the index's images: scatter with marginal histograms (paper Fig. 3).

    The native size is ``native_width`` / ``native_height`` where the index has them (the original
    acquisition of a data set whose files were resized, as NIH ChestX-ray14's 1024 px PNGs), else
    ``width`` / ``height`` (the files' own size, which is native for MIMIC-CXR-JPG and CheXpert).
    The histograms use every image; the scatter at most ``max_points`` (a seeded sample).
    """
    columns = native_size_columns(index)
    for column in columns:
        if column not in index.columns:
            raise ValueError(f"the index has no {column!r} column (native image size)")
    sizes = index[columns].apply(pd.to_numeric, errors="coerce").dropna()
    sizes.columns = ["width", "height"]
    shown = sizes.sample(max_points, random_state=seed) if len(sizes) > max_points else sizes
    fig = _figure(6.5, 6.0)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    scatter = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=scatter)
    right = fig.add_subplot(grid[1, 1], sharey=scatter)
    sns.scatterplot(
        data=shown, x="width", y="height", ax=scatter, s=8, alpha=0.3, linewidth=0, rasterized=True
    )
    bins = min(60, max(5, int(np.sqrt(len(sizes)))))
    sns.histplot(data=sizes, x="width", ax=top, bins=bins, element="step")
    sns.histplot(data=sizes, y="height", ax=right, bins=bins, element="step")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_xlabel("")
    right.set_ylabel("")
    scatter.set_xlabel("native width (px)")
    scatter.set_ylabel("native height (px)")
    fig.suptitle(f"Native image sizes ({len(sizes):,} images)")
    return fig


# ----------------------------------------------------------------------------- Fig 1


def fig1_erf(results: Mapping, normalise: bool = True, cmap: str = "magma") -> Figure:
    """ERF maps side by side in the same relative frame (the image as [0, 1] x [0, 1]).

    ``results``: ``{resolution: ERFResult}`` (one row) or ``{(resolution, state): ERFResult}``
    (one row per state, e.g. ``init`` and ``trained``). Each map fills the whole image extent,
    so its size relative to the image is comparable across resolutions; circles mark the
    discs holding 50% (dashed) and 90% (solid) of the ERF mass, and the 90% disc's
    diameter is written as a fraction of the image side.
    """
    items = [((key, "") if not isinstance(key, tuple) else key, value) for key, value in results.items()]
    if not items:
        raise ValueError("no ERF results to plot")
    resolutions = sorted({int(key[0]) for key, _ in items})
    states = list(dict.fromkeys(key[1] for key, _ in items))
    lookup = {(int(key[0]), key[1]): value for key, value in items}
    fig = _figure(3.0 * len(resolutions) + 0.8, 3.2 * len(states) + 0.3)
    axes = fig.subplots(len(states), len(resolutions), squeeze=False)
    image = None
    for row, state in enumerate(states):
        for col, resolution in enumerate(resolutions):
            ax = axes[row, col]
            result = lookup.get((resolution, state))
            ax.set_xticks([0, 0.5, 1])
            ax.set_yticks([0, 0.5, 1])
            ax.grid(False)
            if result is None:
                ax.set_axis_off()
                continue
            erf = result.erf / result.erf.max() if normalise else result.erf
            image = ax.imshow(erf, extent=(0, 1, 1, 0), cmap=cmap, vmin=0, interpolation="bilinear")
            side = result.resolution
            centre = ((result.centroid[1] + 0.5) / side, (result.centroid[0] + 0.5) / side)
            for radius, style in ((result.radius50_px, "--"), (result.radius90_px, "-")):
                ax.add_patch(Circle(centre, radius / side, fill=False, color="cyan", linestyle=style, lw=1.2))
            ax.set_xlim(0, 1)
            ax.set_ylim(1, 0)
            title = resolution_label(resolution) + (f" ({state})" if state else "")
            ax.set_title(title)
            ax.text(
                0.03,
                0.97,
                f"90%: {100 * result.fraction90:.0f}% of side\n50%: {100 * result.fraction50:.0f}% of side",
                transform=ax.transAxes,
                va="top",
                color="white",
                fontsize="small",
            )
            if col == 0:
                ax.set_ylabel("fraction of image")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="ERF / max" if normalise else "ERF")
    fig.suptitle("Effective receptive field relative to the image (circles: 50% / 90% of mass)")
    return fig


# ----------------------------------------------------------------------------- Fig 4


def fig4_gradcam(
    originals: Mapping[str, np.ndarray],
    maps: Mapping[str, Mapping[int, np.ndarray]],
    probabilities: Mapping[str, Mapping[int, Sequence[float]]],
    ground_truth: Mapping[str, Sequence[str]],
    findings: Sequence[str] = ("Cardiomegaly", "Pneumothorax"),
    threshold: float = 0.5,
    alpha: float = 0.45,
    title: str = "Grad-CAM across resolutions",
    names: Sequence[str] | None = None,
) -> Figure:
    """Grad-CAM grid (paper Fig. 4): rows = findings, columns = the original and each resolution.

    The columns are the keys of ``maps`` (resolutions, in increasing order, or names such as
    ``"tiles 2x2"``, in the given order).

    Args:
        originals: per row's finding, the image shown (2-D, any size; the maps are drawn over it
            in the same [0, 1] frame, whatever their resolution).
        maps: ``{finding: {resolution: map}}``, Grad-CAM maps in [0, 1] (:mod:`cxrlib.gradcam`).
        probabilities: ``{finding: {resolution: probabilities}}`` of that row's image, one per
            finding of the model's label set ``names`` (default CheXpert's 14), in output order.
        ground_truth: ``{finding: positive findings of that row's image}``, written on the original.
        threshold: findings with a probability above it are listed under each map.
    """
    findings = [f for f in findings if f in maps]
    if not findings:
        raise ValueError("none of the requested findings has Grad-CAM maps")
    columns = list(dict.fromkeys(key for f in findings for key in maps[f]))
    resolutions = sorted(columns) if all(isinstance(k, int | np.integer) for k in columns) else columns
    fig = _figure(2.6 * (len(resolutions) + 1), 3.0 * len(findings) + 0.3)
    axes = fig.subplots(len(findings), len(resolutions) + 1, squeeze=False)
    for row, finding in enumerate(findings):
        original = np.asarray(originals[finding])
        truth = ", ".join(ground_truth.get(finding, [])) or "none"
        ax = axes[row, 0]
        ax.imshow(original, cmap="gray", extent=(0, 1, 1, 0))
        ax.set_title("original" if row == 0 else "")
        ax.set_ylabel(finding, fontweight="bold")
        ax.text(
            0.5,
            -0.04,
            f"ground truth: {truth}",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize="small",
            wrap=True,
        )
        for col, resolution in enumerate(resolutions, start=1):
            ax = axes[row, col]
            ax.imshow(original, cmap="gray", extent=(0, 1, 1, 0))
            if resolution in maps[finding]:
                ax.imshow(
                    maps[finding][resolution],
                    cmap="jet",
                    alpha=alpha,
                    vmin=0,
                    vmax=1,
                    extent=(0, 1, 1, 0),
                    interpolation="bilinear",
                )
                _label_cam(ax, finding, resolution, probabilities[finding][resolution], threshold, names)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle(title)
    return fig


def _label_cam(
    ax, finding: str, column, probabilities: Sequence[float], threshold: float, names: Sequence[str] | None
) -> None:
    """A Grad-CAM panel's title (the row's finding's probability) and the findings predicted above
    ``threshold``, under it."""
    probs = np.asarray(probabilities, dtype=float)
    names = list(FINDINGS if names is None else names)
    predicted = [f"{name} ({p:.2f})" for name, p in zip(names, probs, strict=True) if p > threshold]
    name = resolution_label(column) if isinstance(column, int | np.integer) else column
    ax.set_title(f"{name}: p={probs[names.index(finding)]:.2f}")
    text = f"p > {threshold:g}: " + ("\n".join(predicted) or "none")
    ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize="x-small")


# ----------------------------------------------------------------------------- Fig 5


def fig5_ensemble_weights(weights: pd.DataFrame) -> Figure:
    """Stacked bars of the ensemble weights per finding across resolutions, in percent (paper Fig. 5).

    ``weights``: ``ensemble_weights.csv`` (finding, resolution, weight; weights of a finding sum to 1).
    """
    missing = {"finding", "resolution", "weight"} - set(weights.columns)
    if missing:
        raise ValueError(
            f"ensemble weights need columns finding, resolution, weight; missing {sorted(missing)}"
        )
    table = weights.pivot_table(index="finding", columns="resolution", values="weight", aggfunc="mean")
    table = table.reindex(finding_order(weights["finding"]))
    table = table[sorted(table.columns, key=int)] * 100
    fig = _figure(8.5, 0.42 * len(table) + 1.6)
    ax = fig.add_subplot()
    colors = sns.color_palette("viridis", len(table.columns))
    left = np.zeros(len(table))
    y = np.arange(len(table))
    for color, resolution in zip(colors, table.columns, strict=True):
        values = table[resolution].to_numpy()
        ax.barh(y, values, left=left, color=color, label=resolution_label(resolution), edgecolor="white")
        for yi, (start, value) in enumerate(zip(left, values, strict=True)):
            if value >= 6:
                text_color = "white" if np.mean(color[:3]) < 0.5 else "black"
                ax.text(
                    start + value / 2,
                    yi,
                    f"{value:.1f}%",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color=text_color,
                )
        left += values
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("ensemble weight (%)")
    ax.grid(False)
    ax.legend(ncols=len(table.columns), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle("Stacked scale-ensemble weights per finding")
    return fig


# ----------------------------------------------------------------------------- AUC vs resolution


def auc_vs_resolution(
    auc_long: pd.DataFrame,
    findings: Sequence[str] | None = None,
    ci: pd.DataFrame | None = None,
    ncols: int = 4,
    include_average: bool = True,
) -> Figure:
    """AUC versus input resolution, one panel per finding, ensembles as horizontal lines.

    Points are the mean over folds with the std over folds as error bars, or, given ``ci``
    (:func:`cxrlib.metrics.bootstrap_table` output with finding, resolution, auc, ci_low,
    ci_high, e.g. of pooled folds), that AUC with its bootstrap interval. Ensembles
    (``ensemble`` / ``average`` rows) are lines at their mean, with a band of +-1 std.
    The first panel is the Average over findings (per fold, then over folds).
    """
    frame = auc_long.copy()
    frame["resolution"] = frame["resolution"].astype(str)
    numbers, names = _split_resolutions(frame["resolution"])
    if not numbers:
        raise ValueError("the AUC table has no numeric resolutions")
    present = finding_order(frame["finding"])
    findings = [f for f in findings if f in present] if findings else present
    if include_average:
        average = frame.groupby(["resolution", "fold"], sort=False)["auc"].mean().reset_index()
        frame = pd.concat([frame, average.assign(finding="Average")], ignore_index=True)
        findings = ["Average", *findings]
    summary = frame.groupby(["finding", "resolution"])["auc"].agg(["mean", "std"])
    if ci is not None:
        ci = ci.assign(resolution=ci["resolution"].astype(str))
        if ci.duplicated(["finding", "resolution"]).any():
            raise ValueError(
                "ci must have one row per finding and resolution; for several folds pool them "
                "first (metrics.pool_folds) or pass one fold's rows"
            )
    nrows = int(np.ceil(len(findings) / ncols))
    fig = _figure(3.0 * min(ncols, len(findings)), 2.5 * nrows + 0.6)
    axes = fig.subplots(nrows, min(ncols, len(findings)), squeeze=False, sharex=True)
    x = np.log2(numbers)
    for ax, finding in zip(axes.flat, findings, strict=False):
        if ci is not None and finding != "Average":
            part = ci[ci["finding"] == finding].set_index("resolution").reindex([str(n) for n in numbers])
            mean = part["auc"].to_numpy(dtype=float)
            err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
        else:
            part = summary.loc[finding] if finding in summary.index.get_level_values(0) else None
            part = part.reindex([str(n) for n in numbers]) if part is not None else None
            mean = part["mean"].to_numpy(dtype=float) if part is not None else np.full(len(numbers), np.nan)
            err = np.nan_to_num(part["std"].to_numpy(dtype=float)) if part is not None else None
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color="C0", label="single resolution")
        for name in names:
            if (finding, name) not in summary.index:
                continue
            level, spread = summary.loc[(finding, name)]
            style = ENSEMBLE_STYLES.get(name, {"color": "C3", "linestyle": "-.", "label": name})
            ax.axhline(level, **style)
            if np.isfinite(spread):
                ax.axhspan(level - spread, level + spread, color=style["color"], alpha=0.08, lw=0)
        ax.set_title(finding)
        ax.set_xticks(x, [str(n) for n in numbers])
        _auc_axis(ax)
    for ax in list(axes.flat)[len(findings) :]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("AUC")
    for ax in axes[-1]:
        ax.set_xlabel("resolution (px)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    spread = "bootstrap CI" if ci is not None else "mean ± std over folds"
    fig.suptitle(f"AUC versus input resolution ({spread})")
    return fig


# ----------------------------------------------------------------------------- optional figures


def delong_heatmap(pairwise: pd.DataFrame, value: str = "p_holm", fold=None) -> Figure:
    """Corrected DeLong p-values: findings x resolution pairs, colour = -log10 p, text = AUC difference.

    ``pairwise``: :func:`cxrlib.metrics.pairwise_delong` output; ``fold`` picks one fold
    (default: the first in the table, e.g. ``"all"`` for pooled folds).
    """
    fold = pairwise["fold"].iloc[0] if fold is None else fold
    part = pairwise[pairwise["fold"].astype(str) == str(fold)].copy()
    part["pair"] = [f"{a} vs {b}" for a, b in zip(part["resolution_a"], part["resolution_b"], strict=True)]
    pairs = list(dict.fromkeys(part["pair"]))
    findings = finding_order(part["finding"])
    p = part.pivot(index="finding", columns="pair", values=value).reindex(index=findings, columns=pairs)
    diff = part.pivot(index="finding", columns="pair", values="diff").reindex(index=findings, columns=pairs)
    score = -np.log10(p.clip(lower=1e-300))
    labels = diff.map(lambda d: "" if pd.isna(d) else f"{100 * d:+.1f}")
    fig = _figure(1.3 * len(pairs) + 3.5, 0.4 * len(findings) + 1.8)
    ax = fig.add_subplot()
    sns.heatmap(
        score,
        annot=labels,
        fmt="",
        cmap="rocket_r",
        vmin=0,
        ax=ax,
        cbar_kws={"label": f"-log10 {value}"},
        linewidths=0.5,
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.grid(False)
    fig.suptitle(f"Paired DeLong tests (fold {fold}); text: AUC(a) - AUC(b) in points; 1.3 = p 0.05")
    return fig


def cross_resolution_heatmap(table: pd.DataFrame, findings: Sequence[str] = ("Average",)) -> Figure:
    """Test AUC of each model (rows: trained at) at each test resolution (columns), one panel per finding.

    ``table``: ``cross_resolution_auc.csv`` (train_resolution, test_resolution, fold, finding,
    auc); cells are means over folds. ``"Average"`` is, per fold, the mean over the findings
    with an AUC (as Table 3's Average), then the mean over folds. The diagonal is each model
    at its own resolution.
    """
    keys = ["train_resolution", "test_resolution", "fold"]
    average = table.groupby(keys)["auc"].mean().reset_index().assign(finding="Average")
    both = pd.concat([table, average], ignore_index=True)
    shown = [f for f in findings if f in set(both["finding"])]
    if not shown:
        raise ValueError(f"none of {list(findings)} is in the table (it has {sorted(set(table['finding']))})")
    fig = _figure(3.4 * len(shown) + 0.6, 3.3)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, finding in zip(axes, shown, strict=True):
        part = both[both["finding"] == finding]
        cells = part.groupby(["train_resolution", "test_resolution"])["auc"].mean()
        grid = cells.unstack("test_resolution").sort_index().sort_index(axis=1)
        sns.heatmap(
            grid, annot=True, fmt=".2f", cmap="viridis", vmin=0.5, vmax=1.0, ax=ax, cbar=ax is axes[-1],
            linewidths=0.5, square=True, cbar_kws={"label": "test AUC"},
        )  # fmt: skip
        ax.set(xlabel="tested at (px)", ylabel="trained at (px)", title=finding)
        ax.grid(False)
    fig.suptitle("Each model at every test resolution (diagonal: its own)")
    return fig


def training_curves(histories: Mapping[tuple[int, int], pd.DataFrame]) -> Figure:
    """Train (dashed) and validation (solid) loss, and the learning rate, per epoch; colour = resolution."""
    if not histories:
        raise ValueError("no training histories to plot")
    resolutions = sorted({int(r) for r, _ in histories})
    colors = dict(zip(resolutions, sns.color_palette("viridis", len(resolutions)), strict=True))
    fig = _figure(10, 3.6)
    loss_ax, lr_ax = fig.subplots(1, 2)
    for (resolution, fold), history in sorted(histories.items()):
        color = colors[int(resolution)]
        label = (
            resolution_label(resolution) if fold == min(f for r, f in histories if r == resolution) else None
        )
        if "train_loss" in history:
            loss_ax.plot(history["epoch"], history["train_loss"], color=color, linestyle="--", alpha=0.8)
        if "val_loss" in history:
            loss_ax.plot(history["epoch"], history["val_loss"], color=color, label=label)
        if "lr" in history:
            lr_ax.plot(history["epoch"], history["lr"], color=color, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (dashed: train, solid: validation)")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_yscale("log")
    loss_ax.legend(title="resolution")
    fig.suptitle("Training curves (one line per fold)")
    return fig


def phantom_examples(
    examples: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]],
    findings: Sequence[str] | None = None,
) -> Figure:
    """Each phantom finding with and without it, per resolution: does it survive downscaling?

    ``examples``: ``{finding: {resolution: (with_image, without_image)}}`` of 2-D uint8 arrays
    (:func:`cxrlib.phantom.finding_examples`). Rows = findings; per resolution two columns:
    the image with the finding, and the difference with - without (red brighter, blue darker,
    symmetric scale per panel, the largest absolute difference written in grey levels).
    """
    findings = [f for f in (findings or list(examples)) if f in examples]
    if not findings:
        raise ValueError("no phantom examples to plot")
    resolutions = sorted({int(r) for f in findings for r in examples[f]})
    fig = _figure(2.0 * 2 * len(resolutions), 2.0 * len(findings) + 0.5)
    axes = fig.subplots(len(findings), 2 * len(resolutions), squeeze=False)
    for row, finding in enumerate(findings):
        for col, resolution in enumerate(resolutions):
            image_ax, diff_ax = axes[row, 2 * col], axes[row, 2 * col + 1]
            pair = examples[finding].get(resolution)
            if pair is None:
                image_ax.set_axis_off()
                diff_ax.set_axis_off()
                continue
            with_img, without_img = (np.asarray(a, dtype=float) for a in pair)
            difference = with_img - without_img
            limit = max(float(np.abs(difference).max()), 1.0)
            image_ax.imshow(with_img, cmap="gray", vmin=0, vmax=255)
            diff_ax.imshow(difference, cmap="RdBu_r", vmin=-limit, vmax=limit)
            diff_ax.text(
                0.03,
                0.03,
                f"max |d| {np.abs(difference).max():.0f}",
                transform=diff_ax.transAxes,
                fontsize="x-small",
                color="black",
                backgroundcolor=(1, 1, 1, 0.6),
            )
            if row == 0:
                image_ax.set_title(resolution_label(resolution))
                diff_ax.set_title("with − without")
            for ax in (image_ax, diff_ax):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
        axes[row, 0].set_ylabel(finding, fontweight="bold", fontsize="small")
    fig.suptitle("Phantom findings across resolutions")
    return fig


# ----------------------------------------------------------------------------- notebooks


def resolution_strip(images: Mapping[int, np.ndarray], title: str | None = None) -> Figure:
    """The same image at each resolution, side by side at the same display size (pixels visible)."""
    resolutions = sorted(images)
    fig = _figure(2.6 * len(resolutions), 3.0)
    axes = fig.subplots(1, len(resolutions), squeeze=False)[0]
    for ax, resolution in zip(axes, resolutions, strict=True):
        ax.imshow(images[resolution], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(resolution_label(resolution))
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- teaching (09)


def receptive_field_growth(layers: pd.DataFrame, rf: int) -> Figure:
    """The theoretical receptive field layer by layer (``receptive_field.theoretical_receptive_field``
    with ``return_table=True``), on a log scale."""
    fig = _figure(7, 3)
    ax = fig.add_subplot()
    ax.plot(range(len(layers)), layers["rf"], drawstyle="steps-post")
    ax.set(xlabel="layer (in order)", ylabel="receptive field (px)", yscale="log",
           title=f"DenseNet121: theoretical receptive field reaches {rf} px")  # fmt: skip
    return fig


def conv_stack_erfs(maps: Mapping[int, np.ndarray]) -> Figure:
    """The ERF of stacks of 3x3 convolutions, one panel per depth (``receptive_field.erf_of_conv_stack``)."""
    fig = _figure(2.2 * len(maps), 2.4)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (depth, erf) in zip(axes, maps.items(), strict=True):
        ax.imshow(erf, cmap="magma")
        ax.set_title(f"{depth} conv 3x3\nRF {2 * depth + 1} px")
        ax.axis("off")
    return fig


ERF_STATE_LABELS = {"init": "initialisation", "trained": "after training"}
ERF_STATE_COLOURS = {"init": "cyan", "trained": "orange"}


def erf_over_image(image: np.ndarray, results: Mapping, resolution: int) -> Figure:
    """An image with the 90% (solid) and 50% (dashed) discs of each ERF drawn over it, then each ERF
    map, all in the same frame. ``results``: ``{"init" | "trained": ERFResult}`` at ``resolution``."""
    fig = _figure(3.0 * (1 + len(results)), 3.4)
    axes = fig.subplots(1, 1 + len(results), squeeze=False)[0]
    frame = (0, 1, 1, 0)
    axes[0].imshow(image, cmap="gray", extent=frame, vmin=0, vmax=255)
    axes[0].set_title(f"phantom at {resolution_label(resolution)}")
    for ax, (state, result) in zip(axes[1:], results.items(), strict=True):
        ax.imshow(result.erf / result.erf.max(), cmap="magma", extent=frame, vmin=0)
        ax.set_title(f"ERF, {ERF_STATE_LABELS[state]}")
        label = f"90%: {100 * result.fraction90:.0f}% of side"
        ax.text(0.03, 0.97, label, transform=ax.transAxes, va="top", color="white", fontsize="small")
        for target in (axes[0], ax):
            _draw_erf_discs(target, result, ERF_STATE_COLOURS[state])
    for ax in axes:
        ax.set(xlim=(0, 1), ylim=(1, 0), xticks=[0, 0.5, 1], yticks=[0, 0.5, 1])
        ax.grid(False)
    fig.suptitle(f"Effective receptive field of DenseNet121 at {resolution} px")
    return fig


def _draw_erf_discs(ax, result, colour: str) -> None:
    side = result.resolution
    centre = ((result.centroid[1] + 0.5) / side, (result.centroid[0] + 0.5) / side)
    for radius, style in ((result.radius50_px, "--"), (result.radius90_px, "-")):
        ax.add_patch(Circle(centre, radius / side, fill=False, color=colour, linestyle=style, lw=1.4))


# ----------------------------------------------------------------------------- arms (10)


def arms_auc(
    table: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    coarse: Sequence[str] = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Edema"),
    fine: Sequence[str] = ("Pneumothorax", "Lung Lesion", "Support Devices"),
) -> Figure:
    """Test AUC per arm (``field_sweep.csv``: arm, erf_fraction, finding, auc, auc_low, auc_high),
    coarse and fine findings apart, each arm labelled with its measured ERF (90% disc / image side).

    ``reference``: the same findings' AUC at a lower resolution of the resolution sweep (resolution,
    finding, auc), drawn as dashed lines: where the coarse findings would recover to.
    """
    arms = list(dict.fromkeys(table["arm"]))
    erf = table.groupby("arm", sort=False)["erf_fraction"].first()
    fig = _figure(12, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    colours = dict(
        zip([*coarse, *fine], sns.color_palette("colorblind", len(coarse) + len(fine)), strict=True)
    )
    for ax, group, name in ((axes[0], coarse, "coarse findings"), (axes[1], fine, "fine findings (control)")):
        for k, finding in enumerate(group):
            part = table[table["finding"] == finding].set_index("arm").reindex(arms)
            x = np.arange(len(arms)) + 0.08 * (k - (len(group) - 1) / 2)
            errors = [part["auc"] - part["auc_low"], part["auc_high"] - part["auc"]]
            ax.errorbar(
                x, part["auc"], yerr=errors, marker="o", capsize=3, color=colours[finding], label=finding
            )
            if reference is not None:
                for _, row in reference[reference["finding"] == finding].iterrows():
                    ax.axhline(row["auc"], color=colours[finding], linestyle="--", linewidth=0.9, alpha=0.7)
        ax.axhline(0.5, color="0.6", linewidth=0.8)
        ax.set_xticks(
            range(len(arms)), [f"{arm}\nERF {100 * erf[arm]:.0f}%" for arm in arms], fontsize="small"
        )
        ax.set(xlim=(-0.5, len(arms) - 0.5), title=name)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(group))
    axes[0].set_ylabel("test AUC (patient-bootstrap 95% interval)")
    where = ""
    if reference is not None:
        sizes = ", ".join(f"{r} px" for r in sorted(set(reference["resolution"])))
        where = f"; dashed: the resolution sweep at {sizes}"
    _auc_axis(axes[0])  # the y axis is shared
    fig.suptitle(f"What brings the coarse findings back? One change per arm{where}")
    return fig
