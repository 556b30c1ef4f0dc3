"""External validation: a run's models and fitted ensembles scored on another data set's shared findings."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from nih_layout import write_nih_layout
from torch import nn

from cxrlib import evaluate
from cxrlib import models as cxrmodels
from cxrlib.datasets import index_from_mimic, index_from_nih
from cxrlib.evaluate import FOLD_WEIGHTS, evaluate_external, main
from cxrlib.index import read_index, write_index
from cxrlib.labels import FINDINGS
from cxrlib.models import build_model
from cxrlib.phantom import ensure_phantom

RESOLUTIONS = (32, 64)


@pytest.fixture(scope="module")
def run_and_other(tmp_path_factory):
    """A run with CheXpert's findings (untrained models at two resolutions, fold 0, and ensemble
    weights that take only the 32 px model), and an NIH-layout index to score it on."""
    root = tmp_path_factory.mktemp("external")
    phantom = ensure_phantom(root / "phantom", 16, seed=5, max_size=96, prevalence="balanced")
    run = root / "run"
    labels = index_from_mimic(phantom)
    labels["Atelectasis"] = float("nan")  # never known in the run's data, as Kermany's 12 unknown findings
    write_index(labels, run / "index.csv")
    for k, resolution in enumerate(RESOLUTIONS):
        torch.manual_seed(k)
        folder = run / f"res{resolution}" / "fold0"
        folder.mkdir(parents=True)
        torch.save(build_model("none", len(FINDINGS)).state_dict(), folder / "best_model.pt")
    weights = [(f, r, 0, 1.0 if r == 32 else 0.0) for f in FINDINGS for r in RESOLUTIONS]
    (run / "tables").mkdir()
    pd.DataFrame(weights, columns=["finding", "resolution", "fold", "weight"]).to_csv(
        run / "tables" / FOLD_WEIGHTS, index=False
    )
    nih = write_nih_layout(phantom, root / "nih", stored_size=64)
    other = root / "nih_index" / "index.csv"
    write_index(index_from_nih(nih), other)
    return run, other


def test_every_model_and_both_ensembles_are_scored_on_the_shared_findings(run_and_other, tmp_path):
    run, other = run_and_other
    result = evaluate_external(run, other, out=tmp_path / "out", device="cpu", n_boot=20, workers=1)
    findings = result.findings.set_index("finding")
    left_out = set(findings.index[~findings["scored"]])
    assert findings.loc["Pleural Effusion", "other_name"] == "Effusion"
    assert left_out >= {
        "Fracture",
        "Support Devices",
        "Lung Lesion",
        "Enlarged Cardiomediastinum",
    }
    assert findings.loc["Fracture", "reason"] == "not in the other set's label set"
    assert findings.loc["Atelectasis", "other_name"] == "Atelectasis" and "Atelectasis" in left_out
    assert "nothing was learned" in findings.loc["Atelectasis", "reason"]
    scored = set(findings.index[findings["scored"]])
    assert set(result.auc["finding"]) == scored
    assert set(result.auc["resolution"].astype(str)) == {"32", "64", "ensemble", "average"}
    # the fitted weights (all on 32 px) are applied as they are, not fitted again
    auc = result.auc.set_index(["finding", "resolution"])["auc"]
    for finding in scored:
        assert auc[(finding, "ensemble")] == pytest.approx(auc[(finding, 32)])
    assert set(result.bootstrap["finding"]) == scored and {"ci_low", "ci_high"} <= set(result.bootstrap)
    assert list(result.table3["finding"])[-1] == "Average"
    for name in ("auc", "table3", "auc_bootstrap", "findings"):
        assert (tmp_path / "out" / f"{name}.csv").is_file()


def test_command_line_prints_what_it_scored_and_left_out(run_and_other, tmp_path, capsys):
    run, other = run_and_other
    argv = ["--run", str(run), "--index", str(other), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*argv, "--bootstrap", "10", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "left out: Fracture: not in the other set's label set" in printed
    assert "Pleural Effusion" in printed and "test AUC in percent" in printed


def test_a_run_without_models_is_one_line(run_and_other, tmp_path, capsys):
    _, other = run_and_other
    run = tmp_path / "run"
    run.mkdir()
    (run / "index.csv").write_text(other.read_text())
    assert main(["--run", str(run), "--index", str(other), "--out", str(tmp_path / "o")]) == 1
    assert "no trained model" in capsys.readouterr().err


def test_each_finding_left_out_says_why():
    from cxrlib.evaluate import finding_table

    nan = float("nan")
    ours = pd.DataFrame({"dicom_id": ["a", "b"], "Pneumonia": [1.0, 0.0], "Edema": [0.0, 1.0],
                         "Fracture": [0.0, 1.0], "Mass": [0.0, 0.0]})  # fmt: skip
    other = pd.DataFrame({"dicom_id": ["x", "y"], "Pneumonia": [0.0, 1.0], "Edema": [nan, nan],
                          "Fracture": [1.0, 1.0], "Mass": [0.0, 1.0]})  # fmt: skip
    table = finding_table(ours, other).set_index("finding")
    assert bool(table.loc["Pneumonia", "scored"]) and not table["scored"].drop("Pneumonia").any()
    assert "never labels" in table.loc["Edema", "reason"]
    assert "only one class" in table.loc["Fracture", "reason"]
    assert "own labels" in table.loc["Mass", "reason"]


def test_an_unreadable_image_stops_in_one_line_or_is_left_out_with_drop_bad(run_and_other, tmp_path, capsys):
    run, other = run_and_other
    index = read_index(other)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(index.loc[0, "path"]).read_bytes()[:300])
    index.loc[0, "path"] = str(broken)
    copy = write_index(index, tmp_path / "other" / "index.csv")
    argv = ["--run", str(run), "--index", str(copy), "--out", str(tmp_path / "o"), "--device", "cpu"]
    argv += ["--bootstrap", "10", "--workers", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 source image(s)") and str(broken) in err[0]
    assert "--drop-bad" in err[0]
    assert main([*argv, "--drop-bad"]) == 0
    err = capsys.readouterr().err
    assert f"left out: unreadable image {broken}: " in err and "Traceback" not in err
    scored = pd.read_csv(tmp_path / "o" / "auc.csv")
    assert (scored["n_pos"] + scored["n_neg"]).max() == len(index) - 1


def test_external_scoring_decodes_with_loader_workers_in_batches_that_fit_the_resolution(
    tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(evaluate, "load_trained_model", lambda folder, map_location: nn.Identity())
    monkeypatch.setattr(evaluate, "CXRDataset", lambda frame, resolution, cache: resolution)
    monkeypatch.setattr(evaluate, "amp_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(
        cxrmodels,
        "predict_logits",
        lambda *args: calls.append(args[1:3] + args[5:]) or pd.DataFrame({"dicom_id": []}),
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # one process scores, on one of 8 GPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    models = {(256, 0): tmp_path, (2048, 0): tmp_path}
    evaluate.score_models(models, pd.DataFrame(), tmp_path, torch.device("cuda"), batch_size=None)
    assert calls == [(256, 64, 8), (2048, 4, 8)]  # (resolution, batch, DataLoader workers)
