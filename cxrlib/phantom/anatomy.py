"""The phantom's drawing primitives (a mm canvas, area-conserving lines and discs, exposure) and its
anatomy (body, lungs, vessels, ribs, bumps); all in mm, origin at the image centre, x right, y down."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


class Canvas:
    """Pixel-centre coordinates (mm, origin at the image centre, x to the image right, y down)."""

    def __init__(self, width: int, height: int, fov_w: float, fov_h: float):
        self.width, self.height = width, height
        self.px, self.px_x = fov_h / height, fov_w / width
        self.x = ((np.arange(width, dtype=np.float32) + 0.5) * (fov_w / width) - fov_w / 2)[None, :]
        self.y = ((np.arange(height, dtype=np.float32) + 0.5) * self.px - fov_h / 2)[:, None]
        self.x0, self.y0 = float(self.x[0, 0]), float(self.y[0, 0])

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

    def to_px(self, x_mm: float, y_mm: float) -> list[float]:
        """Pixel coordinates (column, row; 0 at the first pixel's edge) of a point in mm, for the truth."""
        return [round((x_mm - self.x0) / self.px_x, 2), round((y_mm - self.y0) / self.px, 2)]


def add_polyline(img, canvas, points, amp, kind="sharp", width=1.0, sigma=1.0):
    """Add a polyline: ``sharp`` an area-sampled box of ``width``, ``soft`` a Gaussian of equal integral."""
    pts = np.asarray(points, dtype=np.float64)
    sign = 1.0 if amp >= 0 else -1.0
    reach = max(width, 3.5 * sigma if kind == "soft" else 0.0) + 2 * canvas.px
    lo, hi = pts.min(axis=0) - reach, pts.max(axis=0) + reach
    win = canvas.window(lo[0], hi[0], lo[1], hi[1])
    if win is None:
        return
    (rows, cols), _, _ = win
    layer = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    soft_s = math.hypot(sigma, 0.45 * canvas.px)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        (xa, xb), (ya, yb) = sorted((x0, x1)), sorted((y0, y1))
        sub = canvas.window(xa - reach, xb + reach, ya - reach, yb + reach)
        if sub is None:
            continue
        (r, c), x, y = sub
        # distance to the segment; segments are combined by their maximum (joints not counted twice)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        d = np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))
        if kind == "sharp":
            profile = box(d, width, canvas.px)
        else:
            profile = width / (math.sqrt(2 * math.pi) * soft_s) * np.exp(-0.5 * (d / soft_s) ** 2)
        local = np.s_[r.start - rows.start : r.stop - rows.start, c.start - cols.start : c.stop - cols.start]
        np.maximum(layer[local], (sign * amp * profile).astype(np.float32), out=layer[local])
    img[rows, cols] += sign * layer


def splat_vessels(canvas, vessels: list[dict]) -> np.ndarray:
    """Vessel texture: each line's density deposited as points along it, blurred per width class."""
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
        corners = ((0, 0, (1 - fc) * (1 - fr)), (1, 0, fc * (1 - fr)), (0, 1, (1 - fc) * fr), (1, 1, fc * fr))
        for dc, dr, wgt in corners:
            cc, rr = c0 + dc, r0 + dr
            ok = (cc >= 0) & (cc < canvas.width) & (rr >= 0) & (rr < canvas.height)
            layer += np.bincount(rr[ok] * canvas.width + cc[ok], weights=(m * wgt)[ok], minlength=layer.size)
        sigma_mm = 0.4 * float(np.median(width[pick]))
        sigma_px = math.sqrt(max((sigma_mm / canvas.px) ** 2 - 0.16, 0.0))
        layer = layer.reshape(canvas.height, canvas.width) / (canvas.px * canvas.px_x)
        out += gaussian_filter(layer, sigma_px, mode="constant") if sigma_px > 0.05 else layer
    return out.astype(np.float32)


def add_blob(img, canvas, x, y, amp, kind="sharp", r=3.0, sigma=4.0):
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


def box(d, width, px):
    """Area-conserving box of ``width`` centred at d = 0, sampled with pixels of size px."""
    half = 0.5 * width
    lo, hi = np.maximum(d - px / 2, -half), np.minimum(d + px / 2, half)
    return np.clip(hi - lo, 0, None) / px


def expose(density, canvas: Canvas, plan: dict) -> np.ndarray:
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


PIXEL_SPACING_SHORT_SIDE_MM = 347.0  # every detector's short side covers ~35 cm


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


def sample_subject(rng: np.random.Generator) -> dict[str, float]:
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
        y = plan["y_apex"] + rng.uniform(*t_range) * plan["lung_h"]
        yy = np.array([[y]], dtype=np.float64)  # the lung's borders at height y, mm from the midline
        inner, outer = float(_medial_border(plan, side, yy)[0, 0]), float(lateral_border(plan, yy)[0, 0])
        if outer - inner > 15:
            u = inner + rng.uniform(*lateral) * (outer - inner)
            return plan["cx"] + side * u, y
    return plan["cx"] + side * 0.3 * plan["thorax"], plan["y_apex"] + 0.5 * plan["lung_h"]


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
                pts = [points[k]]
                for _ in range(3):
                    branch_angle += rng.normal(0, 0.2)
                    s = length / 8
                    px, py = pts[-1]
                    pts.append((px + side * s * math.cos(branch_angle), py + s * math.sin(branch_angle)))
                vessels.append({"points": pts, "w0": 1.8, "w1": 0.7, "a0": 0.05, "a1": 0.025})
    return vessels


def plan_ribs(rng, plan) -> list[dict]:
    """Ten ribs per side: height at the midline, slope, curvature and width."""
    scale, spacing, ribs = plan["thorax"] / 290.0, plan["lung_h"] / 9.5, []
    for side in (-1, 1):
        for k in range(10):
            y0 = plan["y_apex"] - 0.25 * spacing + k * spacing + rng.normal(0, 1.5)
            slope, curve = rng.uniform(-0.2, -0.1), rng.uniform(0.0022, 0.003) / scale
            rib = {"side": side, "y0": y0, "slope": slope, "curve": curve}
            ribs.append(dict(rib, width=rng.uniform(9, 12) * scale))
    return ribs


def plan_bumps(rng, plan) -> list[dict]:
    """Smooth one-sided density bumps in the lungs (what Edema must be told apart from)."""
    bumps = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(1, 3))):
            x, y = lung_point(rng, plan, side, (0.3, 0.8), (0.1, 0.7))
            sigma, a = rng.uniform(0.12, 0.2) * plan["thorax"], rng.uniform(-0.05, 0.07)
            bumps.append({"x": x, "y": y, "sigma": sigma, "a": a})
    return bumps


