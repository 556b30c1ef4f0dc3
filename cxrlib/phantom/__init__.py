"""A synthetic chest X-ray phantom in the MIMIC-CXR-JPG layout, the project's built-in data: each CheXpert
finding drawn at a known spatial scale (``python -m cxrlib.phantom --help``; docs/phantom.md)."""

from .findings import COARSE_FINDINGS, FINE_FINDINGS
from .writer import ensure_phantom, finding_examples, make_phantom

__all__ = ["COARSE_FINDINGS", "FINE_FINDINGS", "ensure_phantom", "finding_examples", "make_phantom"]
