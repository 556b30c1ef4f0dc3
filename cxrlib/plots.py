"""Every figure as a function from data to a ``matplotlib.figure.Figure`` (no pyplot: a notebook shows
each returned figure once), in one style. Which notebook makes which figure: docs/method.md."""

import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .fileio import atomic_write
from .labels import FINDINGS, finding_order

MIN_AUC_SPAN = 0.1  # an AUC axis spans at least this, so that 0.001 does not look like a drop
ENSEMBLE_STYLES: dict[str, dict] = {
    "ensemble": {"color": "black", "linestyle": "--", "label": "stacked ensemble"},
    "average": {"color": "0.45", "linestyle": ":", "label": "average ensemble"},
}
_ERF_STATES = {"init": ("initialisation", "cyan"), "trained": ("after training", "orange")}
_NO_TICKS = {"xticks": [], "yticks": []}
_UNIT_FRAME = (0, 1, 1, 0)  # imshow extent: every image and map drawn in the image's [0, 1] frame


def show_inline() -> None:
    """In a notebook, show returned figures as images (``%matplotlib inline``) in the one style."""
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None  # None: not in IPython
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        shell.run_line_magic("matplotlib", "inline")
    _set_style()


def _set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "axes.titlesize": "medium",
                                "axes.titleweight": "bold", "image.interpolation": "nearest"})  # fmt: skip


def _figure(width: float, height: float) -> Figure:
    _set_style()
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (parent folders created); returns the path."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=150, bbox_inches="tight")
    return Path(path)


def _label(resolution: int | str) -> str:
    return f"{resolution}x{resolution}" if str(resolution).isdigit() else str(resolution)


def _auc_axis(ax) -> None:
    # at least MIN_AUC_SPAN around the data, not above 1 unless they are
    low, high = ax.get_ylim()
    if high - low < MIN_AUC_SPAN:
        top = min(max(high, 1.0), (low + high + MIN_AUC_SPAN) / 2)
        ax.set_ylim(top - MIN_AUC_SPAN, top)


def _corner_text(ax, text: str) -> None:
    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", color="white", fontsize="small")


def _under(ax, text: str, fontsize: str = "small") -> None:
    ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=fontsize, wrap=True)


def native_size_columns(index: pd.DataFrame) -> list[str]:
    """``native_width`` / ``native_height`` where the index has them (files resized), else width / height."""
    native = all(c in index.columns for c in ("native_width", "native_height"))
    if native and pd.to_numeric(index["native_width"], errors="coerce").notna().any():
        return ["native_width", "native_height"]
    return ["width", "height"]


def fig3_image_sizes(index: pd.DataFrame) -> Figure:
    """Native width x height of the index's images, a scatter with marginal histograms (paper Fig. 3)."""
    columns = native_size_columns(index)
    if missing := [c for c in columns if c not in index.columns]:
        raise ValueError(f"the index has no {missing[0]!r} column (native image size)")
    sizes = index[columns].apply(pd.to_numeric, errors="coerce").dropna()
    sizes = sizes.set_axis(["width", "height"], axis=1)
    shown = sizes.sample(50_000, random_state=0) if len(sizes) > 50_000 else sizes  # a scatter drawn fast
    fig = _figure(6.5, 6.0)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    scatter = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=scatter), fig.add_subplot(grid[1, 1], sharey=scatter)
    sns.scatterplot(data=shown, x="width", y="height", ax=scatter, s=8, alpha=0.3, lw=0, rasterized=True)
    bins = min(60, max(5, int(np.sqrt(len(sizes)))))
    sns.histplot(data=sizes, x="width", ax=top, bins=bins, element="step").set(xlabel="")
    sns.histplot(data=sizes, y="height", ax=right, bins=bins, element="step").set(ylabel="")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    scatter.set(xlabel="native width (px)", ylabel="native height (px)")
    fig.suptitle(f"Native image sizes ({len(sizes):,} images)")
    return fig


def _draw_erf_discs(ax, result, colour: str) -> None:
    # the discs holding 50% (dashed) and 90% (solid) of the ERF's mass, in the image's [0, 1] frame
    side = result.resolution
    centre = ((result.centroid[1] + 0.5) / side, (result.centroid[0] + 0.5) / side)
    for radius, style in ((result.radius50_px, "--"), (result.radius90_px, "-")):
        ax.add_patch(Circle(centre, radius / side, fill=False, color=colour, linestyle=style, lw=1.4))