def lateral_border(plan, y):
    """Distance from the midline to the inner chest wall at heights y (array)."""
    t = (y - plan["y_apex"]) / plan["lung_h"]
    c, half = plan["apex_x"], plan["thorax"] / 2
    rise = np.sqrt(np.clip(1 - (1 - np.clip(t / 0.95, 0, 1)) ** 2, 0, 1))
    return c + (half - c) * rise


def _medial_border(plan, side, y):
    """Distance from the midline to one lung's medial border (mediastinum or heart) at heights y."""
    t = (y - plan["y_apex"]) / plan["lung_h"]
    m, h = plan["mediastinum"][(side + 1) // 2], plan["heart"]
    a = h["left_mm"] if side > 0 else h["right_mm"]  # the heart's half width
    v = np.clip(np.abs((y - h["y"]) / h["b"]), 0, 1)
    inner = np.maximum(m, a * np.clip(1 - v ** h["power"], 0, 1) ** (1 / h["power"]))
    c = plan["apex_x"]
    rise = np.sqrt(np.clip(1 - (1 - np.clip(t / 0.22, 0, 1)) ** 2, 0, 1))
    return c + (inner - c) * rise


def lung_masks(plan, canvas):
    """Soft masks of the image-left and image-right lungs."""
    x, y = canvas.x - plan["cx"], canvas.y
    masks = []
    q, bottom = plan["thorax"] / 4, plan["y_apex"] + plan["lung_h"]
    for side in (-1, 1):
        u = side * x
        lateral = lateral_border(plan, y)
        medial = _medial_border(plan, side, y)
        top = canvas.soft(y - plan["y_apex"], 3.0)
        mask = canvas.soft(u - medial, 1.5) * canvas.soft(lateral - u, 1.5) * top
        dome = plan["dome"][(side + 1) // 2]  # the hemidiaphragm's height at u:
        floor = bottom - dome * np.clip(1 - ((np.clip(u, 0, None) - q) / (1.15 * q)) ** 2, 0, 1)
        mask = mask * canvas.soft(floor - y, 1.5)
        masks.append(mask.astype(np.float32))
    return masks


def rib_centre(plan, rib, u):
    """Height (mm, y down) of a rib's centre line at distance u from the midline."""
    return rib["y0"] + rib["slope"] * u + rib["curve"] * u * u


def render_ribs(density, canvas: Canvas, plan: dict, lungs, bend: Callable) -> None:
    """Add the ribs; ``bend(rib, u, centre, mask) -> (centre, mask)`` may change a rib (a fracture)."""
    cortex, reach = 1.4, plan["thorax"] / 2 + plan["wall"]
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
        centre, mask_u = bend(i, u, centre, mask_u)
        d = np.abs(y - centre)
        body = canvas.soft(half - d, 1.0)
        rim = box(d - (half - cortex / 2), cortex, canvas.px)
        # Bone shows best against air: ribs are faint over soft tissue (heart, mediastinum, abdomen).
        density[sl] += ((0.07 * body + 0.14 * rim) * mask_u * (0.3 + 0.7 * lungs[sl])).astype(np.float32)


def wall_curve(plan: dict, side: int, t0: float, t1: float, inset: float) -> list[tuple[float, float]]:
    """A line ``inset`` mm inside one side's chest wall from ``t0`` to ``t1`` (fractions of lung height)."""
    ys = plan["y_apex"] + np.linspace(t0, t1, 12) * plan["lung_h"]
    us = np.maximum(lateral_border(plan, ys[:, None])[:, 0] - inset, plan["apex_x"] * 0.6)
    return [(plan["cx"] + side * float(u), float(v)) for u, v in zip(us, ys, strict=True)]


def bump_haze(canvas: Canvas, plan: dict) -> np.ndarray:
    """The lung haze of the smooth one-sided bumps of :func:`plan_bumps`."""
    haze = np.zeros((canvas.height, canvas.width), np.float32)
    for b in plan["bumps"]:
        add_blob(haze, canvas, b["x"], b["y"], b["a"], kind="soft", r=b["sigma"] * 1.414, sigma=b["sigma"])
    return haze


def frontal_density(plan: dict, canvas: Canvas, lungs, haze, vessels, bend: Callable) -> np.ndarray:
    """A frontal view's density: body, lungs with their haze and vessels, spine, ribs and clavicles."""
    x, y = canvas.x - plan["cx"], canvas.y
    half_body = plan["thorax"] / 2 + plan["wall"]
    shoulders = plan["y_apex"] + 0.12 * plan["lung_h"]
    body_half = half_body + np.clip(shoulders - y, 0, None) * 3.0
    density = np.ones((canvas.height, canvas.width), np.float32) * canvas.soft(body_half - np.abs(x), 6.0)
    density += haze * lungs
    density -= 0.58 * lungs
    density += vessels
    density += 0.10 * canvas.soft(18 * plan["thorax"] / 290 - np.abs(x), 3.0) * (1 - lungs)  # spine
    render_ribs(density, canvas, plan, lungs, bend)
    for side in (-1, 1):  # the clavicles, rising from the midline to the shoulders
        y0 = plan["y_apex"] + 0.1 * plan["lung_h"]
        pts = [
            (plan["cx"] + side * 20, y0),
            (plan["cx"] + side * 0.25 * plan["thorax"], y0 - 0.06 * plan["lung_h"]),
            (plan["cx"] + side * 0.55 * plan["thorax"], y0 - 0.12 * plan["lung_h"]),
        ]
        add_polyline(density, canvas, pts, 0.16, "sharp", 13 * plan["thorax"] / 290)
    return density
