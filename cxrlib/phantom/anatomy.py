"""The phantom's anatomy: a patient's body, one image's lungs, vessels, ribs and bumps, and their geometry.

Everything is in millimetres (origin at the image centre, x to the image right, y down);
``plan`` is one image's plan (a dict drawn by :func:`cxrlib.phantom.views.plan_frontal`).
The findings (:mod:`cxrlib.phantom.findings`) place themselves with the geometry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .draw import Canvas, add_blob, add_polyline, box

PIXEL_SPACING_SHORT_SIDE_MM = 347.0  # every detector's short side covers ~35 cm
# bend(rib index, u, centre, mask) -> (centre, mask): how a finding changes one rib (u: mm from the midline)
RibBend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def native_size(rng: np.random.Generator) -> tuple[int, int]:
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


def lung_point(rng, plan, side: int, t_range=(0.15, 0.9), lateral=(0.15, 0.85)) -> tuple[float, float]:
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
    inner = medial_border(plan, side, np.array([[y]], dtype=np.float64))[0, 0]
    outer = lateral_border(plan, np.array([[y]], dtype=np.float64))[0, 0]
    return float(inner), float(outer)


def plan_vessels(rng, plan) -> list[dict]:
    """Vessel-like lines branching from each hilum (tapering width and density), in mm."""
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


def plan_ribs(rng, plan) -> list[dict]:
    """Ten ribs per side: height at the midline, slope, curvature and width."""
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


def plan_bumps(rng, plan) -> list[dict]:
    """Smooth one-sided density bumps in the lungs (what Edema must be told apart from)."""
    bumps = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(1, 3))):
            x, y = lung_point(rng, plan, side, (0.3, 0.8), (0.1, 0.7))
            bumps.append(
                {
                    "x": x,
                    "y": y,
                    "sigma": rng.uniform(0.12, 0.2) * plan["thorax"],
                    "a": rng.uniform(-0.05, 0.07),
                }
            )
    return bumps


def lateral_border(plan, y):
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


def medial_border(plan, side, y):
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


def lung_masks(plan, canvas):
    """Soft masks of the image-left and image-right lungs."""
    x, y = canvas.x - plan["cx"], canvas.y
    masks = []
    for side in (-1, 1):
        u = side * x
        lateral = lateral_border(plan, y)
        medial = medial_border(plan, side, y)
        top = canvas.soft(y - plan["y_apex"], 3.0)
        mask = canvas.soft(u - medial, 1.5) * canvas.soft(lateral - u, 1.5) * top
        mask = mask * canvas.soft(_diaphragm(plan, side, np.clip(u, 0, None)) - y, 1.5)
        masks.append(mask.astype(np.float32))
    return masks


def rib_centre(plan, rib, u):
    """Height (mm, y down) of a rib's centre line at distance u from the midline."""
    return rib["y0"] + rib["slope"] * u + rib["curve"] * u * u


def render_ribs(density, canvas: Canvas, plan: dict, lungs, bend: RibBend | None = None) -> None:
    """Add the ribs to ``density``; ``bend`` may change a rib's centre line and extent (a fracture)."""
    cortex = 1.4
    reach = plan["thorax"] / 2 + plan["wall"]
    for i, rib in enumerate(plan["ribs"]):
        side = rib["side"]
        ends = plan["cx"] + side * np.array([12.0, reach + 10])
        centres = rib_centre(plan, rib, np.linspace(0, reach + 10, 20))
        margin = rib["width"] + 5 + 2 * canvas.px
        win = canvas.window(ends.min(), ends.max(), centres.min() - margin, centres.max() + margin)
        if win is None:
            continue
        sl, x, y = win
        u = side * (x - plan["cx"])
        centre = rib_centre(plan, rib, np.clip(u, 0, None))
        mask_u = canvas.soft(u - 12, 3.0) * canvas.soft(reach - u, 6.0)
        half = rib["width"] / 2
        if bend is not None:
            centre, mask_u = bend(i, u, centre, mask_u)
        d = np.abs(y - centre)
        body = canvas.soft(half - d, 1.0)
        rim = box(d - (half - cortex / 2), cortex, canvas.px)
        # Bone shows best against air: ribs are faint over soft tissue (heart, mediastinum, abdomen).
        density[sl] += ((0.07 * body + 0.14 * rim) * mask_u * (0.3 + 0.7 * lungs[sl])).astype(np.float32)


def wall_curve(plan: dict, side: int, t0: float, t1: float, inset: float) -> list[tuple[float, float]]:
    """Points of a line that runs parallel to the chest wall of one side, ``inset`` mm inside it,
    from ``t0`` to ``t1`` (fractions of the lung height)."""
    ts = np.linspace(t0, t1, 12)
    ys = plan["y_apex"] + ts * plan["lung_h"]
    us = lateral_border(plan, ys[:, None])[:, 0] - inset
    us = np.maximum(us, plan["apex_x"] * 0.6)
    return [(plan["cx"] + side * float(u), float(v)) for u, v in zip(us, ys, strict=True)]


def body_density(plan: dict, canvas: Canvas, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Soft tissue of a frontal view: 1 inside the body (wider above the shoulders), 0 outside."""
    half_body = plan["thorax"] / 2 + plan["wall"]
    shoulders = plan["y_apex"] + 0.12 * plan["lung_h"]
    body_half = half_body + np.clip(shoulders - y, 0, None) * 3.0
    body = canvas.soft(body_half - np.abs(x), 6.0)
    return np.ones((canvas.height, canvas.width), np.float32) * body


def render_bumps(haze: np.ndarray, canvas: Canvas, plan: dict) -> None:
    """Add the smooth one-sided lung bumps of :func:`plan_bumps` to the lung haze."""
    for bump in plan["bumps"]:
        add_blob(
            haze,
            canvas,
            bump["x"],
            bump["y"],
            bump["a"],
            kind="soft",
            r=bump["sigma"] * 1.414,
            sigma=bump["sigma"],
        )


def render_clavicles(density: np.ndarray, canvas: Canvas, plan: dict) -> None:
    """Add both clavicles, rising from the midline to the shoulders."""
    for side in (-1, 1):
        y0 = plan["y_apex"] + 0.1 * plan["lung_h"]
        pts = [
            (plan["cx"] + side * 20, y0),
            (plan["cx"] + side * 0.25 * plan["thorax"], y0 - 0.06 * plan["lung_h"]),
            (plan["cx"] + side * 0.55 * plan["thorax"], y0 - 0.12 * plan["lung_h"]),
        ]
        add_polyline(density, canvas, pts, 0.16, "sharp", 13 * plan["thorax"] / 290)
