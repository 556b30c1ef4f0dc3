"""Synthetic chest X-ray phantom written in the MIMIC-CXR-JPG layout: the project's built-in data.

A teaching phantom, not anatomy: radiograph-like images with each of the 14 CheXpert findings drawn
at a known spatial scale, so the paper's effect can be seen and tested on a laptop. Write one with
``python -m cxrlib.phantom --out data/phantom --subjects 200 --max-size 512`` or :func:`make_phantom`;
docs/phantom.md has the findings and their scales, the labels, the code and the feasibility study.
"""

from .labels import COARSE_FINDINGS, FINE_FINDINGS
from .views import finding_examples
from .writer import ensure_phantom, make_phantom

__all__ = ["COARSE_FINDINGS", "FINE_FINDINGS", "ensure_phantom", "finding_examples", "make_phantom"]
