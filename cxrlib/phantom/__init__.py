"""Synthetic chest X-ray phantom written in the MIMIC-CXR-JPG layout: the project's built-in data.

A teaching phantom, not anatomy: radiograph-like images with each of the 14 CheXpert findings drawn
at a known spatial scale, so the paper's effect can be seen and tested on a laptop. Write one with
``python -m cxrlib.phantom --out data/phantom --subjects 200 --max-size 512`` or :func:`make_phantom`;
docs/phantom.md has the findings and their scales, the labels, the code and the feasibility study.
"""

from .anatomy import PIXEL_SPACING_SHORT_SIDE_MM, sample_subject
from .findings import CTR_THRESHOLD, MEDIASTINUM_THRESHOLD, REGISTRY, Finding, FindingPlan, plan_findings
from .labels import (
    AIRSPACE_GROUP,
    BALANCED_RATES,
    CARDIAC_GROUP,
    COARSE_FINDINGS,
    FINE_FINDINGS,
    MIMIC_LABEL_COUNTS,
    MIMIC_STUDIES,
    NO_FINDING_EXCLUDES,
    PATHOLOGIES,
    PREVALENCES,
    Design,
    label_rates,
    rendered_presence,
    sample_labels,
)
from .views import finding_examples, plan_frontal, plan_lateral, render_frontal, render_lateral
from .writer import (
    JPEG_QUALITY,
    ensure_phantom,
    get_args_parser,
    image_relpath,
    main,
    make_phantom,
    output_size,
    plan_dataset,
)

_output_size = output_size  # the name older callers use

__all__ = [
    "AIRSPACE_GROUP",
    "BALANCED_RATES",
    "CARDIAC_GROUP",
    "COARSE_FINDINGS",
    "CTR_THRESHOLD",
    "FINE_FINDINGS",
    "JPEG_QUALITY",
    "MEDIASTINUM_THRESHOLD",
    "MIMIC_LABEL_COUNTS",
    "MIMIC_STUDIES",
    "NO_FINDING_EXCLUDES",
    "PATHOLOGIES",
    "PIXEL_SPACING_SHORT_SIDE_MM",
    "PREVALENCES",
    "REGISTRY",
    "Design",
    "Finding",
    "ensure_phantom",
    "FindingPlan",
    "finding_examples",
    "get_args_parser",
    "image_relpath",
    "label_rates",
    "main",
    "make_phantom",
    "output_size",
    "plan_dataset",
    "plan_findings",
    "plan_frontal",
    "plan_lateral",
    "render_frontal",
    "render_lateral",
    "rendered_presence",
    "sample_labels",
    "sample_subject",
]