def fig1_erf(results: Mapping) -> Figure:
    """ERF maps in the image's frame with their mass discs, per resolution (and state: one row each)."""
    lookup = {(int(k[0]), k[1]) if isinstance(k, tuple) else (int(k), ""): v for k, v in results.items()}
    if not lookup:
        raise ValueError("no ERF results to plot")
    resolutions, states = sorted({r for r, _ in lookup}), list(dict.fromkeys(s for _, s in lookup))
    fig = _figure(3.0 * len(resolutions) + 0.8, 3.2 * len(states) + 0.3)
    axes = fig.subplots(len(states), len(resolutions), squeeze=False)
    for (row, state), (col, resolution) in itertools.product(enumerate(states), enumerate(resolutions)):
        ax, result = axes[row, col], lookup.get((resolution, state))
        ax.set(xticks=[0, 0.5, 1], yticks=[0, 0.5, 1], xlim=(0, 1), ylim=(1, 0))
        ax.set_ylabel("fraction of image" if col == 0 else "")
        ax.grid(False)
        if result is None:
            ax.set_axis_off()
            continue
        image = ax.imshow(
            result.erf / result.erf.max(), extent=_UNIT_FRAME, cmap="magma", vmin=0, interpolation="bilinear"
        )
        _draw_erf_discs(ax, result, "cyan")
        ax.set_title(_label(resolution) + (f" ({state})" if state else ""))
        _corner_text(ax, f"90%: {100 * result.fraction90:.0f}% of side\n50%: {100 * result.fraction50:.0f}%")
    fig.colorbar(image, ax=axes, shrink=0.8, label="ERF / max")  # every image has the same colour scale
    fig.suptitle("Effective receptive field relative to the image (circles: 50% / 90% of mass)")
    return fig


def erf_over_image(image: np.ndarray, results: Mapping, resolution: int) -> Figure:
    """An image with the mass discs of each ERF (``{"init" | "trained": ERFResult}``), then each map."""
    fig = _figure(3.0 * (1 + len(results)), 3.4)
    axes = fig.subplots(1, 1 + len(results), squeeze=False)[0]
    axes[0].imshow(image, cmap="gray", extent=_UNIT_FRAME, vmin=0, vmax=255)
    axes[0].set_title(f"phantom at {_label(resolution)}")
    for ax, (state, result) in zip(axes[1:], results.items(), strict=True):
        ax.imshow(result.erf / result.erf.max(), cmap="magma", extent=_UNIT_FRAME, vmin=0)
        ax.set_title(f"ERF, {_ERF_STATES[state][0]}")
        _corner_text(ax, f"90%: {100 * result.fraction90:.0f}% of side")
        for target in (axes[0], ax):
            _draw_erf_discs(target, result, _ERF_STATES[state][1])
    for ax in axes:
        ax.set(xlim=(0, 1), ylim=(1, 0), xticks=[0, 0.5, 1], yticks=[0, 0.5, 1])
        ax.grid(False)
    fig.suptitle(f"Effective receptive field of DenseNet121 at {resolution} px")
    return fig


def receptive_field_growth(layers: pd.DataFrame, rf: int) -> Figure:
    """The theoretical receptive field layer by layer, on a log scale."""
    fig = _figure(7, 3)
    ax = fig.add_subplot()
    ax.plot(range(len(layers)), layers["rf"], drawstyle="steps-post")
    ax.set(xlabel="layer (in order)", ylabel="receptive field (px)", yscale="log",
           title=f"DenseNet121: theoretical receptive field reaches {rf} px")  # fmt: skip
    return fig


def conv_stack_erfs(maps: Mapping[int, np.ndarray]) -> Figure:
    """The ERF of stacks of 3x3 convolutions, one panel per depth."""
    fig = _figure(2.2 * len(maps), 2.4)
    for ax, (depth, erf) in zip(fig.subplots(1, len(maps), squeeze=False)[0], maps.items(), strict=True):
        ax.imshow(erf, cmap="magma")
        ax.set_title(f"{depth} conv 3x3\nRF {2 * depth + 1} px")
        ax.axis("off")
    return fig


