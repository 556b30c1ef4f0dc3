"""The phantom's labels (MIMIC-CXR-JPG's rates or balanced ones), what is drawn for them, and its design
options (:class:`Design`); docs/phantom.md, "Labels" and "Findings"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from ..labels import FINDINGS

PATHOLOGIES: tuple[str, ...] = tuple(f for f in FINDINGS if f != "No Finding")
# No Finding is positive when none of these is positive or uncertain (CheXpert labeler rule).
NO_FINDING_EXCLUDES = ("Support Devices",)
FINE_FINDINGS = ("Lung Lesion", "Pneumothorax", "Fracture", "Support Devices")
COARSE_FINDINGS = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Edema")

# Studies with a positive, negative, uncertain label in MIMIC-CXR-JPG v2.0.0 (Johnson et al. 2019,
# arXiv:1901.07042; transcribed from memory, right to about a point: docs/phantom.md, "Labels").
MIMIC_STUDIES = 227_827
MIMIC_LABEL_COUNTS: dict[str, tuple[int, int, int]] = {
    "Atelectasis": (45_808, 1_531, 10_327),
    "Cardiomegaly": (44_845, 15_911, 6_043),
    "Consolidation": (10_778, 7_967, 4_331),
    "Edema": (27_018, 25_641, 13_174),
    "Enlarged Cardiomediastinum": (7_004, 5_283, 9_375),
    "Fracture": (4_390, 870, 555),
    "Lung Lesion": (6_284, 859, 1_141),
    "Lung Opacity": (51_525, 3_069, 3_831),
    "No Finding": (75_455, 0, 0),
    "Pleural Effusion": (54_300, 27_158, 5_814),
    "Pleural Other": (2_011, 126, 765),
    "Pneumonia": (16_556, 24_338, 18_291),
    "Pneumothorax": (10_358, 42_356, 1_134),
    "Support Devices": (66_558, 3_486, 237),
}
# Co-occurrence in "mimic" mode: a Gaussian copula with a shared factor and these two group factors.
CARDIAC_GROUP = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Edema", "Pleural Effusion")
AIRSPACE_GROUP = ("Atelectasis", "Consolidation", "Edema", "Lung Opacity", "Pneumonia")
PREVALENCES = ("mimic", "balanced")
BALANCED_RATES = (0.18, 0.10, 0.02)  # positive, negative, uncertain; independent findings


def label_rates(prevalence: str) -> dict[str, tuple[float, float, float]]:
    """Per pathology: (positive, negative, uncertain) rates per study; blank is the rest."""
    if prevalence == "mimic":
        return {f: tuple(c / MIMIC_STUDIES for c in MIMIC_LABEL_COUNTS[f]) for f in PATHOLOGIES}
    if prevalence == "balanced":
        return {f: BALANCED_RATES for f in PATHOLOGIES}
    raise ValueError(f"prevalence={prevalence!r}: choose one of {PREVALENCES}")


def _normal_quantile(p: float) -> float:
    return NormalDist().inv_cdf(min(max(p, 1e-12), 1 - 1e-12))


def sample_labels(rng: np.random.Generator, prevalence: str = "mimic", n: int = 1) -> pd.DataFrame:
    """Draw ``n`` studies' raw labels (1 / 0 / -1 / NaN for blank) for the 14 findings."""
    rates = label_rates(prevalence)
    shared = rng.standard_normal(n)
    cardiac, airspace = rng.standard_normal(n), rng.standard_normal(n)
    out = {}
    for finding in PATHOLOGIES:
        pos, neg, unc = rates[finding]
        own = rng.standard_normal(n)
        if prevalence == "mimic":
            g_cardiac = 0.45 if finding in CARDIAC_GROUP else 0.0
            g_air = 0.45 if finding in AIRSPACE_GROUP else 0.0
            w_shared = 0.45
            own_w = math.sqrt(max(1.0 - w_shared**2 - g_cardiac**2 - g_air**2, 0.05))
            latent = w_shared * shared + g_cardiac * cardiac + g_air * airspace + own_w * own
            latent = latent / math.sqrt(w_shared**2 + g_cardiac**2 + g_air**2 + own_w**2)
        else:
            latent = own
        top_pos, top_unc = _normal_quantile(1 - pos), _normal_quantile(1 - pos - unc)
        negative = rng.random(n) < neg / max(1 - pos - unc, 1e-9)
        blank_or_negative = np.where(negative, 0.0, np.nan)
        out[finding] = np.where(latent > top_pos, 1.0, np.where(latent > top_unc, -1.0, blank_or_negative))
    frame = pd.DataFrame(out)
    counted = [f for f in PATHOLOGIES if f not in NO_FINDING_EXCLUDES]
    sick = frame[counted].isin([1.0, -1.0]).any(axis=1)
    frame["No Finding"] = np.where(sick, np.nan, 1.0)
    return frame[list(FINDINGS)]


def rendered_presence(labels: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """What is drawn per pathology: 1 ``strong``, -1 ``faint`` half the time, else ``absent``."""
    drawn = {}
    for finding in PATHOLOGIES:
        value = labels[finding]
        if value == 1.0:
            drawn[finding] = "strong"
        elif value == -1.0:
            drawn[finding] = "faint" if rng.random() < 0.5 else "absent"
        else:
            drawn[finding] = "absent"
    return drawn


@dataclass(frozen=True)
class Design:
    """The phantom's design options (keyword arguments of :func:`make_phantom`; docs/phantom.md)."""

    prevalence: str = "mimic"
    ctr_margin: float = 0.005
    ctr_spread: float = 0.08
    studies_per_subject: float = 2.0
    lateral_fraction: float = 0.0
    fine_contrast: float = 1.0
    fine_size: float = 1.0
    fine_instances: int = 2
    noise: float = 0.02

    def __post_init__(self):
        if self.prevalence not in PREVALENCES:
            raise ValueError(f"prevalence={self.prevalence!r}: choose one of {PREVALENCES}")
        if not 0 <= self.ctr_margin < self.ctr_spread < 0.4:
            raise ValueError(f"need 0 <= ctr_margin < ctr_spread < 0.4: {self.ctr_margin}, {self.ctr_spread}")
        if self.studies_per_subject < 1:
            raise ValueError(f"studies_per_subject must be >= 1, got {self.studies_per_subject}")
        if not 0 <= self.lateral_fraction <= 1:
            raise ValueError(f"lateral_fraction must be in [0, 1], got {self.lateral_fraction}")
