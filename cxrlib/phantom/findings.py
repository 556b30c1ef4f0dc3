"""The phantom's labels (MIMIC-CXR-JPG's rates or balanced ones), its design options (:class:`Design`) and
its 13 pathologies, each a :class:`Finding` with a typed plan, drawn in the order of :data:`REGISTRY` (part
of the phantom's bytes); docs/phantom.md, "Findings", "Labels" and "The code"."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, make_dataclass, replace
from statistics import NormalDist

import numpy as np
import pandas as pd

from ..labels import FINDINGS
from .anatomy import Canvas, add_blob, add_polyline, box, lateral_border, lung_point, rib_centre, wall_curve

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
    shared, cardiac, airspace = (rng.standard_normal(n) for _ in range(3))
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
    sick = frame.drop(columns=list(NO_FINDING_EXCLUDES)).isin([1.0, -1.0]).any(axis=1)
    frame["No Finding"] = np.where(sick, np.nan, 1.0)
    return frame[list(FINDINGS)]


def rendered_presence(labels: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """What is drawn per pathology: 1 ``strong``, -1 ``faint`` half the time, else ``absent``."""
    drawn = {}
    for finding in PATHOLOGIES:
        faint = labels[finding] == -1.0 and rng.random() < 0.5
        drawn[finding] = "strong" if labels[finding] == 1.0 else "faint" if faint else "absent"
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


CTR_THRESHOLD = 0.5
MEDIASTINUM_THRESHOLD = 0.30


@dataclass(frozen=True)
class Scene:
    """What a frontal image's findings are drawn on: canvas, image plan, coordinates and lung masks."""

    canvas: Canvas
    image: dict  # the image's plan (anatomy, exposure)
    x: np.ndarray  # mm from the body's midline, towards the image right
    y: np.ndarray  # mm from the image centre, down
    lungs: np.ndarray
    sides: list[np.ndarray]  # the image-left and the image-right lung


@dataclass(frozen=True)
class FindingPlan:
    """The base of every finding's plan: how the finding is drawn (``strong``, ``faint``, ``absent``)."""

    state: str

    @property
    def present(self) -> bool:
        return self.state != "absent"


def _record(name: str, fields: str, base: type | None = FindingPlan) -> type:
    """A frozen dataclass ``name`` (a typed plan or part of one); ``real`` (else a decoy) defaults False."""
    specs = [("real", bool, field(default=False)) if f == "real" else f for f in fields.split()]
    cls = make_dataclass(name, specs, bases=(base,) if base else (), frozen=True)
    cls.__module__ = __name__  # so that plans pickle (the workers get them)
    return cls


class Finding:
    """One pathology: its typed plan and how it is drawn (three also change the anatomy; docs/phantom.md)."""

    name: str = ""
    Plan: type[FindingPlan] = FindingPlan

    def __init_subclass__(cls):  # the finding's name from its class's: LungLesion is "Lung Lesion"
        cls.name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", cls.__name__)

    def plan(self, rng: np.random.Generator, image: dict, state: str, design: Design) -> FindingPlan:
        """Draw the finding's (and its decoys') parameters in mm from the finding's own generator."""
        return self.Plan(state)

    def render(self, density: np.ndarray, scene: Scene, plan: FindingPlan) -> dict:
        """Draw the finding (if present) and its decoys into ``density``; return its truth in pixels."""
        return {}


def _strength(rng: np.random.Generator, state: str) -> float:
    # Uncertain studies that are drawn get a faint version (40-60% of the density or size).
    return 1.0 if state == "strong" else float(rng.uniform(0.4, 0.6))


def _side(rng: np.random.Generator) -> int:
    return int(rng.choice([-1, 1]))


def _scale(image: dict) -> float:
    return image["thorax"] / 290.0


