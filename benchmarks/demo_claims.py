"""Train the demo for several training seeds and check, per seed, every statement the README makes.

The demo's message must not depend on the seed or on the CPU's floating-point kernels. This
script trains the `demo` preset's models once per training seed (the same phantom, the same
folds and cache; only initialisation, batch order and augmentation change), evaluates each run
with the project's own steps (:func:`cxrlib.study.evaluate`, :func:`cxrlib.study.gradcam_grid`),
and prints one table: each statement, its value and patient-clustered 95% interval per seed, and
whether it holds for every seed. A benchmark, not a test: it takes about 20 minutes per seed on
a 2-core CPU.

Statements (``--preset`` decides the resolutions; "low" and "high" are its lowest and highest):

* ``fine gain``: each fine finding (Pneumothorax, Lung Lesion, Support Devices) gains AUC from
  the lowest to the highest resolution; holds when the clustered DeLong 95% interval of
  AUC(high) - AUC(low) is above 0.
* ``ensemble``: the stacked ensemble's Average AUC is at least the best single resolution's.
* ``coarse``: each coarse finding (Cardiomegaly, Enlarged Cardiomediastinum, Edema) is learned
  at the middle resolution (AUC >= 0.80) and its change from there to the highest resolution,
  with its interval, is reported; holds when that interval lies above -0.10 (no large loss) and
  the AUC at the highest resolution is >= 0.80.
* ``grad-cam``: the Grad-CAM grid predicts its finding (p > 0.5) at some resolution where that
  finding's test AUC is at least 0.80.

Usage::

    python benchmarks/demo_claims.py --seeds 0 1 2 --out runs/demo-claims
    # the same kernels an AVX2-only CPU uses, on a CPU with AVX-512 or AMX:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/demo_claims.py --seeds 0 1 2

Each seed's run lives in ``--out/seed<s>`` (resumable: finished trainings are kept); the table
is also written to ``--out/claims.csv``.

``--arms receptive-field`` also runs notebook 10's arms (:mod:`cxrlib.field_sweep`) for each seed,
with that seed's top-resolution model as the baseline (in ``--out/seed<s>/arms``; for seed 0 with
``--seed0-run``, the preset's own run, ``runs/receptive-field``), and prints each arm's AUC change
against the baseline per seed and its spread over the seeds (``--out/arms.csv``)::

    python benchmarks/demo_claims.py --seeds 0 1 --seed0-run runs/demo --arms receptive-field
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib import metrics, study
from cxrlib.fileio import write_csv_atomic
from cxrlib.models import describe_cpu
from cxrlib.phantom import COARSE_FINDINGS, FINE_FINDINGS
from cxrlib.presets import Preset, resolve

LEARNED_AUC = 0.80  # a finding counts as learned at a resolution from this test AUC on
LARGE_LOSS = -0.10  # a coarse finding "loses" when its interval reaches below this change


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="preset name or YAML (default demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-claims"), help="work folder")
    parser.add_argument(
        "--seed0-run",
        type=Path,
        default=None,
        help="a finished run of the preset with the default training seed (e.g. runs/demo): its models "
        "are seed 0's (the same settings train the same model on this machine), not trained again",
    )
    parser.add_argument("--arms", default=None, help="also run this preset's arms (notebook 10) per seed")
    return parser


def run_arms(name: str, seed_run: Preset, seed: int, out: Path, existing: bool) -> pd.DataFrame:
    """Notebook 10's arms for one training seed, the seed's own run as their baseline; the tests of
    each arm against it (one row per arm and finding, with the seed)."""
    run = None if existing else str(out / f"seed{seed}" / "arms")
    preset = resolve(name, run_dir=run, figures_dir=run)
    preset.train.options = {**preset.train.options, "seed": seed}
    preset.field_sweep.reuse = preset.field_sweep.compare = str(seed_run.run_path)
    preset.cache.dir = str(seed_run.cache_path)
    if not preset.index_path.is_file():
        study.prepare_data(preset)
    study.prepare_cache(preset, progress=False)
    result = study.field_sweep(preset, echo=False)
    return result.sweep.delong.assign(seed=seed)


def seed_preset(name: str, out: Path, seed: int, run: Path | None = None) -> Preset:
    """The preset with its training seed set, its run in ``run`` (default ``out/seed<s>``) and, for a
    run of its own, a cache shared by all seeds."""
    run = run or out / f"seed{seed}"
    preset = resolve(name, run_dir=str(run), figures_dir=str(run / "claims-figures"))
    preset.train.options = {**preset.train.options, "seed": seed}
    if run == out / f"seed{seed}":
        preset.cache.dir = str((out / "cache").resolve())
    return preset


def run_seed(preset: Preset) -> tuple[study.Evaluation, study.GradCAMGrid, float]:
    """Data, cache, training at every resolution, evaluation and the Grad-CAM grid of one seed."""
    started = time.time()
    if not preset.index_path.is_file():
        study.prepare_data(preset)
    study.prepare_cache(preset, progress=False)
    for resolution in preset.resolutions:
        study.train_resolution(preset, resolution, echo=False)
    evaluation = study.evaluate(preset)
    grid = study.gradcam_grid(preset)
    return evaluation, grid, time.time() - started


def paired(preset: Preset, evaluation: study.Evaluation, finding: str, high, low) -> dict[str, float]:
    """AUC(high) - AUC(low) of one finding on the pooled test images, clustered by patient."""
    rows = evaluation.delong
    a, b = sorted((high, low), key=lambda r: metrics.column_order([high, low]).index(r))
    row = rows[(rows["finding"] == finding) & (rows["resolution_a"].astype(str) == str(a))]
    row = row[row["resolution_b"].astype(str) == str(b)].iloc[0]
    sign = 1.0 if a == high else -1.0
    low_ci, high_ci = sorted((sign * row["ci_low"], sign * row["ci_high"]))
    return {"value": sign * row["diff"], "ci_low": low_ci, "ci_high": high_ci, "p": row["p"]}


def statements(preset: Preset, evaluation: study.Evaluation, grid: study.GradCAMGrid) -> list[dict]:
    """Every statement of the module docstring for one seed: name, value, interval, holds."""
    low, high = min(preset.resolutions), max(preset.resolutions)
    middle = sorted(preset.resolutions)[len(preset.resolutions) // 2]
    table3 = evaluation.table3.set_index("finding")
    rows = []
    for finding in FINE_FINDINGS:
        if finding == "Fracture":  # the phantom's fracture is learned at no demo resolution (docs/phantom.md)
            continue
        diff = paired(preset, evaluation, finding, high, low)
        rows.append(
            {"statement": f"fine gain {finding} ({low}->{high} px)", **diff, "holds": diff["ci_low"] > 0}
        )
    singles = {r: table3.loc["Average", f"{r}_mean"] for r in preset.resolutions}
    best = max(singles, key=singles.get)
    stacked = table3.loc["Average", "ensemble_mean"]
    rows.append(
        {
            "statement": "ensemble >= best single on Average",
            "value": stacked - singles[best],
            "note": f"best single {best} px",
            "holds": stacked >= singles[best],
        }
    )
    for finding in COARSE_FINDINGS:
        learned = table3.loc[finding, f"{middle}_mean"]
        diff = paired(preset, evaluation, finding, high, middle)
        at_high = table3.loc[finding, f"{high}_mean"]
        rows.append(
            {
                "statement": f"coarse {finding} ({middle}->{high} px)",
                **diff,
                "note": f"AUC {learned:.2f} at {middle} px, {at_high:.2f} at {high} px",
                "holds": learned >= LEARNED_AUC and at_high >= LEARNED_AUC and diff["ci_low"] > LARGE_LOSS,
            }
        )
    for finding, probabilities in grid.probabilities.items():
        column = list(table3.index).index(finding)
        where = [
            r for r, p in probabilities.items()
            if p[column] > 0.5 and table3.loc[finding, f"{r}_mean"] >= LEARNED_AUC
        ]  # fmt: skip
        rows.append(
            {
                "statement": f"grad-cam predicts {finding} where learned",
                "value": float(max(p[column] for p in probabilities.values())),
                "note": "max p over resolutions",
                "holds": bool(where),
            }
        )
    return rows


def print_arms(table: pd.DataFrame) -> None:
    """Each arm's AUC change against the baseline per finding and seed, and its spread over seeds."""
    columns = zip(table["diff"], table["ci_low"], table["ci_high"], table["p_holm"], strict=True)
    cells = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] p_holm {p:.3f}" for d, lo, hi, p in columns]
    shown = table.assign(cell=cells).pivot(index=["arm", "finding"], columns="seed", values="cell")
    shown["spread of diff"] = table.groupby(["arm", "finding"])["diff"].agg(np.ptp)
    order = list(dict.fromkeys(zip(table["arm"], table["finding"], strict=True)))
    print("\nAUC(arm) - AUC(baseline) per training seed (clustered DeLong 95% interval, Holm over the arms):")
    print(shown.loc[order].to_string())


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    print(f"CPU: {describe_cpu()}", flush=True)
    results, arms = [], []
    for seed in args.seeds:
        existing = args.seed0_run if seed == 0 and args.seed0_run is not None else None
        preset = seed_preset(args.preset, args.out, seed, existing)
        evaluation, grid, seconds = run_seed(preset)
        print(f"seed {seed}: trained and evaluated in {seconds / 60:.1f} min", flush=True)
        if args.arms:
            started = time.time()
            arms.append(run_arms(args.arms, preset, seed, args.out, existing is not None))
            write_csv_atomic(pd.concat(arms, ignore_index=True), args.out / "arms.csv")
            minutes = (time.time() - started) / 60
            print(f"seed {seed}: arms trained and tested in {minutes:.1f} min", flush=True)
        for row in statements(preset, evaluation, grid):
            results.append({"seed": seed, **row})
        table = pd.DataFrame(results)
        write_csv_atomic(table, args.out / "claims.csv")
    table = pd.DataFrame(results)
    notes = table["note"] if "note" in table else pd.Series([np.nan] * len(table))
    shown = table.assign(
        cell=[
            f"{v:+.3f}" + ("" if np.isnan(lo) else f" [{lo:+.3f}, {hi:+.3f}]") + (" ok" if h else " NO")
            + ("" if not isinstance(n, str) else f" ({n})")
            for v, lo, hi, h, n in zip(
                table["value"], table.get("ci_low", np.nan), table.get("ci_high", np.nan), table["holds"],
                notes, strict=True,
            )
        ]
    )  # fmt: skip
    wide = shown.pivot(index="statement", columns="seed", values="cell")
    wide["every seed"] = table.groupby("statement")["holds"].all().map({True: "holds", False: "NOT"})
    order = list(dict.fromkeys(table["statement"]))
    print(wide.loc[order].to_string())
    if arms:
        print_arms(pd.concat(arms, ignore_index=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
