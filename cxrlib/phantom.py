"""Synthetic chest X-ray phantom written in the MIMIC-CXR-JPG layout: the project's built-in data.

This is a **teaching phantom, not anatomy**. It draws radiograph-like 8-bit images
(thorax outline, lungs with vessel-like texture, mediastinum, heart, diaphragm domes,
ribs, clavicles, spine, film noise, varying exposure and patient size) and renders each
of the 14 CheXpert findings at a known, documented spatial scale, so that the effect
studied by the paper (coarse findings favour low resolution, fine findings need high
resolution) can be seen, taught and tested on a laptop.

Usage::

    python -m cxrlib.phantom --out data/phantom --subjects 200 --seed 0 --max-size 512
    python -m cxrlib.phantom --out data/phantom --subjects 1500 --max-size 384 --prevalence balanced

Every finding has a spatial scale (mm; at the demo's top resolution, a 128 px square made from a
2500x3056 image, a pixel is about 2.7 x 3.3 mm):

========================== ========== ====================================================================
finding                    scale      what is rendered (and what it must be told apart from)
========================== ========== ====================================================================
Cardiomegaly               global     cardiothoracic ratio (CTR) > 0.5, drawn within 0.08 of 0.5; the heart
                                      has the density of every other soft tissue; only its width relative
                                      to the thorax (235-325 mm, patient size varies) decides
Enlarged Cardiomediastinum global     upper mediastinal width / thoracic width > 0.30, drawn within 0.05
Edema                      coarse     bilateral perihilar haze (sigma 0.2 thorax widths, ~58 mm) in both
                                      lungs at once; every lung also has one-sided smooth bumps as large
Pleural Effusion           medium     fluid level hiding a diaphragm dome, meniscus rising 10-40 mm
Consolidation              medium     dense homogeneous patch 35-60 mm with dark air bronchograms
Pneumonia                  medium     cluster of 3-6 soft blobs (sigma 4-7.5 mm) over 30-60 mm
Atelectasis                medium     plate-like band 50-90 mm long, 4-7 mm thick, in a lower zone
Lung Opacity               medium     faint ill-defined patch, sigma 10-20 mm
Pleural Other              fine       pleural thickening 2.5-4 mm thick, 50-90 mm long along the chest wall
Lung Lesion                fine       2 sharp-edged nodules, radius 3.2-5.2 mm; decoys: 3-6 soft blobs per
                                      image (sigma 5.2-6.5 mm) of the same integrated density
Pneumothorax               fine       thin visceral pleural line 1.6 mm, no lung texture (mean kept) between
                                      it and the wall (10-32 mm); decoys: 1-2 soft skin-fold lines per
                                      image (sigma 5.2 mm) of the same integrated density and course
Fracture                   fine       2 cortical breaks 3.3-5.2 mm across ribs with a local 1.3-2.6 mm step;
                                      decoys: 3-5 soft dips along ribs (sigma 7.8 mm), same density removed
Support Devices            fine       2 thin bright wires 1.6 mm; decoys: 3-5 soft lines per image (sigma
                                      5.2 mm) of the same integrated density
No Finding                 -          no other finding (Support Devices aside) positive or uncertain
========================== ========== ====================================================================

Fine findings *replace* some of their decoys, so the number of bumps or lines in an
image does not depend on the label: once a finding is smaller than a pixel it looks
exactly like its decoy, which is what "invisible when downscaled" means here.

Labels (per study, as in MIMIC): 1 positive, 0 negative, -1 uncertain, blank (not
mentioned). Rendering: 1 -> present; -1 -> present with probability 0.5, faint or
close to the decision threshold; 0 and blank -> absent. The paper's U-Zeros policy
maps -1 and blank to 0, so uncertain studies are label noise, as in MIMIC.
Prevalences: ``prevalence="mimic"`` uses MIMIC-CXR-JPG's label rates with co-occurrence
(see ``MIMIC_LABEL_COUNTS``); ``"balanced"`` draws every finding independently with
18% positives (for small demos: enough positives per finding in ~1,000 test images and
no co-occurrence that would let one finding be predicted from another).

Geometry is in millimetres and rendered directly at the output size (``max_size`` caps
the long side), so one patient looks the same at any size; thin structures are drawn
area-conserving (their integrated density does not depend on the pixel size).
``docs/phantom.md`` has the design and the feasibility study.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .fileio import atomic_write, write_csv_atomic, write_text_atomic
from .labels import FINDINGS

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

CTR_THRESHOLD = 0.5
MEDIASTINUM_THRESHOLD = 0.30
PIXEL_SPACING_SHORT_SIDE_MM = 347.0  # every detector's short side covers ~35 cm
JPEG_QUALITY = 95


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


# ----------------------------------------------------------------------------------------------
# Labels


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
    """Draw ``n`` studies' raw labels (1 / 0 / -1 / NaN for blank) for the 14 findings.

    ``mimic``: a Gaussian copula (shared and group factors) whose marginals are MIMIC's rates, so
    findings co-occur; the highest latent values are positive, then uncertain, the rest negative or
    blank. ``balanced``: independent findings. No Finding is 1 when no pathology other than Support
    Devices is positive or uncertain, else blank (MIMIC never has No Finding = 0 or -1).
    """
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


# ----------------------------------------------------------------------------------------------
# Plans: everything needed to render one image, drawn with the study's own generator (JSON-able)


def _native_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like MIMIC-CXR-JPG's: mostly ~2500x3056, also 3056x2500, ~2000x2000."""
    kind = rng.choice(4, p=[0.6, 0.15, 0.15, 0.10])
    if kind == 0:
        return int(rng.choice([2539, 2544, 2500])), int(rng.choice([3050, 3056]))
    if kind == 1:
        return int(rng.choice([3050, 3056])), int(rng.choice([2539, 2544, 2500]))
    if kind == 2:
        side = int(rng.integers(1990, 2030))
        return side, side
    return int(rng.integers(1700, 3050)), int(rng.integers(1700, 3050))


def sample_subject(rng: np.random.Generator) -> dict[str, Any]:
    """A patient's body: thoracic width (mm) and the shape parameters that persist across studies."""
    return {
        "thorax_mm": float(rng.uniform(235, 325)),
        "height_ratio": float(rng.uniform(0.85, 1.02)),
        "wall_mm": float(rng.uniform(12, 32)),
        "apex_frac": float(rng.uniform(0.21, 0.27)),
        "heart_left_frac": float(rng.uniform(0.56, 0.72)),
        "heart_shape": float(rng.uniform(0.4, 0.52)),
        "heart_power": float(rng.uniform(1.8, 2.8)),
        "dome_mm": float(rng.uniform(25, 42)),
    }


def _draw_ratio(rng, state: str, threshold: float, margin: float, spread: float) -> float:
    if state == "strong":
        return float(rng.uniform(threshold + margin, threshold + spread))
    if state == "faint":  # uncertain and drawn: just above the threshold
        return float(rng.uniform(threshold + margin, threshold + margin + 0.3 * (spread - margin)))
    return float(rng.uniform(threshold - spread, threshold - margin))


