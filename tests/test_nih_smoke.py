"""The ``smoke`` pipeline on NIH ChestX-ray14's layout (a phantom copy): every table and figure
names NIH's findings, none names a CheXpert finding NIH does not have, nor an NIH finding the
phantom never draws (Mass, Hernia, ...: only negative labels, so nothing to learn or score)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from matplotlib.text import Text
from nih_layout import write_nih_layout

from cxrlib import plots
from cxrlib.datasets import index_from_nih
from cxrlib.index import index_findings, read_index
from cxrlib.labels import FINDINGS, NIH_FINDINGS
from cxrlib.phantom import ensure_phantom
from cxrlib.pipeline import run_pipeline
from cxrlib.presets import PRESET_DIR

CHEXPERT_ONLY = sorted(set(FINDINGS) - set(NIH_FINDINGS))  # Pleural Effusion, Support Devices, ...
FINDING_TABLES = ("auc.csv", "table3.csv", "auc_bootstrap.csv", "delong.csv", "ensemble_weights.csv")


@pytest.fixture(scope="module")
def nih_smoke(tmp_path_factory):
    """The smoke preset's settings with an NIH-layout copy of its phantom as the data."""
    root = tmp_path_factory.mktemp("nih_smoke")
    settings = yaml.safe_load((PRESET_DIR / "smoke.yaml").read_text())
    data = settings["data"]
    phantom = ensure_phantom(
        root / "phantom", data["subjects"], data["seed"], data["max_size"], prevalence="balanced"
    )
    nih = write_nih_layout(phantom, root / "nih", stored_size=128)
    settings["data"] = {"source": "nih", "root": str(nih)}
    settings["steps"] = [
        "00_data",
        "01_image_sizes",
        "02_downscale",
        "03_train",
        "04_evaluate",
        "06_gradcam",
        "07_ensemble",
    ]
    preset = root / "smoke-nih.yaml"
    preset.write_text(yaml.safe_dump(settings))
    return run_pipeline(
        str(preset), run_dir=str(root / "run"), figures_dir=str(root / "figures"), progress_bar=False
    )


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@pytest.mark.slow
def test_tables_and_figures_name_nih_findings(nih_smoke):
    preset = nih_smoke
    index = read_index(preset.run_path / "index.csv")
    every = index_from_nih(preset.data_path)
    labelled = [f for f in NIH_FINDINGS if every[f].nunique() == 2]
    assert "Mass" not in labelled and {"Effusion", "Infiltration", "Pleural_Thickening"} <= set(labelled)
    assert index_findings(index) == labelled
    predictions = pd.read_csv(next(preset.run_path.glob("res*/fold0/test_predictions.csv")))
    assert list(predictions.columns) == ["dicom_id", *labelled]  # the model head
    for name in FINDING_TABLES:
        table = pd.read_csv(preset.tables_path / name)
        assert set(table["finding"]) - {"Average"} == set(labelled), name
    table3 = pd.read_csv(preset.tables_path / "table3.csv")
    assert table3["finding"].tolist() == [*labelled, "Average"]
    assert table3.set_index("finding")[["32_mean", "64_mean"]].loc["Effusion"].notna().all()
    auc = pd.read_csv(preset.tables_path / "auc.csv")
    weights = pd.read_csv(preset.tables_path / "ensemble_weights.csv")
    for fig in (plots.auc_vs_resolution(auc), plots.fig5_ensemble_weights(weights)):
        shown = " ".join(texts(fig))
        assert "Effusion" in shown and "Pleural_Thickening" in shown
        assert not any(f in shown for f in CHEXPERT_ONLY)
    for name in (
        "fig3_image_sizes.png",
        "fig4_gradcam.png",
        "fig5_ensemble_weights.png",
        "auc_vs_resolution.png",
    ):
        assert (preset.figures_path / name).is_file()
