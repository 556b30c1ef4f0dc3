"""Examples per finding: one patient with and without each finding, for the figure of fine findings
vanishing when downscaled (:func:`cxrlib.plots.phantom_examples`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..labels import FINDINGS
from .anatomy import sample_subject
from .design import Design
from .labels import PATHOLOGIES
from .views import output_size, plan_frontal, render_frontal


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
    512) and resized like :func:`cxrlib.images.resize_to_square`. Fine findings are shown against their
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
            width, height = output_size(plan["native_width"], plan["native_height"], size)
            images.append(render_frontal(plan, width, height)[0])
        out[finding] = {}
        for r in resolutions:
            pair = tuple(
                np.asarray(Image.fromarray(im, "L").resize((r, r), Image.Resampling.LANCZOS)) for im in images
            )
            out[finding][int(r)] = pair
    return out
