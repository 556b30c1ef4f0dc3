"""Label sets (CheXpert's 14 :data:`FINDINGS`, NIH's), the uncertainty policies (raw 1 / 0 / -1 / blank to
1.0 / 0.0 / NaN, unknown: masked out of every loss and metric) and the masked loss (docs/data_files.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .fileio import DataError

FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # fmt: skip
NUM_FINDINGS = len(FINDINGS)
NO_FINDING = "No Finding"
# NIH ChestX-ray14 (Wang et al. 2017, Data_Entry_2017_v2020.csv), in the order of its README, then No Finding.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", NO_FINDING,
)  # fmt: skip
# One finding under two names (NIH's Pleural_Thickening, Mass, Nodule, Infiltration differ from CheXpert's)
SAME_FINDING: dict[str, str] = {"effusion": "pleural effusion"}
POLICIES: tuple[str, ...] = ("u-zeros", "u-ones", "u-ignore")
BLANK_OPTIONS: tuple[str, ...] = ("zero", "unknown")


def finding_order(names: Iterable[str]) -> list[str]:
    """The findings among ``names`` (once each) in CheXpert's order when all are CheXpert's, else as given."""
    unique = [str(n) for n in dict.fromkeys(names)]
    return [f for f in FINDINGS if f in unique] if set(unique) <= set(FINDINGS) else unique


def shared_findings(ours: Sequence[str], theirs: Sequence[str]) -> dict[str, str]:
    """``{our name: their name}`` of the findings both label sets have (any case, ``_`` or ``-`` as space)."""

    def key(name: str) -> str:
        normal = " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())
        return SAME_FINDING.get(normal, normal)

    theirs_by_key = {key(name): name for name in theirs}
    return {name: theirs_by_key[key(name)] for name in ours if key(name) in theirs_by_key}


def apply_policy(
    raw: pd.DataFrame, policy: str = "u-zeros", blank: str = "zero", source: str = "labels"
) -> pd.DataFrame:
    """Targets (1.0 / 0.0 / NaN) of the raw labels of the 14 findings, in order on ``raw``'s index: -1 is
    0 (``u-zeros``), 1 (``u-ones``) or NaN (``u-ignore``); blank is 0 or NaN (``blank="unknown"``). A missing
    column or a value outside {1, 0, -1, blank} is a :class:`~cxrlib.fileio.DataError` naming its CSV line."""
    if policy not in POLICIES:
        raise DataError(f"unknown uncertainty policy {policy!r}; choose one of {POLICIES}")
    if blank not in BLANK_OPTIONS:
        raise DataError(f"unknown blank option {blank!r}; choose one of {BLANK_OPTIONS}")
    if missing := [f for f in FINDINGS if f not in raw.columns]:
        raise DataError(f"{source}: missing finding column(s) {missing}")
    given = raw[list(FINDINGS)]
    values = given.apply(pd.to_numeric, errors="coerce").astype(float)
    blank_text = given.astype(str).apply(lambda column: column.str.strip()) == ""
    bad = ~values.isin((1.0, 0.0, -1.0)) & given.notna() & ~blank_text
    if bad.any().any():
        finding = bad.any().idxmax()
        row = int(np.flatnonzero(bad[finding].to_numpy())[0])
        raise DataError(
            f"{source}: column {finding!r}, row {row + 2} (CSV line): value {given[finding].iloc[row]!r} is "
            "not 1, 0, -1 or blank"
        )
    out = values.copy()
    out[values == -1.0] = {"u-zeros": 0.0, "u-ones": 1.0, "u-ignore": np.nan}[policy]
    out[values.isna()] = 0.0 if blank == "zero" else np.nan
    return out


def targets_and_mask(labels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a label array with NaN for unknown into (targets with NaN set to 0, mask of known)."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    return torch.nan_to_num(labels, nan=0.0), (~torch.isnan(labels)).to(torch.float32)


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Binary cross-entropy on logits over the known labels (``mask == 1``): their ``mean`` or ``sum``."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    total = (losses * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1.0)