def fig4_gradcam(
    originals: Mapping[str, np.ndarray], maps: Mapping[str, Mapping[int, np.ndarray]],
    probabilities: Mapping[str, Mapping[int, Sequence[float]]], ground_truth: Mapping[str, Sequence[str]],
    findings: Sequence[str] = ("Cardiomegaly", "Pneumothorax"), title: str = "Grad-CAM across resolutions",
    names: Sequence[str] | None = None,
) -> Figure:  # fmt: skip
    """Grad-CAM grid (paper Fig. 4): a row per finding, the original then each column of ``maps``."""
    findings, names = [f for f in findings if f in maps], list(FINDINGS if names is None else names)
    if not findings:
        raise ValueError("none of the requested findings has Grad-CAM maps")
    columns = list(dict.fromkeys(key for f in findings for key in maps[f]))
    columns = sorted(columns) if all(isinstance(k, int | np.integer) for k in columns) else columns
    fig = _figure(2.6 * (len(columns) + 1), 3.0 * len(findings) + 0.3)
    axes = fig.subplots(len(findings), len(columns) + 1, squeeze=False)
    for row, finding in enumerate(findings):
        for ax in axes[row]:
            ax.imshow(originals[finding], cmap="gray", extent=_UNIT_FRAME)
            ax.set(**_NO_TICKS)
            ax.grid(False)
        axes[row, 0].set(title="original" if row == 0 else "")
        axes[row, 0].set_ylabel(finding, fontweight="bold")
        _under(axes[row, 0], f"ground truth: {', '.join(ground_truth.get(finding, [])) or 'none'}")
        for ax, column in zip(axes[row, 1:], columns, strict=True):
            if column in maps[finding]:
                ax.imshow(maps[finding][column], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=_UNIT_FRAME,
                          interpolation="bilinear")  # fmt: skip
                probs = np.asarray(probabilities[finding][column], dtype=float)  # title: this row's finding's
                predicted = [f"{n} ({p:.2f})" for n, p in zip(names, probs, strict=True) if p > 0.5]
                ax.set_title(f"{_label(column)}: p={probs[names.index(finding)]:.2f}")
                _under(ax, "p > 0.5: " + ("\n".join(predicted) or "none"), "x-small")
    fig.suptitle(title)
    return fig