def plan_frontal(rng: np.random.Generator, subject: dict, drawn: dict[str, str], design: Design) -> dict:
    """Draw the geometry, exposure, distractors and finding parameters of one frontal image (mm)."""
    width, height = _native_size(rng)
    spacing = PIXEL_SPACING_SHORT_SIDE_MM / min(width, height)
    fov_w, fov_h = width * spacing, height * spacing
    thorax = subject["thorax_mm"] * rng.uniform(0.97, 1.03)
    thorax = min(thorax, 0.92 * fov_w)
    lung_h = min(thorax * subject["height_ratio"], 0.80 * fov_h)
    scale = thorax / 290.0
    cx = float(rng.normal(0, 6))
    y_apex = float(-0.5 * lung_h + rng.uniform(-0.06, 0.03) * fov_h)
    y_apex = max(y_apex, -0.5 * fov_h + 0.08 * fov_h)
    y_cp = y_apex + lung_h
    dome = subject["dome_mm"] * scale
    ctr = _draw_ratio(rng, drawn["Cardiomegaly"], CTR_THRESHOLD, design.ctr_margin, design.ctr_spread)
    med = _draw_ratio(
        rng,
        drawn["Enlarged Cardiomediastinum"],
        MEDIASTINUM_THRESHOLD,
        0.6 * design.ctr_margin,
        0.6 * design.ctr_spread,
    )
    heart_w = ctr * thorax
    left = subject["heart_left_frac"] + rng.uniform(-0.03, 0.03)
    heart_b = heart_w * subject["heart_shape"]
    y_heart = y_cp - dome - rng.uniform(0.1, 0.3) * heart_b
    med_w = med * thorax
    med_left = rng.uniform(0.45, 0.6)
    plan = {
        "view": "PA" if rng.random() < 0.6 else "AP",
        "native_width": width,
        "native_height": height,
        "fov_w": fov_w,
        "fov_h": fov_h,
        "cx": cx,
        "thorax": thorax,
        "wall": subject["wall_mm"] * scale,
        "y_apex": y_apex,
        "lung_h": lung_h,
        "apex_x": subject["apex_frac"] * thorax,
        "dome": [
            dome * rng.uniform(1.0, 1.25),
            dome * rng.uniform(0.85, 1.0),
        ],  # image left (patient R) higher
        "ctr": ctr,
        "heart": {
            "right_mm": (1 - left) * heart_w,  # towards image left
            "left_mm": left * heart_w,
            "y": y_heart,
            "b": heart_b,
            "power": subject["heart_power"],
        },
        "mediastinum_ratio": med,
        "mediastinum": [(1 - med_left) * med_w, med_left * med_w],
        "exposure": {
            "lo": float(rng.uniform(-0.15, 0.1)),
            "hi": float(rng.uniform(1.15, 1.6)),
            "gamma": float(rng.uniform(0.75, 1.35)),
            "tilt": [float(rng.normal(0, 0.05)), float(rng.normal(0, 0.05))],
        },
        "noise_seed": int(rng.integers(2**31)),
        "noise": design.noise,
    }
    y_hilum = y_apex + rng.uniform(0.38, 0.46) * lung_h
    plan["hilum_y"] = y_hilum
    plan["vessels"] = _plan_vessels(rng, plan)
    plan["ribs"] = _plan_ribs(rng, plan)
    plan["bumps"] = _plan_bumps(rng, plan)
    plan["findings"] = _plan_findings(rng, plan, drawn, design)
    return plan


def _lung_point(rng, plan, side: int, t_range=(0.15, 0.9), lateral=(0.15, 0.85)) -> tuple[float, float]:
    """A point inside one lung (side -1 image left, +1 image right), in mm."""
    for _ in range(50):
        t = rng.uniform(*t_range)
        y = plan["y_apex"] + t * plan["lung_h"]
        inner, outer = _lung_span(plan, side, y)
        if outer - inner > 15:
            u = inner + rng.uniform(*lateral) * (outer - inner)
            return plan["cx"] + side * u, y
    return plan["cx"] + side * 0.3 * plan["thorax"], plan["y_apex"] + 0.5 * plan["lung_h"]


def _lung_span(plan, side: int, y: float) -> tuple[float, float]:
    """Distance from the midline of one lung's medial and lateral borders at height y (scalar)."""
    inner = _medial_border(plan, side, np.array([[y]], dtype=np.float64))[0, 0]
    outer = _lateral_border(plan, np.array([[y]], dtype=np.float64))[0, 0]
    return float(inner), float(outer)


def _plan_vessels(rng, plan) -> list[dict]:
    vessels = []
    for side in (-1, 1):
        start_x = plan["cx"] + side * (plan["mediastinum"][(side + 1) // 2] + 8)
        for _ in range(16):
            angle = rng.uniform(-1.2, 1.3)  # 0 = lateral, + = downwards
            length = rng.uniform(0.35, 0.6) * plan["thorax"]
            points = [(start_x + side * rng.uniform(0, 12), plan["hilum_y"] + rng.uniform(-25, 25))]
            for _ in range(6):
                angle += rng.normal(0, 0.18)
                step = length / 6
                x, y = points[-1]
                points.append((x + side * step * math.cos(angle), y + step * math.sin(angle)))
            vessels.append({"points": points, "w0": rng.uniform(2.5, 4.0), "w1": 0.8, "a0": 0.09, "a1": 0.03})
            for _ in range(2):  # side branches
                k = int(rng.integers(2, 5))
                branch_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
                bx, by = points[k]
                pts = [(bx, by)]
                for _ in range(3):
                    branch_angle += rng.normal(0, 0.2)
                    s = length / 8
                    pts.append(
                        (
                            pts[-1][0] + side * s * math.cos(branch_angle),
                            pts[-1][1] + s * math.sin(branch_angle),
                        )
                    )
                vessels.append({"points": pts, "w0": 1.8, "w1": 0.7, "a0": 0.05, "a1": 0.025})
    return vessels


def _plan_ribs(rng, plan) -> list[dict]:
    scale = plan["thorax"] / 290.0
    ribs = []
    spacing = plan["lung_h"] / 9.5
    for side in (-1, 1):
        for k in range(10):
            ribs.append(
                {
                    "side": side,
                    "y0": plan["y_apex"] - 0.25 * spacing + k * spacing + rng.normal(0, 1.5),
                    "slope": rng.uniform(-0.2, -0.1),
                    "curve": rng.uniform(0.0022, 0.003) / scale,
                    "width": rng.uniform(9, 12) * scale,
                }
            )
    return ribs


def _plan_bumps(rng, plan) -> list[dict]:
    """Smooth one-sided density bumps in the lungs (what Edema must be told apart from)."""
    bumps = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(1, 3))):
            x, y = _lung_point(rng, plan, side, (0.3, 0.8), (0.1, 0.7))
            bumps.append(
                {
                    "x": x,
                    "y": y,
                    "sigma": rng.uniform(0.12, 0.2) * plan["thorax"],
                    "a": rng.uniform(-0.05, 0.07),
                }
            )
    return bumps