@dataclass(frozen=True)
class RatioFinding(Finding):
    """A width ratio above a threshold (CTR, mediastinum), drawn with the anatomy by :meth:`draw_ratio`."""

    name: str = ""
    threshold: float = 0.5
    margin_scale: float = 1.0

    def draw_ratio(self, rng: np.random.Generator, state: str, design: Design) -> float:
        """A ratio above the threshold when present (just above when faint), below it when absent."""
        margin, spread = self.margin_scale * design.ctr_margin, self.margin_scale * design.ctr_spread
        threshold = self.threshold
        if state == "strong":
            return float(rng.uniform(threshold + margin, threshold + spread))
        if state == "faint":  # uncertain and drawn: just above the threshold
            return float(rng.uniform(threshold + margin, threshold + margin + 0.3 * (spread - margin)))
        return float(rng.uniform(threshold - spread, threshold - margin))


CARDIOMEGALY = RatioFinding("Cardiomegaly", CTR_THRESHOLD)
ENLARGED_CARDIOMEDIASTINUM = RatioFinding("Enlarged Cardiomediastinum", MEDIASTINUM_THRESHOLD, 0.6)


class Edema(Finding):
    """Bilateral perihilar haze in both lungs at once; its decoys are the anatomy's one-sided bumps."""

    Plan = _record("Edema.Plan", "a sigma")

    def plan(self, rng, image, state, design):
        a = float(0.10 * rng.uniform(0.8, 1.2) * _strength(rng, state))
        return self.Plan(state, a=a, sigma=0.2 * image["thorax"])

    @staticmethod
    def haze(haze: np.ndarray, scene: Scene, plan: FindingPlan) -> None:
        """Add the perihilar haze to the lung haze (before the air is subtracted)."""
        if not plan.present:
            return
        image, s = scene.image, plan.sigma
        for side in (-1, 1):
            hx = image["cx"] + side * (image["mediastinum"][(side + 1) // 2] + 0.12 * image["thorax"])
            add_blob(haze, scene.canvas, hx, image["hilum_y"], plan.a, kind="soft", r=s * 1.414, sigma=s)

    def render(self, density, scene, plan):
        return {"edema": {"amplitude": plan.a, "sigma_px": plan.sigma / scene.canvas.px}}


class PleuralEffusion(Finding):
    """A fluid level hiding a diaphragm dome (one side or both), its meniscus rising to the wall."""

    Fluid = _record("PleuralEffusion.Fluid", "side height meniscus", None)
    Plan = _record("PleuralEffusion.Plan", "fluids")

    def plan(self, rng, image, state, design):
        scale = _scale(image)
        sides = [_side(rng)] if rng.random() < 0.6 else [-1, 1]
        fluids = tuple(
            self.Fluid(s, rng.uniform(10, 40) * scale * _strength(rng, state), rng.uniform(0.5, 0.8))
            for s in sides
        )
        return self.Plan(state, fluids)

    def render(self, density, scene, plan):
        image, canvas = scene.image, scene.canvas
        effusions = []
        for e in plan.fluids:
            side = e.side
            u = side * scene.x
            # A fluid level over the whole dome (the diaphragm is hidden) with a meniscus that rises
            # towards the chest wall: e.height above the dome at the wall, a fifth of it medially.
            q = np.clip(u / (image["thorax"] / 2), 0, 1) ** (1 / e.meniscus)
            dome = image["y_apex"] + image["lung_h"] - image["dome"][(side + 1) // 2]
            top = dome - e.height * (0.2 + 0.8 * q)
            fluid = canvas.soft(scene.y - top, 2.0) * scene.sides[(side + 1) // 2]
            density += 0.5 * fluid
            effusions.append({"side": side, "height_px": e.height / canvas.px})
        return {"effusions": effusions}


class Consolidation(Finding):
    """A dense homogeneous patch 35-60 mm across with dark air bronchograms."""

    Plan = _record("Consolidation.Plan", "x y r a bronchi")

    def plan(self, rng, image, state, design):
        x, y = lung_point(rng, image, _side(rng), (0.35, 0.85), (0.3, 0.7))
        r, a = rng.uniform(17, 30) * _scale(image), 0.30 * _strength(rng, state)
        bronchi = tuple(
            (x + rng.normal(0, 6), y + rng.normal(0, 6), rng.uniform(0, math.pi)) for _ in range(3)
        )
        return self.Plan(state, x, y, r, a, bronchi)

    def render(self, density, scene, plan):
        canvas = scene.canvas
        patch = np.zeros_like(density)
        add_blob(patch, canvas, plan.x, plan.y, plan.a, "sharp", r=plan.r)
        for bx, by, ang in plan.bronchi:
            dx, dy = 0.6 * plan.r * math.cos(ang), 0.6 * plan.r * math.sin(ang)
            w = 2.0 * _scale(scene.image)
            add_polyline(patch, canvas, [(bx - dx, by - dy), (bx + dx, by + dy)], -0.6 * plan.a, "sharp", w)
        density += np.clip(patch, 0, None) * scene.lungs
        return {"consolidation": {"centre_px": canvas.to_px(plan.x, plan.y), "radius_px": plan.r / canvas.px}}


class Pneumonia(Finding):
    """A cluster of 3-6 soft blobs (sigma 4-7.5 mm) over 30-60 mm."""

    Blob = _record("Pneumonia.Blob", "x y sigma a", None)
    Plan = _record("Pneumonia.Plan", "blobs")

    def plan(self, rng, image, state, design):
        scale = _scale(image)
        x, y = lung_point(rng, image, _side(rng), (0.4, 0.85), (0.3, 0.7))
        half, a = rng.uniform(15, 30) * scale / 2, 0.18 * _strength(rng, state)  # half the cluster's spread
        blobs = tuple(
            self.Blob(x + rng.normal(0, half), y + rng.normal(0, half), rng.uniform(4, 7.5) * scale, a)
            for _ in range(int(rng.integers(3, 7)))
        )
        return self.Plan(state, blobs)

    def render(self, density, scene, plan):
        canvas = scene.canvas
        patch = np.zeros_like(density)
        for b in plan.blobs:
            add_blob(patch, canvas, b.x, b.y, b.a, "soft", r=2 * b.sigma, sigma=b.sigma)
        density += np.minimum(patch, 0.25) * scene.lungs
        blobs = [{"centre_px": canvas.to_px(b.x, b.y), "sigma_px": b.sigma / canvas.px} for b in plan.blobs]
        return {"pneumonia": blobs}


class Atelectasis(Finding):
    """A plate-like band 50-90 mm long and 4-7 mm thick in a lower zone."""

    Plan = _record("Atelectasis.Plan", "points width a")

    def plan(self, rng, image, state, design):
        scale = _scale(image)
        x, y = lung_point(rng, image, _side(rng), (0.65, 0.85), (0.35, 0.6))
        half, tilt = rng.uniform(25, 45) * scale, rng.uniform(-0.25, 0.25)
        points = ((x - half, y - half * tilt), (x + half, y + half * tilt))
        return self.Plan(state, points, width=rng.uniform(4, 7) * scale, a=0.25 * _strength(rng, state))

    def render(self, density, scene, plan):
        canvas = scene.canvas
        band = np.zeros_like(density)
        add_polyline(band, canvas, plan.points, plan.a, "sharp", plan.width)
        density += band * scene.lungs
        ends = [canvas.to_px(*p) for p in plan.points]
        return {"atelectasis": {"ends_px": ends, "width_px": plan.width / canvas.px}}


class LungOpacity(Finding):
    """A faint ill-defined patch, sigma 10-20 mm."""

    Plan = _record("LungOpacity.Plan", "x y sigma a")

    def plan(self, rng, image, state, design):
        x, y = lung_point(rng, image, _side(rng), (0.2, 0.85), (0.25, 0.75))
        sigma = rng.uniform(10, 20) * _scale(image)
        return self.Plan(state, x, y, sigma, a=0.14 * _strength(rng, state))

    def render(self, density, scene, plan):
        canvas = scene.canvas
        patch = np.zeros_like(density)
        add_blob(patch, canvas, plan.x, plan.y, plan.a, "soft", r=2 * plan.sigma, sigma=plan.sigma)
        density += patch * scene.lungs
        centre = canvas.to_px(plan.x, plan.y)
        return {"lung_opacity": {"centre_px": centre, "sigma_px": plan.sigma / canvas.px}}


class PleuralOther(Finding):
    """Pleural thickening 2.5-4 mm thick and 50-90 mm long along the chest wall."""

    Plan = _record("PleuralOther.Plan", "side t0 t1 thickness a")

    def plan(self, rng, image, state, design):
        scale, t0, side = _scale(image), rng.uniform(0.25, 0.6), _side(rng)
        t1, thickness = t0 + rng.uniform(50, 90) * scale / image["lung_h"], rng.uniform(2.5, 4.0) * scale
        return self.Plan(state, side, t0, t1, thickness, a=0.35 * _strength(rng, state))

    def render(self, density, scene, plan):
        image, canvas, y = scene.image, scene.canvas, scene.y
        u = plan.side * scene.x
        t = (y - image["y_apex"]) / image["lung_h"]
        lateral = lateral_border(image, y)
        band = box(lateral - u - plan.thickness / 2, plan.thickness, canvas.px)
        band = band * canvas.soft(t - plan.t0, 2.0) * canvas.soft(plan.t1 - t, 2.0)
        density += plan.a * band * (y < image["y_apex"] + image["lung_h"])
        return {"pleural_other": {"side": plan.side, "thickness_px": plan.thickness / canvas.px}}


class LungLesion(Finding):
    """Sharp-edged nodules (radius 3.2-5.2 mm); decoys: soft blobs of the same integrated density."""

    Spot = _record("LungLesion.Spot", "x y r a sigma real", None)
    Plan = _record("LungLesion.Plan", "spots")

    def plan(self, rng, image, state, design):
        fc, fs = design.fine_contrast, design.fine_size * _scale(image)
        k = design.fine_instances
        spots = []
        for _ in range(int(rng.integers(k + 1, k + 5))):
            x, y = lung_point(rng, image, _side(rng), (0.15, 0.85), (0.15, 0.85))
            r, sigma = rng.uniform(3.25, 5.2) * fs, rng.uniform(5.2, 6.5) * fs
            spots.append(self.Spot(x, y, r, 0.60 * fc, sigma))
        if state != "absent":
            faint = 1.0 if state == "strong" else 0.7
            spots[:k] = [replace(spot, real=True, a=spot.a * faint) for spot in spots[:k]]
        return self.Plan(state, tuple(spots))

    def render(self, density, scene, plan):
        canvas = scene.canvas
        nodules = []
        for b in plan.spots:
            if b.real:
                add_blob(density, canvas, b.x, b.y, b.a, "sharp", r=b.r)
                nodules.append({"centre_px": canvas.to_px(b.x, b.y), "radius_px": b.r / canvas.px})
            else:
                add_blob(density, canvas, b.x, b.y, b.a, "soft", r=b.r, sigma=b.sigma)
        return {"nodules": nodules} if nodules else {}


class Pneumothorax(Finding):
    """A 1.6 mm pleural line, no lung texture outside it; decoys: soft skin folds of equal density."""

    Line = _record("Pneumothorax.Line", "side t0 t1 inset w a sigma real", None)
    Plan = _record("Pneumothorax.Plan", "lines")

    def plan(self, rng, image, state, design):
        fc, fs = design.fine_contrast, design.fine_size * _scale(image)
        lines = []
        for _ in range(int(rng.integers(1, 3))):
            t0, side = rng.uniform(0.02, 0.2), _side(rng)
            t1, inset = t0 + rng.uniform(0.45, 0.65), rng.uniform(10.4, 32.5) * fs
            lines.append(self.Line(side, t0, t1, inset, w=1.56 * fs, a=0.60 * fc, sigma=5.2 * fs))
        if state != "absent":
            first = lines[0]
            lines[0] = replace(first, real=True, inset=first.inset * 0.5 if state == "faint" else first.inset)
        return self.Plan(state, tuple(lines))

    @staticmethod
    def texture(vessels: np.ndarray, scene: Scene, plan: FindingPlan) -> np.ndarray:
        """The lung texture ends at the pleural line; its mean is kept so no coarse signal remains."""
        image, canvas, x, y = scene.image, scene.canvas, scene.x, scene.y
        for line in plan.lines:
            if line.real:
                side, lateral = line.side, lateral_border(image, y)
                t = (y - image["y_apex"]) / image["lung_h"]
                inside = canvas.soft(side * x - (lateral - line.inset), 0.5) * canvas.soft(t - line.t0, 1.0)
                inside = inside * canvas.soft(line.t1 - t, 1.0) * scene.sides[(side + 1) // 2]
                lung = scene.lungs > 0.5
                mean_vessel = float(vessels[lung].mean()) if lung.any() else 0.0
                vessels = vessels * (1 - inside) + mean_vessel * inside
        return vessels

    def render(self, density, scene, plan):
        canvas = scene.canvas
        truth = {}
        for line in plan.lines:
            pts = wall_curve(scene.image, line.side, line.t0, line.t1, line.inset)
            if line.real:
                add_polyline(density, canvas, pts, line.a, "sharp", line.w)
                points = [canvas.to_px(*p) for p in pts[:: max(len(pts) // 4, 1)]]
                inset = line.inset / canvas.px
                truth["pneumothorax"] = {"side": line.side, "line_px": points, "inset_px": inset}
            else:
                add_polyline(density, canvas, pts, line.a, "soft", line.w, sigma=line.sigma)
        return truth


class Fracture(Finding):
    """Cortical breaks across ribs with a local step; decoys: soft dips along ribs of equal density."""

    Mark = _record("Fracture.Mark", "rib u gap step sigma real", None)
    Plan = _record("Fracture.Plan", "marks")

    def plan(self, rng, image, state, design):
        fs = design.fine_size * _scale(image)
        k = design.fine_instances
        marks = []
        for _ in range(int(rng.integers(k + 1, k + 4))):
            rib = int(rng.integers(2, 8)) + 10 * int(rng.integers(0, 2))
            u, gap = rng.uniform(0.45, 0.85), rng.uniform(3.25, 5.2) * fs
            step = rng.uniform(1.3, 2.6) * fs * rng.choice([-1, 1])
            marks.append(self.Mark(rib, u, gap, step, sigma=7.8 * fs))
        marks = list({m.rib: m for m in marks}.values())  # at most one mark per rib
        if state != "absent":
            marks[:k] = [replace(mark, real=True) for mark in marks[:k]]
        return self.Plan(state, tuple(marks))

    @staticmethod
    def bend_rib(scene: Scene, plan: FindingPlan, rib: int, u, centre, mask) -> tuple[np.ndarray, np.ndarray]:
        """Rib ``rib``'s centre line and extent (``u``: mm from the midline) with its break or dip."""
        mark = next((m for m in plan.marks if m.rib == rib), None)
        if mark is None:
            return centre, mask
        u_mark = mark.u * scene.image["thorax"] / 2
        if mark.real:
            # A sharp gap across the rib and a step of the lateral fragment. The step is local
            # (a kink over ~1 cm), so it carries no coarse-scale signal.
            beyond = scene.canvas.soft(u - u_mark, 0.3) * np.exp(-0.5 * ((u - u_mark) / mark.sigma) ** 2)
            centre = centre + mark.step * beyond
            mask = mask * (1 - box(u - u_mark, mark.gap, scene.canvas.px))
        else:  # decoy: a soft dip that removes the same density as the gap
            depth = mark.gap / (math.sqrt(2 * math.pi) * mark.sigma)
            mask = mask * (1 - depth * np.exp(-0.5 * ((u - u_mark) / mark.sigma) ** 2))
        return centre, mask

    def render(self, density, scene, plan):
        image, canvas = scene.image, scene.canvas
        fractures = []
        for mark in plan.marks:
            if mark.real:
                rib, u = image["ribs"][mark.rib], mark.u * image["thorax"] / 2
                fx, fy = image["cx"] + rib["side"] * u, rib_centre(image, rib, u)
                fractures.append({"centre_px": canvas.to_px(fx, fy), "gap_px": mark.gap / canvas.px})
        return {"fractures": fractures} if fractures else {}


class SupportDevices(Finding):
    """Thin bright wires (1.6 mm); decoys: soft lines of the same integrated density."""

    Wire = _record("SupportDevices.Wire", "points w a sigma real", None)
    Plan = _record("SupportDevices.Plan", "wires")

    def plan(self, rng, image, state, design):
        fc, fs = design.fine_contrast, design.fine_size * _scale(image)
        k = design.fine_instances
        wires = []
        for _ in range(int(rng.integers(k + 1, k + 4))):
            x0 = image["cx"] + rng.uniform(-0.45, 0.45) * image["thorax"]
            y0 = image["y_apex"] + rng.uniform(-0.1, 0.3) * image["lung_h"]
            pts, angle = [(x0, y0)], rng.uniform(0.3, 2.8)
            for _ in range(6):
                angle += rng.normal(0, 0.25)
                step = rng.uniform(0.06, 0.1) * image["lung_h"]
                pts.append((pts[-1][0] + step * math.cos(angle), pts[-1][1] + step * math.sin(angle)))
            wires.append(self.Wire(tuple(pts), w=1.56 * fs, a=0.70 * fc, sigma=5.2 * fs))
        if state != "absent":
            wires[:k] = [replace(wire, real=True) for wire in wires[:k]]
        return self.Plan(state, tuple(wires))

    def render(self, density, scene, plan):
        canvas = scene.canvas
        devices = []
        for w in plan.wires:
            if w.real:
                add_polyline(density, canvas, w.points, w.a, "sharp", w.w)
                points = [canvas.to_px(*p) for p in w.points]
                devices.append({"points_px": points, "width_px": w.w / canvas.px})
            else:
                add_polyline(density, canvas, w.points, w.a, "soft", w.w, sigma=w.sigma)
        return {"devices": devices} if devices else {}


_LOCAL = (PleuralEffusion, Consolidation, Pneumonia, Atelectasis, LungOpacity, PleuralOther, Edema)
_FINE = (LungLesion, Pneumothorax, Fracture, SupportDevices)
# every finding in drawing order (part of the phantom's bytes)
REGISTRY: tuple[Finding, ...] = (CARDIOMEGALY, ENLARGED_CARDIOMEDIASTINUM, *(c() for c in _LOCAL + _FINE))


def plan_findings(
    rng: np.random.Generator, image: dict, drawn: dict[str, str], design: Design
) -> dict[str, FindingPlan]:
    """Every finding's plan by name, in drawing order, each from its own generator seeded from ``rng``."""
    seeds = {name: np.random.default_rng(rng.integers(2**63)) for name in PATHOLOGIES}
    return {f.name: f.plan(seeds[f.name], image, drawn[f.name], design) for f in REGISTRY}


def render_findings(density: np.ndarray, scene: Scene) -> dict:
    """Draw every finding in drawing order (an absent one only its decoys); returns their truth in pixels."""
    truth = {}
    for finding in REGISTRY:
        plan = scene.image["findings"][finding.name]
        if plan.present or finding.name in FINE_FINDINGS:
            truth.update(finding.render(density, scene, plan))
    return truth