def fig5_ensemble_weights(weights: pd.DataFrame) -> Figure:
    """Stacked bars of each finding's ensemble weights over the resolutions, in percent (paper Fig. 5)."""
    if missing := {"finding", "resolution", "weight"} - set(weights.columns):
        raise ValueError(f"ensemble weights lack column(s) {sorted(missing)}")
    table = weights.pivot_table(index="finding", columns="resolution", values="weight", aggfunc="mean")
    table = table.reindex(finding_order(weights["finding"]))
    table = table[sorted(table.columns, key=int)] * 100
    fig = _figure(8.5, 0.42 * len(table) + 1.6)
    ax = fig.add_subplot()
    left, y = np.zeros(len(table)), np.arange(len(table))
    palette = sns.color_palette("viridis", len(table.columns))
    for color, resolution in zip(palette, table.columns, strict=True):
        values = table[resolution].to_numpy()
        ax.barh(y, values, left=left, color=color, label=_label(resolution), edgecolor="white")
        text_color = "white" if np.mean(color[:3]) < 0.5 else "black"
        for yi, start, value in zip(y, left, values, strict=True):
            if value >= 6:
                ax.text(start + value / 2, yi, f"{value:.1f}%", ha="center", va="center", fontsize="x-small",
                        color=text_color)  # fmt: skip
        left += values
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="ensemble weight (%)")
    ax.grid(False)
    ax.legend(ncols=len(table.columns), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle("Stacked scale-ensemble weights per finding")
    return fig


def auc_vs_resolution(
    auc_long: pd.DataFrame, findings: Sequence[str] | None = None, ci: pd.DataFrame | None = None
) -> Figure:
    """AUC versus resolution per finding (std over folds, or ``ci``), ensembles as lines (and bands)."""
    frame = auc_long.assign(resolution=auc_long["resolution"].astype(str))
    numbers = sorted({int(r) for r in frame["resolution"] if r.lstrip("-").isdigit()})
    if not numbers:
        raise ValueError("the AUC table has no numeric resolutions")
    names = [r for r in dict.fromkeys(frame["resolution"]) if not r.lstrip("-").isdigit()]
    present = finding_order(frame["finding"])
    findings = ["Average", *([f for f in findings if f in present] if findings else present)]
    average = frame.groupby(["resolution", "fold"], sort=False)["auc"].mean().reset_index()
    frame = pd.concat([frame, average.assign(finding="Average")], ignore_index=True)
    summary = frame.groupby(["finding", "resolution"])["auc"].agg(["mean", "std"])
    if ci is not None:
        ci = ci.assign(resolution=ci["resolution"].astype(str))
        if ci.duplicated(["finding", "resolution"]).any():
            raise ValueError("ci must have one row per finding and resolution (pool the folds first)")
    ncols = min(4, len(findings))
    fig = _figure(3.0 * ncols, 2.5 * int(np.ceil(len(findings) / ncols)) + 0.6)
    axes = fig.subplots(int(np.ceil(len(findings) / ncols)), ncols, squeeze=False, sharex=True)
    for ax, finding in zip(axes.flat, findings, strict=False):
        _auc_panel(ax, finding, numbers, names, summary, None if finding == "Average" else ci)
    for ax in list(axes.flat)[len(findings) :]:
        ax.set_axis_off()
    fig.supylabel("AUC")
    fig.supxlabel("resolution (px)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle(f"AUC versus resolution ({'bootstrap CI' if ci is not None else 'mean ± std over folds'})")
    return fig


def _auc_panel(ax, finding: str, numbers: list[int], names: list[str], summary: pd.DataFrame, ci) -> None:
    x, labels = np.log2(numbers), [str(n) for n in numbers]
    if ci is not None:
        part = ci[ci["finding"] == finding].set_index("resolution").reindex(labels)
        mean = part["auc"].to_numpy(dtype=float)
        err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
    else:
        part = summary.loc[finding].reindex(labels)
        mean, err = part["mean"].to_numpy(dtype=float), np.nan_to_num(part["std"].to_numpy(dtype=float))
    ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color="C0", label="single resolution")
    for name in names:
        if (finding, name) in summary.index:
            level, spread = summary.loc[(finding, name)]
            style = ENSEMBLE_STYLES.get(name, {"color": "C3", "linestyle": "-.", "label": name})
            ax.axhline(level, **style)
            if np.isfinite(spread):
                ax.axhspan(level - spread, level + spread, color=style["color"], alpha=0.08, lw=0)
    ax.set_title(finding)
    ax.set_xticks(x, labels)
    _auc_axis(ax)


def cross_resolution_heatmap(table: pd.DataFrame, findings: Sequence[str] = ("Average",)) -> Figure:
    """Test AUC of each model (rows: trained at) at each test resolution (columns), a panel per finding."""
    keys = ["train_resolution", "test_resolution", "fold"]
    average = table.groupby(keys)["auc"].mean().reset_index().assign(finding="Average")
    both = pd.concat([table, average], ignore_index=True)
    if not (shown := [f for f in findings if f in set(both["finding"])]):
        raise ValueError(f"none of {list(findings)} is in the table (it has {sorted(set(table['finding']))})")
    fig = _figure(3.4 * len(shown) + 0.6, 3.3)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, finding in zip(axes, shown, strict=True):
        cells = both[both["finding"] == finding].groupby(keys[:2])["auc"].mean()
        sns.heatmap(
            cells.unstack().sort_index().sort_index(axis=1), annot=True, fmt=".2f",
            cmap="viridis", vmin=0.5, vmax=1.0, ax=ax, cbar=ax is axes[-1], linewidths=0.5, square=True,
            cbar_kws={"label": "test AUC"},
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
        label = _label(resolution) if fold == min(f for r, f in histories if r == resolution) else None
        loss_ax.plot(history["epoch"], history["train_loss"], color=color, linestyle="--", alpha=0.8)
        loss_ax.plot(history["epoch"], history["val_loss"], color=color, label=label)
        lr_ax.plot(history["epoch"], history["lr"], color=color, label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss (dashed: train, solid: validation)")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", yscale="log")
    loss_ax.legend(title="resolution")
    fig.suptitle("Training curves (one line per fold)")
    return fig


def phantom_examples(
    examples: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]], findings: Sequence[str] | None = None
) -> Figure:
    """Each phantom finding per resolution: the image with it, and with - without (red: brighter)."""
    if not (findings := [f for f in (findings or list(examples)) if f in examples]):
        raise ValueError("no phantom examples to plot")
    resolutions = sorted({int(r) for f in findings for r in examples[f]})
    fig = _figure(2.0 * 2 * len(resolutions), 2.0 * len(findings) + 0.5)
    axes = fig.subplots(len(findings), 2 * len(resolutions), squeeze=False)
    for ax in axes.flat:
        ax.set(**_NO_TICKS)
        ax.grid(False)
    for row, finding in enumerate(findings):
        axes[row, 0].set_ylabel(finding, fontweight="bold", fontsize="small")
        for col, resolution in enumerate(resolutions):
            image_ax, diff_ax = axes[row, 2 * col], axes[row, 2 * col + 1]
            with_img, without_img = (np.asarray(a, dtype=float) for a in examples[finding][resolution])
            difference = with_img - without_img
            limit = max(float(np.abs(difference).max()), 1.0)
            image_ax.imshow(with_img, cmap="gray", vmin=0, vmax=255)
            diff_ax.imshow(difference, cmap="RdBu_r", vmin=-limit, vmax=limit)
            diff_ax.text(0.03, 0.03, f"max |d| {np.abs(difference).max():.0f}", transform=diff_ax.transAxes,
                         fontsize="x-small", color="black", backgroundcolor=(1, 1, 1, 0.6))  # fmt: skip
            if row == 0:
                image_ax.set_title(_label(resolution))
                diff_ax.set_title("with − without")
    fig.suptitle("Phantom findings across resolutions")
    return fig


