"""Helpers of the teaching notebook: the conv-stack ERF and the resolution strip figure."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from cxrlib.plots import resolution_strip
from cxrlib.receptive_field import erf_of_conv_stack, erf_summary


def test_conv_stack_erf_support_is_the_theoretical_field_and_grows_slower():
    maps = erf_of_conv_stack([1, 2, 4], size=25, n_images=2)
    for depth, erf in maps.items():
        rows, cols = np.nonzero(erf > 0)
        assert rows.max() - rows.min() + 1 <= 2 * depth + 1  # never beyond the theoretical field
        assert cols.max() - cols.min() + 1 <= 2 * depth + 1
    radii = [erf_summary(maps[d])["radius90_px"] for d in (1, 2, 4)]
    assert radii[0] < radii[1] < radii[2]
    # The ERF grows more slowly than the theoretical field (3 -> 9 px, three times).
    assert radii[2] / radii[0] < 3 * 0.9


@pytest.mark.parametrize("sizes", [(32,), (32, 64, 128)])
def test_resolution_strip_renders(sizes):
    images = {s: np.full((s, s), 128, dtype=np.uint8) for s in sizes}
    fig = resolution_strip(images, title="x")
    assert isinstance(fig, Figure) and len(fig.axes) == len(sizes)
