"""Uncertainty policies and the masked loss, on hand-made rows."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.labels import FINDINGS, apply_policy, masked_bce_with_logits, targets_and_mask


def raw_rows(values):
    """One finding (Edema) takes ``values``; the other 13 are blank."""
    frame = pd.DataFrame({f: [np.nan] * len(values) for f in FINDINGS})
    frame["Edema"] = values
    return frame


@pytest.mark.parametrize(
    "policy, blank, expected",
    [
        ("u-zeros", "zero", [1, 0, 0, 0]),
        ("u-zeros", "unknown", [1, 0, 0, None]),
        ("u-ones", "zero", [1, 0, 1, 0]),
        ("u-ones", "unknown", [1, 0, 1, None]),
        ("u-ignore", "zero", [1, 0, None, 0]),
        ("u-ignore", "unknown", [1, 0, None, None]),
    ],
)
def test_policies_map_positive_negative_uncertain_blank(policy, blank, expected):
    out = apply_policy(raw_rows([1.0, 0.0, -1.0, np.nan]), policy, blank)
    got = [None if math.isnan(v) else v for v in out["Edema"]]
    assert got == expected
    assert list(out.columns) == list(FINDINGS)


def test_label_values_as_text_are_accepted():
    out = apply_policy(raw_rows(["1.0", "0", "-1", ""]), "u-ones", "zero")
    assert out["Edema"].tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("bad", [2.0, "yes", 0.5])
def test_unknown_label_value_is_an_error_naming_column_and_row(bad):
    with pytest.raises(ValueError, match=r"chexpert\.csv: column 'Edema', row 3"):
        apply_policy(raw_rows([1.0, bad]), source="chexpert.csv")


def test_missing_finding_column_is_an_error():
    with pytest.raises(ValueError, match="missing finding column"):
        apply_policy(raw_rows([1.0]).drop(columns=["Fracture"]))


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown uncertainty policy"):
        apply_policy(raw_rows([1.0]), policy="u-maybe")


def test_masked_bce_ignores_unknown_labels():
    labels = np.array([[1.0, np.nan], [0.0, np.nan]], dtype=np.float32)
    targets, mask = targets_and_mask(labels)
    assert mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    logits = torch.tensor([[2.0, 100.0], [-1.0, -100.0]])
    loss = masked_bce_with_logits(logits, targets, mask)
    known = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    )
    assert torch.allclose(loss, known)
    # Changing the logits of unknown labels must not change the loss.
    logits[:, 1] = torch.tensor([-50.0, 50.0])
    assert torch.allclose(masked_bce_with_logits(logits, targets, mask), known)
    summed = masked_bce_with_logits(logits, targets, mask, reduction="sum")
    assert torch.allclose(summed, known * 2)
