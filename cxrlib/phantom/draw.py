"""Drawing on the phantom's canvas: coordinates in mm, area-conserving lines and discs, vessels, exposure.

An image is a density map (1 = soft tissue; air subtracted, bone and findings added) drawn at the
output size and exposed to 8 bits at the end; thin structures keep their integrated density.
"""

from __future__ import annotations

import math

import numpy as np


class Canvas:
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

    def to_px(self, x_mm: float, y_mm: float) -> list[float]:
        """Pixel coordinates (column, row; 0 at the first pixel's edge) of a point in mm, for the truth."""
        return [round((x_mm - self.x0) / self.px_x, 2), round((y_mm - self.y0) / self.px, 2)]


def _segment_distance(x, y, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length2 = max(dx * dx + dy * dy, 1e-9)
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)), t


def add_polyline(img, canvas, points, amp, kind="sharp", width=1.0, sigma=1.0, amp_end=None, width_end=None):
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
            profile = box(d, width + (width_end - width) * frac, canvas.px)
        else:
            profile = width / (math.sqrt(2 * math.pi) * soft_s) * np.exp(-0.5 * (d / soft_s) ** 2)
        local = (
            slice(r.start - rows.start, r.stop - rows.start),
            slice(c.start - cols.start, c.stop - cols.start),
        )
        np.maximum(layer[local], (a * profile).astype(np.float32), out=layer[local])
    img[rows, cols] += sign * layer


def splat_vessels(canvas, vessels: list[dict]) -> np.ndarray:
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
