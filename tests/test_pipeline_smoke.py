"""The whole `smoke` preset through papermill (the session's ``smoke_run``), and the house rules of the
committed notebooks."""

import json

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from PIL import Image

from cxrlib import paths, study
from cxrlib.index import read_index
from cxrlib.labels import FINDINGS
from cxrlib.pipeline import planned_steps, run_pipeline
from cxrlib.presets import resolve
from cxrlib.splits import fold_ids, read_folds
from cxrlib.study import STEPS

NOTEBOOKS = sorted(paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
FOLDS = ["folds", "fold_split"]  # the split, so that the folds named exist whichever split made them
USES = {  # each notebook's parameters besides preset and run_dir: what its step reads or changes
    "00_data": ["data_root", "fold_split"],
    "01_image_sizes": ["figures_dir"],
    "02_downscale": ["resolutions"],
    "03_train": [*FOLDS, "gpus", "resolution"],
    "04_evaluate": ["figures_dir", "resolutions", *FOLDS, "device", "external_index"],
    "05_receptive_field": ["figures_dir", "resolutions", *FOLDS, "device"],
    "06_gradcam": ["figures_dir", "resolutions", *FOLDS, "device"],
    "07_ensemble": ["figures_dir", "resolutions"],
    "08_throughput": ["resolutions", "device"],
    "09_receptive_field_explained": [
        "figures_dir",
        "data_root",
        "resolutions",
        *FOLDS,
        "device",
        "interactive",
    ],
    "10_field_sweep": ["figures_dir", "resolutions", *FOLDS, "gpus", "device"],
}
CONTRACT_FIGURES = [
    "fig1_erf.png",
    "fig3_image_sizes.png",
    "fig4_gradcam.png",
    "fig5_ensemble_weights.png",
    "auc_vs_resolution.png",
    "cross_resolution.png",
]


def test_every_step_has_its_notebook_and_every_notebook_is_a_step():
    assert [p.stem for p in NOTEBOOKS] == [step.notebook for step in STEPS]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs_and_a_papermill_parameters_cell(notebook):
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{notebook.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells.index(tagged[0]) <= 1, "one parameters cell, at the top"
    parameters = papermill.inspect_notebook(str(notebook))
    assert list(parameters) == ["preset", "run_dir", *USES[notebook.stem]]  # only what the notebook uses
    # the resolution study's notebooks read the demo; the field sweep reads its own preset
    expected = '"receptive-field"' if notebook.stem == "10_field_sweep" else '"demo"'
    assert parameters["preset"]["default"] == expected
    for name, parameter in parameters.items():  # `papermill --help-notebook` shows a type and a help
        assert parameter["inferred_type_name"] not in ("None", ""), f"{notebook.name}: {name} has no type"
        assert parameter["help"], f"{notebook.name}: {name} has no help comment"
    compile(tagged[0].source, notebook.name, "exec")  # the defaults are valid Python


@pytest.mark.slow
def test_smoke_pipeline_writes_every_contract_file(smoke_run):
    preset = smoke_run
    run, tables = preset.run_path, preset.tables_path
    index = read_index(run / "index.csv")
    folds = read_folds(run / "folds.csv", index)
    for resolution in preset.resolutions:
        for fold in preset.trained_folds():
            fold_dir = paths.fold_dir(run, resolution, fold)
            history = pd.read_csv(fold_dir / "history.csv")
            assert list(history.columns) == ["epoch", "train_loss", "val_loss", "lr", "seconds", "img_per_s"]
            assert len(history) >= 1 and history["val_loss"].notna().all()
            for role in ("val", "test"):
                predictions = pd.read_csv(fold_dir / f"{role}_predictions.csv", dtype={"dicom_id": str})
                assert list(predictions.columns) == ["dicom_id", *FINDINGS]
                assert set(predictions["dicom_id"]) == set(fold_ids(folds, fold, role))
    auc = pd.read_csv(tables / "auc.csv")
    assert {"finding", "resolution", "fold", "auc"} <= set(auc.columns)
    assert {str(r) for r in preset.resolutions} | {"ensemble", "average"} <= set(
        auc["resolution"].astype(str)
    )
    table3 = pd.read_csv(tables / "table3.csv")
    assert table3["finding"].tolist() == [*FINDINGS, "Average"]
    weights = pd.read_csv(tables / "ensemble_weights.csv")
    assert {"finding", "resolution", "weight", "std"} <= set(weights.columns)
    sums = weights.groupby("finding")["weight"].sum()
    assert ((sums - 1).abs() < 1e-6).all()
    # Train x test resolution: every model at every resolution; its diagonal is auc.csv.
    cross = pd.read_csv(tables / "cross_resolution_auc.csv")
    assert list(cross.columns) == ["train_resolution", "test_resolution", "fold", "finding", "auc"]
    assert len(cross) == len(preset.resolutions) ** 2 * len(preset.trained_folds()) * len(FINDINGS)
    diagonal = cross[cross["train_resolution"] == cross["test_resolution"]]
    single = auc[auc["resolution"].astype(str).isin([str(r) for r in preset.resolutions])]
    merged = diagonal.assign(resolution=diagonal["train_resolution"].astype(str)).merge(
        single.assign(resolution=single["resolution"].astype(str)), on=["resolution", "fold", "finding"]
    )
    assert len(merged) == len(diagonal)
    np.testing.assert_array_equal(merged["auc_x"].to_numpy(), merged["auc_y"].to_numpy())
    off = cross[cross["train_resolution"] != cross["test_resolution"]]
    assert off["auc"].notna().any()
    # DeLong tests are clustered by patient and corrected over one named family.
    delong = pd.read_csv(tables / "delong.csv")
    compared = len(preset.resolutions) + 2  # the resolutions and both ensembles
    family = rf"fold all: {compared * (compared - 1) // 2} pairs x 14 findings \(\d+ tests\)"
    assert delong["correction_family"].str.fullmatch(family).all()
    erf = pd.read_csv(tables / "erf.csv")
    assert {"resolution", "erf_radius_px", "erf_fraction_of_image"} <= set(erf.columns)
    assert set(erf["state"]) == {"init", "trained"}
    table2 = pd.read_csv(tables / "table2_throughput.csv")
    assert {"resolution", "device", "batch", "train_img_s", "infer_img_s", "peak_mem_gib"} <= set(
        table2.columns
    )
    assert (table2["train_img_s"] > 0).all()
    for name in CONTRACT_FIGURES:
        with Image.open(preset.figures_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    for step, resolution in planned_steps(preset):
        executed = nbformat.read(run / f"{step.name(resolution)}.ipynb", as_version=4)
        provenance = executed.metadata["cxr_provenance"]
        assert provenance["step"] == step.name(resolution)
        assert provenance["data_hashes"]["index.csv"]
    # a batch run never starts widgets: they can leave nbclient waiting for a reply forever
    teaching = nbformat.read(run / "09_receptive_field_explained.ipynb", as_version=4)
    assert teaching.metadata["papermill"]["parameters"]["interactive"] is False
    recorded = json.loads((run / "provenance.json").read_text())
    assert recorded["git"].keys() == {"commit", "dirty"} and "torch" in recorded["packages"]
    # the CPU that produced the numbers, and the estimate printed before training, next to the actual
    assert {"model", "cores", "extensions", "torch_capability"} <= set(recorded["machine"]["cpu"])
    for resolution in preset.resolutions:
        step = recorded["steps"][f"03_train_res{resolution}"]
        assert step["expected_seconds"] > 0 and step["seconds"] > 0


@pytest.mark.slow
def test_notebook_03_shows_the_recipe_the_trainer_used(smoke_run):
    for resolution in smoke_run.resolutions:
        recipe = study.recipe(smoke_run, resolution)[f"{resolution} px"]
        done = json.loads((paths.fold_dir(smoke_run.run_path, resolution, 0) / "done.json").read_text())
        plan = done["batch_plan"]
        assert (recipe["per-process batch"], recipe["processes"], recipe["accumulation steps"]) == (
            plan["per_gpu_batch"], plan["world_size"], plan["accumulation_steps"]
        )  # fmt: skip
        assert recipe["effective batch"] == plan["effective_batch"] and recipe["learning rate"] == done["lr"]
        history = pd.read_csv(paths.fold_dir(smoke_run.run_path, resolution, 0) / "history.csv")
        assert recipe["epochs (at most)"] == len(history) and recipe["training images (first fold)"] > 0
    executed = nbformat.read(smoke_run.run_path / "03_train_res32.ipynb", as_version=4)
    cells = [
        c for c in executed.cells if c.cell_type == "code" and "study.recipe(cfg, resolution)" in c.source
    ]
    shown = [output for cell in cells for output in cell.outputs]
    assert "learning rate (Table 1's rule)" in shown[0]["data"]["text/plain"]


@pytest.mark.slow
def test_a_second_run_skips_every_complete_step(smoke_run, capsys):
    preset = smoke_run
    run_pipeline(
        "smoke",
        run_dir=str(preset.run_path),
        figures_dir=str(preset.figures_path),
        data_root=str(preset.data.root),
        progress_bar=False,
    )
    out = capsys.readouterr().out
    assert out.count("skipped (complete)") == len(planned_steps(resolve("smoke")))


@pytest.mark.slow
def test_every_executed_notebook_shows_its_figures_as_images(smoke_run):
    for step, resolution in planned_steps(smoke_run):
        executed = nbformat.read(smoke_run.run_path / f"{step.name(resolution)}.ipynb", as_version=4)
        shown = [o.data for c in executed.cells if c.cell_type == "code" for o in c.outputs if "data" in o]
        as_text = [d.get("text/plain", "") for d in shown if "image/png" not in d]
        as_text = [text for text in as_text if text.startswith("<Figure")]
        assert not as_text, f"{step.name(resolution)} shows a figure as text: {as_text[0]}"
        if step.notebook not in ("00_data", "08_throughput"):  # the steps without a figure
            assert any("image/png" in d for d in shown), f"{step.name(resolution)} shows no figure"


@pytest.mark.slow
def test_the_arms_reuse_the_baseline_continue_it_and_train_each_change(smoke_run, tmp_path):
    """Notebook 10 on the smoke run's images at 64 px: the baseline is the smoke run's own model
    (reused, not trained again), twice-the-steps continues its training, global-context and
    coarse-only are trained; every arm is scored and tested against the baseline."""
    import yaml

    from cxrlib import presets
    from cxrlib.field_sweep import SWEEP_COLUMNS
    from cxrlib.metrics import finding_auc

    base = yaml.safe_load((presets.PRESET_DIR / "smoke.yaml").read_text())
    arms = {"baseline": {}, "global-context": {"global_context": True},
            "twice-the-steps": {"epochs": 4, "continue_from": "baseline"},
            "coarse-only": {"findings": ["Cardiomegaly", "Edema"]}}  # fmt: skip
    base.update(
        resolutions=[64],
        steps=["00_data", "02_downscale", "10_field_sweep"],
        field_sweep={"arms": arms, "reuse": str(smoke_run.run_path), "compare": str(smoke_run.run_path),
                     "coarse": ["Cardiomegaly", "Edema"], "fine": ["Pleural Effusion"]},
    )  # fmt: skip
    base["data"]["root"] = str(smoke_run.data_path)
    base["cache"]["dir"] = str(smoke_run.cache_path)
    base["analysis"] = {**base.get("analysis", {}), "bootstrap": 20}
    path = tmp_path / "smoke-arms.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    preset = run_pipeline(
        str(path), run_dir=str(tmp_path / "run"), figures_dir=str(tmp_path / "figures"), progress_bar=False
    )
    table = pd.read_csv(preset.tables_path / "field_sweep.csv")
    assert list(table.columns) == list(SWEEP_COLUMNS)
    assert list(dict.fromkeys(table["arm"])) == list(arms)
    assert table.groupby("arm", sort=False).size().tolist() == [len(FINDINGS)] * 3 + [2]
    assert not paths.fold_dir(preset.run_path, 64, 0).exists()  # the smoke run's model was reused
    reused = pd.read_csv(paths.predictions_path(smoke_run.run_path, 64, 0), dtype={"dicom_id": str})
    labels = read_index(smoke_run.index_path).set_index("dicom_id").loc[reused["dicom_id"]]
    auc, *_ = finding_auc(labels["Pleural Effusion"].to_numpy(), reused["Pleural Effusion"].to_numpy())
    baseline = table[table["arm"] == "baseline"].set_index("finding")
    assert baseline.loc["Pleural Effusion", "auc"] == pytest.approx(auc)
    # twice the steps: the baseline's two epochs, continued for two more
    longer = pd.read_csv(paths.variant_dir(preset.run_path, 64, 0, "twice-the-steps") / "history.csv")
    first = pd.read_csv(paths.fold_dir(smoke_run.run_path, 64, 0) / "history.csv")
    assert len(longer) == 4 and longer["val_loss"][:2].tolist() == first["val_loss"].tolist()
    coarse = pd.read_csv(paths.variant_dir(preset.run_path, 64, 0, "coarse-only") / "test_predictions.csv")
    assert list(coarse.columns) == ["dicom_id", "Cardiomegaly", "Edema"]
    wide = json.loads((paths.variant_dir(preset.run_path, 64, 0, "global-context") / "done.json").read_text())
    assert wide["args"]["global_context"] and wide["fingerprint"]["global_context"]
    delong = pd.read_csv(preset.tables_path / "field_sweep_delong.csv")
    assert {"arm", "finding", "diff", "p", "p_holm", "correction_family"} <= set(delong.columns)
    tested = delong.groupby("arm")["finding"].apply(set).to_dict()
    assert tested == {"global-context": {"Cardiomegaly", "Edema", "Pleural Effusion"},
                      "twice-the-steps": {"Cardiomegaly", "Edema", "Pleural Effusion"},
                      "coarse-only": {"Cardiomegaly", "Edema"}}  # fmt: skip
    assert delong["correction_family"].nunique() == 1  # one family: every arm x finding
    with Image.open(preset.figures_path / "field_sweep_arms.png") as image:
        assert image.format == "PNG"
