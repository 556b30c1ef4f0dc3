"""Finding lists (label sets), the 14 CheXpert findings, and the uncertainty policies.

A data set has its own label set: the finding columns of its index (:mod:`cxrlib.index`), in
order. CheXpert's 14 (:data:`FINDINGS`) are the default, which MIMIC-CXR-JPG, CheXpert and the
phantom use; NIH ChestX-ray14 has its own 14 and No Finding (:data:`NIH_FINDINGS`), and a CSV
reader may declare any set. The same finding under two names (NIH's "Effusion" is CheXpert's
"Pleural Effusion") is matched by :func:`shared_findings` (:data:`SAME_FINDING`), for scoring a
model on another data set.

Raw labels (MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-chexpert.csv``, CheXpert's CSVs) take
four values per finding: ``1`` positive, ``0`` negative, ``-1`` uncertain and blank
(not mentioned). A policy maps them to targets in {1, 0, unknown}; unknown is NaN in
the label matrix and is masked out of every loss and metric.

======== ============ ============ ============ ======================
policy   1            0            -1           blank
======== ============ ============ ============ ======================
u-zeros  1            0            0            0, or NaN (``blank="unknown"``)
u-ones   1            0            1            0, or NaN
u-ignore 1            0            NaN          0, or NaN
======== ============ ============ ============ ======================

``u-zeros`` with blank as 0 is the paper's setting (all non-positive labels are negative).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .fileio import DataError

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
NUM_FINDINGS = len(FINDINGS)
NO_FINDING = "No Finding"
# NIH ChestX-ray14 (Wang et al. 2017, Data_Entry_2017_v2020.csv), in the order of its README, then No Finding.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    NO_FINDING,
)
# The same finding under two names (normalised as :func:`normal_name` does). Only findings that are
# defined alike are here: NIH's Pleural_Thickening is one kind of CheXpert's broader Pleural Other,
# its Mass and Nodule are kinds of Lung Lesion, and Infiltration is not Lung Opacity; those stay apart.
SAME_FINDING: dict[str, str] = {"effusion": "pleural effusion"}
POLICIES: tuple[str, ...] = ("u-zeros", "u-ones", "u-ignore")
BLANK_OPTIONS: tuple[str, ...] = ("zero", "unknown")
RAW_VALUES = (1.0, 0.0, -1.0)


def finding_order(names: Iterable[str]) -> list[str]:
    """The findings among ``names`` (first appearance kept, duplicates dropped) in the order tables
    and figures show them: CheXpert's order when every one is a CheXpert finding (as before label
    sets existed), else the order given."""
    unique = [str(n) for n in dict.fromkeys(names)]
    if set(unique) <= set(FINDINGS):
        return [f for f in FINDINGS if f in unique]
    return unique


def normal_name(finding: str) -> str:
    """A finding's name for matching across label sets: lower case, ``_`` and ``-`` as spaces."""
    return " ".join(str(finding).replace("_", " ").replace("-", " ").lower().split())


def shared_findings(ours: Sequence[str], theirs: Sequence[str]) -> dict[str, str]:
    """``{our name: their name}`` for the findings both label sets have: the same name (as
    :func:`normal_name` reads it) or the same finding under another name (:data:`SAME_FINDING`)."""

    def key(name: str) -> str:
        normal = normal_name(name)
        return SAME_FINDING.get(normal, normal)

    theirs_by_key = {key(name): name for name in theirs}
    return {name: theirs_by_key[key(name)] for name in ours if key(name) in theirs_by_key}


def validate_raw_labels(
    raw: pd.DataFrame, source: str = "labels", findings: Sequence[str] = FINDINGS
) -> None:
    """Raise :class:`~cxrlib.fileio.DataError` naming the file, column and row of the first value
    outside {1, 0, -1, blank}.

    ``raw`` must hold the ``findings`` columns (default CheXpert's 14); ``source`` names the file.
    """
    missing = [f for f in findings if f not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing finding column(s) {missing}")
    for finding in findings:
        values = pd.to_numeric(raw[finding], errors="coerce")
        not_numeric = values.isna() & raw[finding].notna() & (raw[finding].astype(str).str.strip() != "")
        bad = not_numeric | (values.notna() & ~values.isin(RAW_VALUES))
        if bad.any():
            row = bad.to_numpy().nonzero()[0][0]
            raise DataError(
                f"{source}: column {finding!r}, row {row + 2} (line in the CSV, header is line 1): "
                f"value {raw[finding].iloc[row]!r} is not one of 1, 0, -1 or blank"
            )


def apply_policy(
    raw: pd.DataFrame,
    policy: str = "u-zeros",
    blank: str = "zero",
    source: str = "labels",
    findings: Sequence[str] = FINDINGS,
) -> pd.DataFrame:
    """Map raw labels (1 / 0 / -1 / blank) of ``findings`` (default CheXpert's 14) to targets
    (1.0 / 0.0 / NaN).

    Returns a float DataFrame with exactly the ``findings`` columns, in that order, on ``raw``'s
    index. Raises ``ValueError`` on an unknown policy or a bad value.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; choose one of {POLICIES}")
    if blank not in BLANK_OPTIONS:
        raise ValueError(f"unknown blank option {blank!r}; choose one of {BLANK_OPTIONS}")
    validate_raw_labels(raw, source, findings)
    values = raw[list(findings)].apply(pd.to_numeric, errors="coerce").astype(float)
    out = values.copy()
    uncertain = values == -1.0
    out[uncertain] = {"u-zeros": 0.0, "u-ones": 1.0, "u-ignore": np.nan}[policy]
    out[values.isna()] = 0.0 if blank == "zero" else np.nan
    return out


def targets_and_mask(labels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a label array with NaN for unknown into (targets with NaN set to 0, mask of known)."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    mask = ~torch.isnan(labels)
    return torch.nan_to_num(labels, nan=0.0), mask.to(torch.float32)


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Binary cross-entropy on logits that ignores unknown labels (``mask == 0``).

    ``reduction="mean"`` averages over known labels only; ``"sum"`` returns the sum,
    which with ``mask.sum()`` lets callers average across batches or processes exactly.
    """
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    total = (losses * mask).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp_min(1.0)
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum'")
