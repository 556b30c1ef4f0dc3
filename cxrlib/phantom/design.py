"""Design options of the phantom: prevalence, CTR margin, studies and views, fine findings, noise."""

from __future__ import annotations

from dataclasses import dataclass

from .labels import PREVALENCES


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
