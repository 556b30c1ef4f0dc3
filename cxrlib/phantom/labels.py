"""The phantom's labels and design: MIMIC-CXR-JPG's label rates, a study's raw labels, what is drawn.

``prevalence="mimic"`` uses MIMIC-CXR-JPG's rates with co-occurrence, ``"balanced"`` independent
findings with 18% positives; 1 is drawn, -1 drawn faint half the time, 0 and blank not
(docs/phantom.md, "Labels"). :class:`Design` holds every design option of the phantom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..labels import FINDINGS

PATHOLOGIES: tuple[str, ...] = tuple(f for f in FINDINGS if f != "No Finding")
# No Finding is positive when none of these is positive or uncertain (CheXpert labeler rule).
NO_FINDING_EXCLUDES = ("Support Devices",)
FINE_FINDINGS = ("Lung Lesion", "Pneumothorax", "Fracture", "Support Devices")
COARSE_FINDINGS = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Edema")

# Label counts per study in MIMIC-CXR-JPG v2.0.0 (227,827 studies; positive, negative, uncertain;
# the rest blank), as reported in the label statistics table of Johnson et al., "MIMIC-CXR-JPG, a large
# publicly available database of labeled chest radiographs" (arXiv:1901.07042, 2019). Transcribed from
# memory of that table without network access; the rates are right to about a percentage point.
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
# Co-occurrence in "mimic" mode: a Gaussian copula with one factor shared by all pathologies and
# two group factors (cardiac: heart, mediastinum, edema, effusion; airspace: the opacities).
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
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(p, 1e-12), 1 - 1e-12))


def sample_labels(rng: np.random.Generator, prevalence: str = "mimic", n: int = 1) -> pd.DataFrame:
    """Draw ``n`` studies' raw labels (1 / 0 / -1 / NaN for blank) for the 14 findings; ``mimic``
    through a Gaussian copula with MIMIC's rates as marginals (docs/phantom.md, "Labels")."""
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
        values = np.where(
            latent > top_pos, 1.0, np.where(latent > top_unc, -1.0, np.where(negative, 0.0, np.nan))
        )
        out[finding] = values
    frame = pd.DataFrame(out)
    counted = [f for f in PATHOLOGIES if f not in NO_FINDING_EXCLUDES]
    sick = frame[counted].isin([1.0, -1.0]).any(axis=1)
    frame["No Finding"] = np.where(sick, np.nan, 1.0)
    return frame[list(FINDINGS)]


def rendered_presence(labels: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Turn one study's raw labels into what is drawn: ``strong``, ``faint`` or ``absent`` per pathology.

    1 -> strong; -1 -> faint with probability 0.5, else absent; 0 and blank -> absent.
    """
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
    """Design options of the phantom (passed as keyword arguments to :func:`make_phantom`).

    prevalence: ``mimic`` (MIMIC-CXR-JPG rates and co-occurrence) or ``balanced`` (18% positives each,
        independent). ctr_margin / ctr_spread: CTRs are drawn uniformly from
        [0.5 + margin, 0.5 + spread] (present) and [0.5 - spread, 0.5 - margin] (absent); the same
        margin and spread, scaled by 0.6, apply around the mediastinal threshold.
    studies_per_subject: mean number of studies per subject (1 + geometric; MIMIC's is ~3.5).
    lateral_fraction: share of studies that also get a simplified lateral view (MIMIC ~0.33;
        0 gives a frontal-only phantom, the default, so a small demo stays learnable).
    fine_contrast: multiplier on the density of every fine finding and of its decoy.
    fine_size: multiplier on the size (radius, line width, gap, inset) of every fine finding and decoy.
    fine_instances: how many decoys a positive study turns into its fine finding (nodules, rib
        fractures, wires; a pneumothorax is one long line); more instances are learned in fewer steps.
    noise: film noise standard deviation (density units, at 1 mm^2).
    """

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
            raise ValueError(
                f"need 0 <= ctr_margin < ctr_spread < 0.4, got {self.ctr_margin}, {self.ctr_spread}"
            )
        if self.studies_per_subject < 1:
            raise ValueError(f"studies_per_subject must be >= 1, got {self.studies_per_subject}")
        if not 0 <= self.lateral_fraction <= 1:
            raise ValueError(f"lateral_fraction must be in [0, 1], got {self.lateral_fraction}")