def resolution_strip(images: Mapping[int, np.ndarray], title: str | None = None) -> Figure:
    """The same image at each resolution, side by side at the same display size (pixels visible)."""
    fig = _figure(2.6 * len(images), 3.0)
    for ax, resolution in zip(fig.subplots(1, len(images), squeeze=False)[0], sorted(images), strict=True):
        ax.imshow(images[resolution], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(_label(resolution))
        ax.set_axis_off()
    fig.suptitle(title or "")
    return fig


def arms_auc(
    table: pd.DataFrame, reference: pd.DataFrame | None = None,
    coarse: Sequence[str] = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Edema"),
    fine: Sequence[str] = ("Pneumothorax", "Lung Lesion", "Support Devices"),
) -> Figure:  # fmt: skip
    """Test AUC per arm (``field_sweep.csv``), coarse and fine findings apart; ``reference``: dashed lines."""
    arms = list(dict.fromkeys(table["arm"]))
    erf = table.groupby("arm", sort=False)["erf_fraction"].first()
    fig = _figure(12, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    colours = dict(
        zip([*coarse, *fine], sns.color_palette("colorblind", len(coarse) + len(fine)), strict=True)
    )
    for ax, group, name in ((axes[0], coarse, "coarse findings"), (axes[1], fine, "fine findings (control)")):
        for k, f in enumerate(group):
            part = table[table["finding"] == f].set_index("arm").reindex(arms)
            x = np.arange(len(arms)) + 0.08 * (k - (len(group) - 1) / 2)
            errors = [part["auc"] - part["auc_low"], part["auc_high"] - part["auc"]]
            ax.errorbar(x, part["auc"], yerr=errors, marker="o", capsize=3, color=colours[f], label=f)
            for auc in [] if reference is None else reference.loc[reference["finding"] == f, "auc"]:
                ax.axhline(auc, color=colours[f], linestyle="--", linewidth=0.9, alpha=0.7)
        ax.axhline(0.5, color="0.6", linewidth=0.8)
        ax.set_xticks(range(len(arms)), [f"{a}\nERF {100 * erf[a]:.0f}%" for a in arms], fontsize="small")
        ax.set(xlim=(-0.5, len(arms) - 0.5), title=name)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(group))
    axes[0].set_ylabel("test AUC (patient-bootstrap 95% interval)")
    where = ""
    if reference is not None:
        resolutions = ", ".join(f"{r} px" for r in sorted(set(reference["resolution"])))
        where = f"; dashed: the resolution sweep at {resolutions}"
    _auc_axis(axes[0])  # the y axis is shared
    fig.suptitle(f"What brings the coarse findings back? One change per arm{where}")
    return fig