def _plan_findings(rng, plan, drawn: dict[str, str], design: Design) -> dict:
    """Parameters of every finding and decoy. Each finding draws from its own generator, so turning
    one finding on or off leaves the rest of the image (anatomy, decoys, other findings) unchanged."""
    gens = {name: np.random.default_rng(rng.integers(2**63)) for name in PATHOLOGIES}
    scale = plan["thorax"] / 290.0
    fc = design.fine_contrast
    fs = design.fine_size * scale
    f: dict[str, Any] = {}

    def strength(name):
        # Uncertain studies that are drawn get a faint version (40-60% of the density or size).
        return 1.0 if drawn[name] == "strong" else float(gens[name].uniform(0.4, 0.6))

    def side_of(name):
        return int(gens[name].choice([-1, 1]))

    g = gens["Edema"]
    f["Edema"] = {"a": float(0.10 * g.uniform(0.8, 1.2) * strength("Edema")), "sigma": 0.2 * plan["thorax"]}
    g = gens["Pleural Effusion"]
    sides = [side_of("Pleural Effusion")] if g.random() < 0.6 else [-1, 1]
    f["Pleural Effusion"] = [
        {
            "side": s,
            "height": g.uniform(10, 40) * scale * strength("Pleural Effusion"),
            "meniscus": g.uniform(0.5, 0.8),
        }
        for s in sides
    ]
    g = gens["Consolidation"]
    x, y = _lung_point(g, plan, side_of("Consolidation"), (0.35, 0.85), (0.3, 0.7))
    f["Consolidation"] = {
        "x": x,
        "y": y,
        "r": g.uniform(17, 30) * scale,
        "a": 0.30 * strength("Consolidation"),
        "bronchi": [[x + g.normal(0, 6), y + g.normal(0, 6), g.uniform(0, math.pi)] for _ in range(3)],
    }
    g = gens["Pneumonia"]
    x, y = _lung_point(g, plan, side_of("Pneumonia"), (0.4, 0.85), (0.3, 0.7))
    spread = g.uniform(15, 30) * scale
    a = 0.18 * strength("Pneumonia")
    f["Pneumonia"] = [
        {
            "x": x + g.normal(0, spread / 2),
            "y": y + g.normal(0, spread / 2),
            "sigma": g.uniform(4, 7.5) * scale,
            "a": a,
        }
        for _ in range(int(g.integers(3, 7)))
    ]
    g = gens["Atelectasis"]
    x, y = _lung_point(g, plan, side_of("Atelectasis"), (0.65, 0.85), (0.35, 0.6))
    half, tilt = g.uniform(25, 45) * scale, g.uniform(-0.25, 0.25)
    f["Atelectasis"] = {
        "points": [(x - half, y - half * tilt), (x + half, y + half * tilt)],
        "width": g.uniform(4, 7) * scale,
        "a": 0.25 * strength("Atelectasis"),
    }
    g = gens["Lung Opacity"]
    x, y = _lung_point(g, plan, side_of("Lung Opacity"), (0.2, 0.85), (0.25, 0.75))
    f["Lung Opacity"] = {
        "x": x,
        "y": y,
        "sigma": g.uniform(10, 20) * scale,
        "a": 0.14 * strength("Lung Opacity"),
    }
    g = gens["Pleural Other"]
    t0 = g.uniform(0.25, 0.6)
    f["Pleural Other"] = {
        "side": side_of("Pleural Other"),
        "t0": t0,
        "t1": t0 + g.uniform(50, 90) * scale / plan["lung_h"],
        "thickness": g.uniform(2.5, 4.0) * scale,
        "a": 0.35 * strength("Pleural Other"),
    }
    # Fine findings: every image has several decoys of each kind; a positive turns decoys into the finding
    # (same place, same integrated density), so counts and coarse-scale content do not depend on labels.
    g = gens["Lung Lesion"]
    blobs = []
    k = design.fine_instances
    for _ in range(int(g.integers(k + 1, k + 5))):
        x, y = _lung_point(g, plan, side_of("Lung Lesion"), (0.15, 0.85), (0.15, 0.85))
        blobs.append(
            {
                "x": x,
                "y": y,
                "r": g.uniform(3.25, 5.2) * fs,
                "a": 0.60 * fc,
                "sigma": g.uniform(5.2, 6.5) * fs,
                "kind": "decoy",
            }
        )
    if drawn["Lung Lesion"] != "absent":
        for blob in blobs[:k]:
            blob["kind"], blob["a"] = "nodule", blob["a"] * (1.0 if drawn["Lung Lesion"] == "strong" else 0.7)
    f["blobs"] = blobs
    g = gens["Pneumothorax"]
    lines = []
    for _ in range(int(g.integers(1, 3))):
        t0 = g.uniform(0.02, 0.2)
        lines.append(
            {
                "side": side_of("Pneumothorax"),
                "t0": t0,
                "t1": t0 + g.uniform(0.45, 0.65),
                "inset": g.uniform(10.4, 32.5) * fs,
                "w": 1.56 * fs,
                "a": 0.60 * fc,
                "sigma": 5.2 * fs,
                "kind": "decoy",
            }
        )
    if drawn["Pneumothorax"] != "absent":
        lines[0]["kind"] = "pneumothorax"
        if drawn["Pneumothorax"] == "faint":
            lines[0]["inset"] = lines[0]["inset"] * 0.5
    f["lines"] = lines
    g = gens["Fracture"]
    marks = []
    for _ in range(int(g.integers(k + 1, k + 4))):
        rib = int(g.integers(2, 8)) + 10 * int(g.integers(0, 2))
        marks.append(
            {
                "rib": rib,
                "u": g.uniform(0.45, 0.85),
                "gap": g.uniform(3.25, 5.2) * fs,
                "step": g.uniform(1.3, 2.6) * fs * g.choice([-1, 1]),
                "sigma": 7.8 * fs,
                "kind": "decoy",
            }
        )
    marks = list({m["rib"]: m for m in marks}.values())  # at most one mark per rib
    if drawn["Fracture"] != "absent":
        for mark in marks[:k]:
            mark["kind"] = "fracture"
    f["rib_marks"] = marks
    g = gens["Support Devices"]
    wires = []
    for _ in range(int(g.integers(k + 1, k + 4))):
        x0 = plan["cx"] + g.uniform(-0.45, 0.45) * plan["thorax"]
        y0 = plan["y_apex"] + g.uniform(-0.1, 0.3) * plan["lung_h"]
        pts = [(x0, y0)]
        angle = g.uniform(0.3, 2.8)
        for _ in range(6):
            angle += g.normal(0, 0.25)
            step = g.uniform(0.06, 0.1) * plan["lung_h"]
            pts.append((pts[-1][0] + step * math.cos(angle), pts[-1][1] + step * math.sin(angle)))
        wires.append({"points": pts, "w": 1.56 * fs, "a": 0.70 * fc, "sigma": 5.2 * fs, "kind": "decoy"})
    if drawn["Support Devices"] != "absent":
        for wire in wires[:k]:
            wire["kind"] = "device"
    f["wires"] = wires
    f["drawn"] = dict(drawn)
    return f


# ----------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """Pixel-centre coordinates (mm, origin at the image centre, x to the image right, y down)."""

    def __init__(self, width: int, height: int, fov_w: float, fov_h: float):
        self.width, self.height = width, height
        self.px = fov_h / height
        self.x = ((np.arange(width, dtype=np.float32) + 0.5) * (fov_w / width) - fov_w / 2)[None, :]
        self.y = ((np.arange(height, dtype=np.float32) + 0.5) * self.px - fov_h / 2)[:, None]
        self.x0, self.y0 = float(self.x[0, 0]), float(self.y[0, 0])
        self.px_x = fov_w / width

    def window(self, x_lo, x_hi, y_lo, y_hi):
        """Slices and local coordinate grids of the pixels inside a box (mm); None when empty."""
        c0 = max(int(math.floor((x_lo - self.x0) / self.px_x)), 0)
        c1 = min(int(math.ceil((x_hi - self.x0) / self.px_x)) + 1, self.width)
        r0 = max(int(math.floor((y_lo - self.y0) / self.px)), 0)
        r1 = min(int(math.ceil((y_hi - self.y0) / self.px)) + 1, self.height)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1)), self.x[:, c0:c1], self.y[r0:r1, :]

    def soft(self, d, edge_mm: float = 1.5):
        """Anti-aliased step: 0 outside (d < 0), 1 inside, over max(edge, 1 px)."""
        return np.clip(d / max(edge_mm, self.px) + 0.5, 0.0, 1.0)


