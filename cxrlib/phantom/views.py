"""One image of the phantom: plan (a dict of geometry and exposure in mm, with every finding's typed plan)
and render, at any size, a frontal view (anatomy, then findings) or a simplified lateral view."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from ..labels import FINDINGS
from .anatomy import (
    PIXEL_SPACING_SHORT_SIDE_MM,
    Canvas,
    body_density,
    expose,
    lung_masks,
    native_size,
    plan_bumps,
    plan_ribs,
    plan_vessels,
    render_bumps,
    render_clavicles,
    render_ribs,
    sample_subject,
    splat_vessels,
)
from .findings import (
    CARDIOMEGALY,
    ENLARGED_CARDIOMEDIASTINUM,
    REGISTRY,
    Finding,
    FindingPlan,
    LateralScene,
    Scene,
    plan_findings,
)
from .labels import PATHOLOGIES, Design


def output_size(native_w: int, native_h: int, max_size: int | None) -> tuple[int, int]:
    """(width, height) of the written image: the native size with its long side capped at ``max_size``."""
    if not max_size or max(native_w, native_h) <= max_size:
        return native_w, native_h
    s = max_size / max(native_w, native_h)
    return max(round(native_w * s), 8), max(round(native_h * s), 8)


def plan_frontal(rng: np.random.Generator, subject: dict, drawn: dict[str, str], design: Design) -> dict:
    """Draw the geometry, exposure, distractors and finding parameters of one frontal image (mm)."""
    width, height = native_size(rng)
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
    ctr = CARDIOMEGALY.draw_ratio(rng, drawn["Cardiomegaly"], design)
    med = ENLARGED_CARDIOMEDIASTINUM.draw_ratio(rng, drawn["Enlarged Cardiomediastinum"], design)
    heart_w = ctr * thorax
    left = subject["heart_left_frac"] + rng.uniform(-0.03, 0.03)
    heart_b = heart_w * subject["heart_shape"]
    y_heart = y_cp - dome - rng.uniform(0.1, 0.3) * heart_b
    med_w = med * thorax
    med_left = rng.uniform(0.45, 0.6)
    view = "PA" if rng.random() < 0.6 else "AP"
    domes = [dome * rng.uniform(1.0, 1.25), dome * rng.uniform(0.85, 1.0)]  # image left (patient R) higher
    lo, hi, gamma = (float(rng.uniform(a, b)) for a, b in ((-0.15, 0.1), (1.15, 1.6), (0.75, 1.35)))
    exposure = {"lo": lo, "hi": hi, "gamma": gamma, "tilt": [float(rng.normal(0, 0.05)) for _ in range(2)]}
    heart = dict(right_mm=(1 - left) * heart_w, left_mm=left * heart_w)  # towards the image left, right
    heart.update(y=y_heart, b=heart_b, power=subject["heart_power"])
    plan = {"view": view, "native_width": width, "native_height": height, "fov_w": fov_w, "fov_h": fov_h}
    plan |= {"cx": cx, "thorax": thorax, "wall": subject["wall_mm"] * scale, "y_apex": y_apex}
    plan |= {"lung_h": lung_h, "apex_x": subject["apex_frac"] * thorax, "dome": domes, "ctr": ctr}
    plan["heart"] = heart
    plan |= {"mediastinum_ratio": med, "mediastinum": [(1 - med_left) * med_w, med_left * med_w]}
    plan |= {"exposure": exposure, "noise_seed": int(rng.integers(2**31)), "noise": design.noise}
    plan["hilum_y"] = y_apex + rng.uniform(0.38, 0.46) * lung_h
    plan["vessels"] = plan_vessels(rng, plan)
    plan["ribs"] = plan_ribs(rng, plan)
    plan["bumps"] = plan_bumps(rng, plan)
    plan["findings"] = plan_findings(rng, plan, drawn, design)
    return plan


def render_frontal(plan: dict, width: int, height: int) -> tuple[np.ndarray, dict]:
    """Render a frontal plan at width x height px; returns (uint8 image, pixel-space truth details)."""
    canvas = Canvas(width, height, plan["fov_w"], plan["fov_h"])
    x, y = canvas.x - plan["cx"], canvas.y
    left_lung, right_lung = lung_masks(plan, canvas)
    lungs = left_lung + right_lung
    scene = Scene(canvas, plan, x, y, lungs, left_lung, right_lung)
    hooks = _findings_of(plan)
    density = body_density(plan, canvas, x, y)
    # Soft, one-sided bumps and the edema haze act on lung density before air is subtracted.
    haze = np.zeros((height, width), np.float32)
    render_bumps(haze, canvas, plan)
    for finding, finding_plan in hooks:
        finding.haze(haze, scene, finding_plan)
    # Lung texture: vessels, kept zero-mean where a pneumothorax removes them.
    vessels = splat_vessels(canvas, plan["vessels"])
    vessels *= lungs
    for finding, finding_plan in hooks:
        vessels = finding.texture(vessels, scene, finding_plan)
    density += haze * lungs
    density -= 0.58 * lungs
    density += vessels
    density += 0.10 * canvas.soft(18 * plan["thorax"] / 290 - np.abs(x), 3.0) * (1 - lungs)  # spine
    render_ribs(density, canvas, plan, lungs, partial(_bend_rib, hooks, scene))
    render_clavicles(density, canvas, plan)
    truth: dict[str, Any] = {}
    for finding, finding_plan in hooks:
        truth.update(finding.render(density, scene, finding_plan))
    return expose(density, canvas, plan), truth


def _findings_of(plan: dict) -> list[tuple[Finding, FindingPlan]]:
    return [(finding, plan["findings"][finding.name]) for finding in REGISTRY]


def _bend_rib(hooks, scene, rib, u, centre, mask):  # a rib after every finding's Finding.bend_rib
    for finding, finding_plan in hooks:
        centre, mask = finding.bend_rib(rib, u, centre, mask, scene, finding_plan)
    return centre, mask


def plan_lateral(rng: np.random.Generator, frontal: dict) -> dict:
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
    """A cartoon lateral: one lung field, the heart anterior, the spine posterior (docs/phantom.md)."""
    canvas = Canvas(width, height, plan["fov_w"], plan["fov_h"])
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
    scene = LateralScene(canvas, plan, x, y, floor, half)
    hooks = _findings_of(plan)
    for finding, finding_plan in hooks:
        lung = finding.lateral_lung(lung, scene, finding_plan)
    cx = plan["cx"]  # half the vessels, squeezed towards the hilum
    vessels = [
        {**v, "points": [(cx + 0.5 * (px - cx), py) for px, py in v["points"]]} for v in plan["vessels"][::2]
    ]
    density -= 0.58 * lung
    density += splat_vessels(canvas, vessels) * lung
    density += 0.12 * canvas.soft(22 - np.abs(x - depth / 2 + 35), 2.0) * body
    for finding, finding_plan in hooks:
        finding.lateral(density, scene, finding_plan)
    return expose(density, canvas, plan), {"heart_radius_px": heart_r / canvas.px}


def finding_examples(
    resolutions: Sequence[int] = (64, 512), seed: int = 0, size: int | None = None, **design_options
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``{finding: {resolution: (with_finding, without_finding)}}``: one patient rendered with its long
    side ``size`` (default twice the largest resolution, at least 512), Lanczos-resized to ``R x R``
    uint8. A fine finding's "without" has its decoy; No Finding's "without" has a pleural effusion."""
    design = Design(**design_options)
    size = size or max(512, 2 * max(resolutions))
    subject = dict(sample_subject(np.random.default_rng([int(seed), 99])), thorax_mm=290.0)
    base = {f: "absent" for f in PATHOLOGIES}
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
            width, height = output_size(plan["native_width"], plan["native_height"], size)
            images.append(render_frontal(plan, width, height)[0])
        resize = Image.Resampling.LANCZOS
        out[finding] = {
            int(r): tuple(np.asarray(Image.fromarray(im, "L").resize((r, r), resize)) for im in images)
            for r in resolutions
        }
    return out