def _segment_distance(x, y, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length2 = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)), t


def _add_polyline(img, canvas, points, amp, kind="sharp", width=1.0, sigma=1.0, amp_end=None, width_end=None):
    """Add a polyline whose amplitude and width may taper from start to end.

    ``sharp``: a box profile of ``width`` (area-sampled, so a line thinner than a pixel keeps its
    integrated density); ``soft``: a Gaussian of ``sigma`` with the same integral as the sharp line.
    Segments are combined by their maximum, so joints are not counted twice.
    """
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts) - 1
    amp_end = amp if amp_end is None else amp_end
    width_end = width if width_end is None else width_end
    sign = 1.0 if amp >= 0 else -1.0
    reach = max(width, width_end, 3.5 * sigma if kind == "soft" else 0.0) + 2 * canvas.px
    win = canvas.window(
        pts[:, 0].min() - reach, pts[:, 0].max() + reach, pts[:, 1].min() - reach, pts[:, 1].max() + reach
    )
    if win is None:
        return
    (rows, cols), _, _ = win
    layer = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    soft_s = math.hypot(sigma, 0.45 * canvas.px)
    for i in range(n):
        p0, p1 = pts[i], pts[i + 1]
        sub = canvas.window(
            min(p0[0], p1[0]) - reach,
            max(p0[0], p1[0]) + reach,
            min(p0[1], p1[1]) - reach,
            max(p0[1], p1[1]) + reach,
        )
        if sub is None:
            continue
        (r, c), x, y = sub
        d, t = _segment_distance(x, y, p0, p1)
        frac = (i + t) / n
        a = sign * (amp + (amp_end - amp) * frac)
        if kind == "sharp":
            profile = _box(d, width + (width_end - width) * frac, canvas.px)
        else:
            profile = width / (math.sqrt(2 * math.pi) * soft_s) * np.exp(-0.5 * (d / soft_s) ** 2)
        local = (
            slice(r.start - rows.start, r.stop - rows.start),
            slice(c.start - cols.start, c.stop - cols.start),
        )
        np.maximum(layer[local], (a * profile).astype(np.float32), out=layer[local])
    img[rows, cols] += sign * layer


def _splat_vessels(canvas, vessels: list[dict]) -> np.ndarray:
    """Vessel texture: tapering lines deposited as points along each polyline, then Gaussian-blurred.

    Each point carries the line's integrated density (amplitude x width x step), so the texture has
    the same density per mm at every pixel size; three width classes get their own blur. Much faster
    than exact line distances when there are hundreds of segments.
    """
    from scipy.ndimage import gaussian_filter

    step = min(0.5 * canvas.px, 1.0)
    xs, ys, masses, widths = [], [], [], []
    for v in vessels:
        pts = np.asarray(v["points"], dtype=np.float64)
        seg = np.diff(pts, axis=0)
        lengths = np.hypot(seg[:, 0], seg[:, 1])
        cum = np.concatenate([[0.0], np.cumsum(lengths)])
        s = np.arange(0.5 * step, cum[-1], step)
        frac = s / max(cum[-1], 1e-9)
        xs.append(np.interp(s, cum, pts[:, 0]))
        ys.append(np.interp(s, cum, pts[:, 1]))
        w = v["w0"] + (v["w1"] - v["w0"]) * frac
        masses.append((v["a0"] + (v["a1"] - v["a0"]) * frac) * w * step)
        widths.append(w)
    x, y = np.concatenate(xs), np.concatenate(ys)
    mass, width = np.concatenate(masses), np.concatenate(widths)
    out = np.zeros((canvas.height, canvas.width), np.float64)
    col = (x - canvas.x0) / canvas.px_x
    row = (y - canvas.y0) / canvas.px
    for lo, hi in ((0.0, 1.3), (1.3, 2.3), (2.3, 99.0)):
        pick = (width >= lo) & (width < hi)
        if not pick.any():
            continue
        layer = np.zeros(canvas.height * canvas.width, np.float64)
        c, r, m = col[pick], row[pick], mass[pick]
        c0, r0 = np.floor(c).astype(int), np.floor(r).astype(int)
        fc, fr = c - c0, r - r0
        for dc, dr, wgt in (
            (0, 0, (1 - fc) * (1 - fr)),
            (1, 0, fc * (1 - fr)),
            (0, 1, (1 - fc) * fr),
            (1, 1, fc * fr),
        ):
            cc, rr = c0 + dc, r0 + dr
            ok = (cc >= 0) & (cc < canvas.width) & (rr >= 0) & (rr < canvas.height)
            layer += np.bincount(rr[ok] * canvas.width + cc[ok], weights=(m * wgt)[ok], minlength=layer.size)
        sigma_mm = 0.4 * float(np.median(width[pick]))
        sigma_px = math.sqrt(max((sigma_mm / canvas.px) ** 2 - 0.16, 0.0))
        layer = layer.reshape(canvas.height, canvas.width) / (canvas.px * canvas.px_x)
        out += gaussian_filter(layer, sigma_px, mode="constant") if sigma_px > 0.05 else layer
    return out.astype(np.float32)


def _add_blob(img, canvas, x, y, amp, kind="sharp", r=3.0, sigma=4.0):
    """A disc of radius r ('sharp') or a Gaussian ('soft') with the disc's integrated density."""
    reach = max(r, 3.5 * sigma) + 2 * canvas.px
    win = canvas.window(x - reach, x + reach, y - reach, y + reach)
    if win is None:
        return
    sl, gx, gy = win
    d = np.hypot(gx - x, gy - y)
    if kind == "sharp":
        r_eff = max(r, 0.6 * canvas.px)
        profile = (r / r_eff) ** 2 * np.clip((r_eff - d) / canvas.px + 0.5, 0, 1)
    else:
        s = math.hypot(sigma, 0.45 * canvas.px)
        profile = r * r / (2 * s * s) * np.exp(-0.5 * (d / s) ** 2)
    img[sl] += (amp * profile).astype(np.float32)


def _lateral_border(plan, y):
    """Distance from the midline to the inner chest wall at heights y (array)."""
    t = (y - plan["y_apex"]) / plan["lung_h"]
    c, half = plan["apex_x"], plan["thorax"] / 2
    rise = np.sqrt(np.clip(1 - (1 - np.clip(t / 0.95, 0, 1)) ** 2, 0, 1))
    return c + (half - c) * rise


def _heart_half_width(plan, side, y):
    h = plan["heart"]
    a = h["left_mm"] if side > 0 else h["right_mm"]
    v = np.clip(np.abs((y - h["y"]) / h["b"]), 0, 1)
    return a * np.clip(1 - v ** h["power"], 0, 1) ** (1 / h["power"])


def _medial_border(plan, side, y):
    """Distance from the midline to one lung's medial border (mediastinum or heart) at heights y."""
    t = (y - plan["y_apex"]) / plan["lung_h"]
    m = plan["mediastinum"][(side + 1) // 2]
    inner = np.maximum(m, _heart_half_width(plan, side, y))
    c = plan["apex_x"]
    rise = np.sqrt(np.clip(1 - (1 - np.clip(t / 0.22, 0, 1)) ** 2, 0, 1))
    return c + (inner - c) * rise


def _diaphragm(plan, side, u):
    """Height (mm, y down) of one hemidiaphragm at distance u from the midline."""
    q = plan["thorax"] / 4
    dome = plan["dome"][(side + 1) // 2]
    return plan["y_apex"] + plan["lung_h"] - dome * np.clip(1 - ((u - q) / (1.15 * q)) ** 2, 0, 1)


def _lung_masks(plan, canvas):
    """Soft masks of the image-left and image-right lungs."""
    x, y = canvas.x - plan["cx"], canvas.y
    masks = []
    for side in (-1, 1):
        u = side * x
        lateral = _lateral_border(plan, y)
        medial = _medial_border(plan, side, y)
        top = canvas.soft(y - plan["y_apex"], 3.0)
        mask = canvas.soft(u - medial, 1.5) * canvas.soft(lateral - u, 1.5) * top
        mask = mask * canvas.soft(_diaphragm(plan, side, np.clip(u, 0, None)) - y, 1.5)
        masks.append(mask.astype(np.float32))
    return masks


def render_frontal(plan: dict, width: int, height: int) -> tuple[np.ndarray, dict]:
    """Render a frontal plan at width x height px; returns (uint8 image, pixel-space truth details)."""
    canvas = _Canvas(width, height, plan["fov_w"], plan["fov_h"])
    x, y = canvas.x - plan["cx"], canvas.y
    left_lung, right_lung = _lung_masks(plan, canvas)
    lungs = left_lung + right_lung
    half_body = plan["thorax"] / 2 + plan["wall"]
    shoulders = plan["y_apex"] + 0.12 * plan["lung_h"]
    body_half = half_body + np.clip(shoulders - y, 0, None) * 3.0
    body = canvas.soft(body_half - np.abs(x), 6.0)
    density = np.ones((height, width), np.float32) * body
    f = plan["findings"]
    # Soft, one-sided bumps and the edema haze act on lung density before air is subtracted.
    haze = np.zeros((height, width), np.float32)
    for bump in plan["bumps"]:
        _add_blob(
            haze,
            canvas,
            bump["x"],
            bump["y"],
            bump["a"],
            kind="soft",
            r=bump["sigma"] * 1.414,
            sigma=bump["sigma"],
        )
    if f["drawn"]["Edema"] != "absent":
        for side in (-1, 1):
            hx = plan["cx"] + side * (plan["mediastinum"][(side + 1) // 2] + 0.12 * plan["thorax"])
            s = f["Edema"]["sigma"]
            _add_blob(haze, canvas, hx, plan["hilum_y"], f["Edema"]["a"], kind="soft", r=s * 1.414, sigma=s)
    # Lung texture: vessels, kept zero-mean where a pneumothorax removes them.
    vessels = _splat_vessels(canvas, plan["vessels"])
    vessels *= lungs
    for line in f["lines"]:
        if line["kind"] == "pneumothorax":
            side = line["side"]
            lateral = _lateral_border(plan, y)
            t = (y - plan["y_apex"]) / plan["lung_h"]
            inside = canvas.soft(side * x - (lateral - line["inset"]), 0.5) * canvas.soft(t - line["t0"], 1.0)
            inside = inside * canvas.soft(line["t1"] - t, 1.0) * (left_lung if side < 0 else right_lung)
            mean_vessel = float(vessels[lungs > 0.5].mean()) if (lungs > 0.5).any() else 0.0
            vessels = vessels * (1 - inside) + mean_vessel * inside
    density += haze * lungs
    density -= 0.58 * lungs
    density += vessels
    density += 0.10 * canvas.soft(18 * plan["thorax"] / 290 - np.abs(x), 3.0) * (1 - lungs)  # spine
    _render_ribs(density, canvas, plan, lungs)
    for side in (-1, 1):  # clavicles
        y0 = plan["y_apex"] + 0.1 * plan["lung_h"]
        pts = [
            (plan["cx"] + side * 20, y0),
            (plan["cx"] + side * 0.25 * plan["thorax"], y0 - 0.06 * plan["lung_h"]),
            (plan["cx"] + side * 0.55 * plan["thorax"], y0 - 0.12 * plan["lung_h"]),
        ]
        _add_polyline(density, canvas, pts, 0.16, "sharp", 13 * plan["thorax"] / 290)
    truth = _render_findings(density, canvas, plan, lungs, left_lung, right_lung)
    image = _expose(density, canvas, plan)
    return image, truth


def _rib_centre(plan, rib, u):
    return rib["y0"] + rib["slope"] * u + rib["curve"] * u * u


def _render_ribs(density, canvas, plan, lungs):
    cortex = 1.4
    marks = {m["rib"]: m for m in plan["findings"]["rib_marks"]}
    reach = plan["thorax"] / 2 + plan["wall"]
    for i, rib in enumerate(plan["ribs"]):
        side = rib["side"]
        ends = plan["cx"] + side * np.array([12.0, reach + 10])
        centres = _rib_centre(plan, rib, np.linspace(0, reach + 10, 20))
        margin = rib["width"] + 5 + 2 * canvas.px
        win = canvas.window(ends.min(), ends.max(), centres.min() - margin, centres.max() + margin)
        if win is None:
            continue
        sl, x, y = win
        u = side * (x - plan["cx"])
        centre = _rib_centre(plan, rib, np.clip(u, 0, None))
        mask_u = canvas.soft(u - 12, 3.0) * canvas.soft(reach - u, 6.0)
        half = rib["width"] / 2
        mark = marks.get(i)
        if mark is not None:
            u_mark = mark["u"] * plan["thorax"] / 2
            if mark["kind"] == "fracture":
                # A sharp gap across the rib and a step of the lateral fragment. The step is local
                # (a kink over ~1 cm), so it carries no coarse-scale signal.
                beyond = canvas.soft(u - u_mark, 0.3) * np.exp(-0.5 * ((u - u_mark) / mark["sigma"]) ** 2)
                centre = centre + mark["step"] * beyond
                mask_u = mask_u * (1 - _box(u - u_mark, mark["gap"], canvas.px))
            else:  # decoy: a soft dip that removes the same density as the gap
                depth = mark["gap"] / (math.sqrt(2 * math.pi) * mark["sigma"])
                mask_u = mask_u * (1 - depth * np.exp(-0.5 * ((u - u_mark) / mark["sigma"]) ** 2))
        d = np.abs(y - centre)
        body = canvas.soft(half - d, 1.0)
        rim = _box(d - (half - cortex / 2), cortex, canvas.px)
        # Bone shows best against air: ribs are faint over soft tissue (heart, mediastinum, abdomen).
        density[sl] += ((0.07 * body + 0.14 * rim) * mask_u * (0.3 + 0.7 * lungs[sl])).astype(np.float32)


def _box(d, width, px):
    """Area-conserving box of ``width`` centred at d = 0, sampled with pixels of size px."""
    half = 0.5 * width
    lo, hi = np.maximum(d - px / 2, -half), np.minimum(d + px / 2, half)
    return np.clip(hi - lo, 0, None) / px


def _render_findings(density, canvas, plan, lungs, left_lung, right_lung) -> dict:
    """Draw every finding of the plan; return their pixel-space truth (centres, radii...)."""
    f = plan["findings"]
    x, y = canvas.x - plan["cx"], canvas.y
    truth: dict[str, Any] = {}
    to_px = _to_pixels(canvas)
    scale = plan["thorax"] / 290.0
    if f["drawn"]["Pleural Effusion"] != "absent":
        truth["effusions"] = []
        for e in f["Pleural Effusion"]:
            side = e["side"]
            u = side * x
            # A fluid level over the whole dome (the diaphragm is hidden) with a meniscus that rises
            # towards the chest wall: e["height"] above the dome at the wall, a fifth of it medially.
            q = np.clip(u / (plan["thorax"] / 2), 0, 1) ** (1 / e["meniscus"])
            top = (
                plan["y_apex"]
                + plan["lung_h"]
                - plan["dome"][(side + 1) // 2]
                - e["height"] * (0.2 + 0.8 * q)
            )
            fluid = canvas.soft(y - top, 2.0) * (left_lung if side < 0 else right_lung)
            density += 0.5 * fluid
            truth["effusions"].append({"side": side, "height_px": e["height"] / canvas.px})
    if f["drawn"]["Consolidation"] != "absent":
        c = f["Consolidation"]
        patch = np.zeros_like(density)
        _add_blob(patch, canvas, c["x"], c["y"], c["a"], "sharp", r=c["r"])
        for bx, by, ang in c["bronchi"]:
            dx, dy = 0.6 * c["r"] * math.cos(ang), 0.6 * c["r"] * math.sin(ang)
            _add_polyline(
                patch, canvas, [(bx - dx, by - dy), (bx + dx, by + dy)], -0.6 * c["a"], "sharp", 2.0 * scale
            )
        density += np.clip(patch, 0, None) * lungs
        truth["consolidation"] = {"centre_px": to_px(c["x"], c["y"]), "radius_px": c["r"] / canvas.px}
    if f["drawn"]["Pneumonia"] != "absent":
        patch = np.zeros_like(density)
        for b in f["Pneumonia"]:
            _add_blob(patch, canvas, b["x"], b["y"], b["a"], "soft", r=2 * b["sigma"], sigma=b["sigma"])
        density += np.minimum(patch, 0.25) * lungs
        truth["pneumonia"] = [
            {"centre_px": to_px(b["x"], b["y"]), "sigma_px": b["sigma"] / canvas.px} for b in f["Pneumonia"]
        ]
    if f["drawn"]["Atelectasis"] != "absent":
        a = f["Atelectasis"]
        band = np.zeros_like(density)
        _add_polyline(band, canvas, a["points"], a["a"], "sharp", a["width"])
        density += band * lungs
        truth["atelectasis"] = {
            "ends_px": [to_px(*p) for p in a["points"]],
            "width_px": a["width"] / canvas.px,
        }
    if f["drawn"]["Lung Opacity"] != "absent":
        o = f["Lung Opacity"]
        patch = np.zeros_like(density)
        _add_blob(patch, canvas, o["x"], o["y"], o["a"], "soft", r=2 * o["sigma"], sigma=o["sigma"])
        density += patch * lungs
        truth["lung_opacity"] = {"centre_px": to_px(o["x"], o["y"]), "sigma_px": o["sigma"] / canvas.px}
    if f["drawn"]["Pleural Other"] != "absent":
        p = f["Pleural Other"]
        side = p["side"]
        u = side * x
        t = (y - plan["y_apex"]) / plan["lung_h"]
        lateral = _lateral_border(plan, y)
        band = _box(lateral - u - p["thickness"] / 2, p["thickness"], canvas.px)
        band = band * canvas.soft(t - p["t0"], 2.0) * canvas.soft(p["t1"] - t, 2.0)
        density += p["a"] * band * (y < plan["y_apex"] + plan["lung_h"])
        truth["pleural_other"] = {"side": side, "thickness_px": p["thickness"] / canvas.px}
    if f["drawn"]["Edema"] != "absent":
        truth["edema"] = {"amplitude": f["Edema"]["a"], "sigma_px": f["Edema"]["sigma"] / canvas.px}
    nodules = []
    for b in f["blobs"]:
        if b["kind"] == "nodule":
            _add_blob(density, canvas, b["x"], b["y"], b["a"], "sharp", r=b["r"])
            nodules.append({"centre_px": to_px(b["x"], b["y"]), "radius_px": b["r"] / canvas.px})
        else:
            _add_blob(density, canvas, b["x"], b["y"], b["a"], "soft", r=b["r"], sigma=b["sigma"])
    if nodules:
        truth["nodules"] = nodules
    for line in f["lines"]:
        pts = _wall_curve(plan, line)
        if line["kind"] == "pneumothorax":
            _add_polyline(density, canvas, pts, line["a"], "sharp", line["w"])
            truth["pneumothorax"] = {
                "side": line["side"],
                "line_px": [to_px(*p) for p in pts[:: max(len(pts) // 4, 1)]],
                "inset_px": line["inset"] / canvas.px,
            }
        else:
            _add_polyline(density, canvas, pts, line["a"], "soft", line["w"], sigma=line["sigma"])
    for mark in f["rib_marks"]:
        if mark["kind"] == "fracture":
            rib = plan["ribs"][mark["rib"]]
            u = mark["u"] * plan["thorax"] / 2
            fx, fy = plan["cx"] + rib["side"] * u, _rib_centre(plan, rib, u)
            truth.setdefault("fractures", []).append(
                {"centre_px": to_px(fx, fy), "gap_px": mark["gap"] / canvas.px}
            )
    devices = []
    for w in f["wires"]:
        if w["kind"] == "device":
            _add_polyline(density, canvas, w["points"], w["a"], "sharp", w["w"])
            devices.append({"points_px": [to_px(*p) for p in w["points"]], "width_px": w["w"] / canvas.px})
        else:
            _add_polyline(density, canvas, w["points"], w["a"], "soft", w["w"], sigma=w["sigma"])
    if devices:
        truth["devices"] = devices
    return truth


def _wall_curve(plan, line) -> list[tuple[float, float]]:
    """Points of a line that runs parallel to the chest wall, ``inset`` mm inside it."""
    ts = np.linspace(line["t0"], line["t1"], 12)
    ys = plan["y_apex"] + ts * plan["lung_h"]
    us = _lateral_border(plan, ys[:, None])[:, 0] - line["inset"]
    us = np.maximum(us, plan["apex_x"] * 0.6)
    return [(plan["cx"] + line["side"] * float(u), float(v)) for u, v in zip(us, ys, strict=True)]


def _to_pixels(canvas):
    def convert(x_mm, y_mm):
        return [round((x_mm - canvas.x0) / canvas.px_x, 2), round((y_mm - canvas.y0) / canvas.px, 2)]

    return convert


def _expose(density, canvas, plan) -> np.ndarray:
    """Density -> 8-bit brightness: exposure window, gamma, heel-effect tilt, film noise."""
    e = plan["exposure"]
    x = canvas.x / (canvas.width * canvas.px_x)
    y = canvas.y / (canvas.height * canvas.px)
    density = density + e["tilt"][0] * x + e["tilt"][1] * y
    noise_rng = np.random.default_rng(plan["noise_seed"])
    # Noise defined per mm^2: coarser pixels average more of it.
    sigma = plan["noise"] / max(canvas.px, 1.0)
    density += noise_rng.standard_normal(density.shape, dtype=np.float32) * np.float32(sigma)
    value = np.clip((density - e["lo"]) / (e["hi"] - e["lo"]), 0, 1) ** e["gamma"]
    return np.round(value * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing the dataset


def _output_size(native_w: int, native_h: int, max_size: int | None) -> tuple[int, int]:
    if not max_size or max(native_w, native_h) <= max_size:
        return native_w, native_h
    s = max_size / max(native_w, native_h)
    return max(round(native_w * s), 8), max(round(native_h * s), 8)


def _hex_id(rng) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def plan_dataset(subjects: int, seed: int = 0, **design_options) -> tuple[list[dict], Design]:
    """Draw every study's ids, labels and image plans (no rendering). One entry per image."""
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    design = Design(**design_options)
    root = np.random.SeedSequence([int(seed), 20240229])
    id_rng = np.random.default_rng(root.spawn(1)[0])
    subject_ids = 10_000_000 + id_rng.choice(9_999_999, size=subjects, replace=False)
    p_more = 1 - 1 / design.studies_per_subject
    studies = (
        np.minimum(1 + id_rng.geometric(1 - p_more, size=subjects) - 1, 12)
        if p_more > 0
        else np.ones(subjects, int)
    )
    study_ids = 50_000_000 + id_rng.choice(9_999_999, size=int(studies.sum()), replace=False)
    label_rng = np.random.default_rng(root.spawn(2)[1])
    labels = sample_labels(label_rng, design.prevalence, int(studies.sum()))
    entries = []
    k = 0
    for s in range(subjects):
        subject_rng = np.random.default_rng([int(seed), 7, s])
        subject = sample_subject(subject_rng)
        split = (
            "test"
            if subject_rng.random() < 0.05
            else ("validate" if subject_rng.random() < 0.05 else "train")
        )
        day = int(subject_rng.integers(0, 365 * 60))
        for j in range(int(studies[s])):
            rng = np.random.default_rng([int(seed), 11, s, j])
            row = {f: labels.at[k, f] for f in FINDINGS}
            drawn = rendered_presence(row, rng)
            day += int(rng.integers(1, 400))
            date = pd.Timestamp("2110-01-01") + pd.Timedelta(days=day)
            views = ["frontal"] + (["lateral"] if rng.random() < design.lateral_fraction else [])
            frontal_plan = plan_frontal(rng, subject, drawn, design)
            for view in views:
                plan = frontal_plan if view == "frontal" else _plan_lateral(rng, frontal_plan)
                entries.append(
                    {
                        "dicom_id": _hex_id(rng),
                        "subject_id": int(subject_ids[s]),
                        "study_id": int(study_ids[k]),
                        "split": split,
                        "date": date.strftime("%Y%m%d"),
                        "time": f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}"
                        f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}",
                        "labels": row,
                        "drawn": drawn,
                        "plan": plan,
                    }
                )
            k += 1
    return entries, design


def _plan_lateral(rng, frontal: dict) -> dict:
    """A simplified lateral view of the same patient (see :func:`render_lateral`)."""
    plan = dict(frontal)
    plan["view"] = "LATERAL"
    w, h = frontal["native_height"], frontal["native_width"]
    if rng.random() < 0.7:
        w, h = frontal["native_width"], frontal["native_height"]
    plan["native_width"], plan["native_height"] = w, h
    spacing = PIXEL_SPACING_SHORT_SIDE_MM / min(w, h)
    plan["fov_w"], plan["fov_h"] = w * spacing, h * spacing
    plan["depth"] = frontal["thorax"] * rng.uniform(0.75, 0.9)
    plan["noise_seed"] = int(rng.integers(2**31))
    return plan


def render_lateral(plan: dict, width: int, height: int) -> tuple[np.ndarray, dict]:
    """A simplified lateral: one lung field with a rounded apex and a diaphragm that is deepest
    posteriorly, the heart anterior (image left) sized by the CTR, the spine posterior, hilar vessels.

    Only the heart size, effusion (posterior costophrenic fluid), devices and the exposure carry over
    from the frontal plan; it is a teaching simplification, not a lateral radiograph.
    """
    canvas = _Canvas(width, height, plan["fov_w"], plan["fov_h"])
    x, y = canvas.x - plan["cx"], canvas.y  # x: anterior (image left) to posterior (image right)
    depth = plan["depth"]
    body = canvas.soft(depth / 2 + plan["wall"] - np.abs(x), 6.0)
    density = np.ones((height, width), np.float32) * body
    t = (y - plan["y_apex"]) / plan["lung_h"]
    half = depth / 2 - 10
    rounded = half * np.sqrt(np.clip(1 - (1 - np.clip(t / 0.3, 0, 1)) ** 2, 0, 1))
    floor = plan["y_apex"] + plan["lung_h"] - plan["dome"][0] * (1 - np.clip((x / half) ** 2, 0, 1)) + 0.1 * x
    lung = canvas.soft(rounded - np.abs(x), 2.0) * canvas.soft(t, 3.0) * canvas.soft(floor - y, 2.0)
    heart_r = plan["ctr"] * plan["thorax"] * 0.45
    hx, hy = -depth / 2 + 0.9 * heart_r, plan["y_apex"] + plan["lung_h"] - 0.6 * heart_r
    heart = canvas.soft(heart_r - np.hypot(x - hx, y - hy), 2.0)
    lung = lung * (1 - heart)
    if plan["findings"]["drawn"]["Pleural Effusion"] != "absent":
        fluid_mm = max(e["height"] for e in plan["findings"]["Pleural Effusion"])
        top = floor - fluid_mm * np.clip((x + half) / (2 * half), 0, 1) ** 2
        lung = lung * (1 - canvas.soft(y - top, 2.0))
    vessels = [
        {**v, "points": [(plan["cx"] + 0.5 * (px - plan["cx"]), py) for px, py in v["points"]]}
        for v in plan["vessels"][::2]
    ]
    density -= 0.58 * lung
    density += _splat_vessels(canvas, vessels) * lung
    density += 0.12 * canvas.soft(22 - np.abs(x - depth / 2 + 35), 2.0) * body
    for w in plan["findings"]["wires"]:
        if w["kind"] == "device":
            points = [(plan["cx"] + (p[0] - plan["cx"]) * depth / plan["thorax"], p[1]) for p in w["points"]]
            _add_polyline(density, canvas, points, w["a"], "sharp", w["w"])
    return _expose(density, canvas, plan), {"heart_radius_px": heart_r / canvas.px}


def _render_entry(args) -> tuple[bytes, dict]:
    entry, max_size = args
    plan = entry["plan"]
    width, height = _output_size(plan["native_width"], plan["native_height"], max_size)
    render = render_lateral if plan["view"] == "LATERAL" else render_frontal
    image, details = render(plan, width, height)
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    canvas_px = plan["fov_h"] / height
    details["thorax_px"] = plan["thorax"] / (plan["fov_w"] / width)
    details["heart_px"] = plan["ctr"] * plan["thorax"] / (plan["fov_w"] / width)
    details["mm_per_px"] = canvas_px
    return buffer.getvalue(), {"width": width, "height": height, "details": details}


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg`` as in MIMIC-CXR-JPG."""
    s = str(subject_id)
    return Path("files") / f"p{s[:2]}" / f"p{s}" / f"s{study_id}" / f"{dicom_id}.jpg"


_VIEW_TEXT = {
    "PA": ("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
    "AP": ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent"),
    "LATERAL": ("CHEST (PA AND LAT)", "lateral", "Erect"),
}


def make_phantom(
    out_dir: str | os.PathLike,
    subjects: int,
    seed: int = 0,
    max_size: int | None = None,
    workers: int | None = None,
    **design_options,
) -> Path:
    """Write a phantom dataset in the MIMIC-CXR-JPG layout under ``out_dir``; return ``out_dir``.

    Files: ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``, ``mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz``,
    ``phantom_truth.csv`` (what is really drawn in each image) and ``README.txt``. ``max_size`` caps
    the long side of the written images (None: native size). The output is byte-identical for the same
    seed and options, whatever ``workers`` is. ``design_options`` are the fields of :class:`Design`.
    """
    out_dir = Path(out_dir)
    entries, design = plan_dataset(subjects, seed, **design_options)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    jobs = [(e, max_size) for e in entries]
    meta_rows, truth_rows = [], []
    bar = tqdm(total=len(jobs), desc="phantom", unit="img")
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_render_entry, jobs, chunksize=4)
            outputs = _write_all(out_dir, entries, results, bar)
    else:
        outputs = _write_all(out_dir, entries, map(_render_entry, jobs), bar)
    bar.close()
    for entry, info in zip(entries, outputs, strict=True):
        view = entry["plan"]["view"]
        description, view_text, orientation = _VIEW_TEXT[view]
        meta_rows.append(
            {
                "dicom_id": entry["dicom_id"],
                "subject_id": entry["subject_id"],
                "study_id": entry["study_id"],
                "PerformedProcedureStepDescription": description,
                "ViewPosition": view,
                "Rows": info["height"],
                "Columns": info["width"],
                "StudyDate": entry["date"],
                "StudyTime": entry["time"],
                "ProcedureCodeSequence_CodeMeaning": description,
                "ViewCodeSequence_CodeMeaning": view_text,
                "PatientOrientationCodeSequence_CodeMeaning": orientation,
            }
        )
        truth = {
            "dicom_id": entry["dicom_id"],
            "subject_id": entry["subject_id"],
            "study_id": entry["study_id"],
            "view": view,
            "width": info["width"],
            "height": info["height"],
        }
        drawn = entry["drawn"]
        for finding in PATHOLOGIES:
            truth[f"present_{finding}"] = int(drawn[finding] != "absent")
        truth["present_No Finding"] = int(
            all(drawn[f] == "absent" for f in PATHOLOGIES if f not in NO_FINDING_EXCLUDES)
        )
        plan = entry["plan"]
        truth["ctr"] = round(plan["ctr"], 4)
        truth["mediastinum_ratio"] = round(plan["mediastinum_ratio"], 4)
        edema = plan["findings"]["Edema"]["a"] if drawn["Edema"] != "absent" else 0.0
        truth["edema_amplitude"] = round(edema, 4)
        truth["details"] = json.dumps(_rounded(info["details"]), sort_keys=True)
        truth_rows.append(truth)
    _write_tables(out_dir, entries, meta_rows, truth_rows, design, subjects, seed, max_size)
    return out_dir


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _write_all(out_dir: Path, entries, results, bar) -> list[dict]:
    outputs = []
    for entry, (jpeg, info) in zip(entries, results, strict=True):
        path = out_dir / image_relpath(entry["subject_id"], entry["study_id"], entry["dicom_id"])
        with atomic_write(path, "wb") as handle:
            handle.write(jpeg)
        outputs.append(info)
        bar.update(1)
    return outputs


def _gzip_csv(frame: pd.DataFrame, path: Path) -> None:
    # mtime=0 keeps the gzip header (and so the file) identical across runs.
    import gzip

    text = frame.to_csv(index=False).encode()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        handle.write(text)
    with atomic_write(path, "wb") as out:
        out.write(buffer.getvalue())


def _write_tables(out_dir, entries, meta_rows, truth_rows, design, subjects, seed, max_size) -> None:
    _gzip_csv(pd.DataFrame(meta_rows), out_dir / "mimic-cxr-2.0.0-metadata.csv.gz")
    studies = {}
    for entry in entries:
        studies.setdefault(entry["study_id"], entry)
    label_rows = []
    for study_id, entry in studies.items():
        row = {"subject_id": entry["subject_id"], "study_id": study_id}
        row.update({f: entry["labels"][f] for f in FINDINGS})
        label_rows.append(row)
    labels = pd.DataFrame(label_rows).sort_values(["subject_id", "study_id"], kind="stable")
    for f in FINDINGS:
        labels[f] = labels[f].astype("Float64")
    _gzip_csv(labels, out_dir / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split = pd.DataFrame(
        [
            {
                "dicom_id": e["dicom_id"],
                "study_id": e["study_id"],
                "subject_id": e["subject_id"],
                "split": e["split"],
            }
            for e in entries
        ]
    )
    _gzip_csv(split, out_dir / "mimic-cxr-2.0.0-split.csv.gz")
    write_csv_atomic(pd.DataFrame(truth_rows), out_dir / "phantom_truth.csv")
    write_text_atomic(
        "Synthetic chest X-ray teaching phantom (cxrlib.phantom) - NOT real patients, NOT anatomy.\n"
        "Layout and CSV schemas follow MIMIC-CXR-JPG v2.0.0 so the same code runs on real data.\n"
        f"subjects={subjects} seed={seed} max_size={max_size} images={len(entries)} design={design}\n"
        "phantom_truth.csv: per image, what is really drawn (present_<finding>), the cardiothoracic and\n"
        "mediastinal ratios, and finding positions/sizes in pixels of the written image.\n"
        "Labels: 1 positive, 0 negative, -1 uncertain, blank not mentioned. See docs/phantom.md.\n",
        out_dir / "README.txt",
    )


# ----------------------------------------------------------------------------------------------
# Examples per finding (for the figure of fine findings vanishing when downscaled)


def _example_patient(seed: int, design: Design) -> tuple[dict, dict]:
    rng = np.random.default_rng([int(seed), 99])
    subject = sample_subject(rng)
    subject["thorax_mm"] = 290.0
    return subject, {f: "absent" for f in PATHOLOGIES}


def finding_examples(
    resolutions: Sequence[int] = (64, 512), seed: int = 0, size: int | None = None, **design_options
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """For each finding, one patient rendered with and without it, Lanczos-resized to each resolution.

    Returns ``{finding: {resolution: (with_finding, without_finding)}}`` of uint8 ``R x R`` arrays.
    The image is rendered with its long side ``size`` (default: twice the largest resolution, at least
    512) and resized like :func:`cxrlib.cache.resize_to_square`. Fine findings are shown against their
    decoy (the "without" image has the decoy where the finding was), so their difference vanishes
    once they are smaller than a pixel. No Finding: "with" is the healthy patient, "without" the same
    patient with a pleural effusion.
    """
    design = Design(**design_options)
    size = size or max(512, 2 * max(resolutions))
    subject, base = _example_patient(seed, design)
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for finding in FINDINGS:
        if finding == "No Finding":
            with_state, without_state = dict(base), dict(base, **{"Pleural Effusion": "strong"})
        else:
            with_state, without_state = dict(base, **{finding: "strong"}), dict(base)
        images = []
        for state in (with_state, without_state):
            rng = np.random.default_rng([int(seed), 5])
            plan = plan_frontal(rng, subject, state, design)
            width, height = _output_size(plan["native_width"], plan["native_height"], size)
            images.append(render_frontal(plan, width, height)[0])
        out[finding] = {}
        for r in resolutions:
            pair = tuple(
                np.asarray(Image.fromarray(im, "L").resize((r, r), Image.Resampling.LANCZOS)) for im in images
            )
            out[finding][int(r)] = pair
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (MIMIC-CXR-JPG layout)")
    parser.add_argument("--subjects", type=int, default=60, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument(
        "--max-size", type=int, default=None, help="cap on the long side in px (default: native)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="rendering processes (default: CPU count, at most 8)"
    )
    parser.add_argument(
        "--prevalence", default="mimic", choices=PREVALENCES, help="label rates: MIMIC's or balanced"
    )
    parser.add_argument(
        "--lateral-fraction", type=float, default=0.0, help="share of studies with a lateral view"
    )
    parser.add_argument("--studies-per-subject", type=float, default=2.0, help="mean studies per patient")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = make_phantom(
        args.out,
        args.subjects,
        args.seed,
        args.max_size,
        args.workers,
        prevalence=args.prevalence,
        lateral_fraction=args.lateral_fraction,
        studies_per_subject=args.studies_per_subject,
    )
    print(f"phantom written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
