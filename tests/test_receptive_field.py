"""Theoretical receptive field walk (2071 px for DenseNet121) and the ERF of eq. 1."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from cxrlib import receptive_field as rfm
from cxrlib.models import IMAGENET_STD, model_input

pytestmark = pytest.mark.usefixtures("one_thread")


def test_densenet121_theoretical_receptive_field_is_2071():
    features = torchvision.models.densenet121(weights=None).features
    assert rfm.theoretical_receptive_field(features) == 2071
    rf, table = rfm.theoretical_receptive_field(features, return_table=True)
    assert rf == 2071
    assert table["rf"].iloc[-1] == 2071 and table["jump"].iloc[-1] == 32
    assert list(table["layer"][:2]) == ["conv0", "pool0"]
    assert list(table.columns[:3]) == ["layer", "type", "kernel"]
    once, layers = rfm.densenet121_field()  # the one the notebooks and the ERF table show
    assert once == 2071 and layers.equals(table)


def test_global_layers_are_refused_by_name():
    net = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(1, 1, 3), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(1, 2))
    )
    with pytest.raises(ValueError, match="'pool' .AdaptiveAvgPool2d. pools or connects globally"):
        rfm.theoretical_receptive_field(net)


class ChainNet(nn.Sequential):
    """Strided, dilated, padded convolutions and average pooling, without gating (no ReLU)."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 2, 5, stride=2, padding=2),
            nn.BatchNorm2d(2),
            nn.AvgPool2d(3, stride=2, padding=1),
            nn.Conv2d(2, 2, 3, dilation=2, padding=2),
            nn.AvgPool2d(2),
            nn.Conv2d(2, 1, 3, padding=1),
        )


def gradient_support(features, image_size, n_images, seed=0):
    """Rows and columns where the input gradient of the centre output pixel is non-zero in any image."""
    torch.manual_seed(seed)
    features.eval()
    x = torch.randn(n_images, features[0].in_channels, image_size, image_size, requires_grad=True)
    out = features(x)
    u, v = out.shape[-2] // 2, out.shape[-1] // 2
    (grad,) = torch.autograd.grad(out[:, :, u, v].sum(), x)
    nonzero = grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = np.flatnonzero(nonzero.any(1).numpy()), np.flatnonzero(nonzero.any(0).numpy())
    return rows, cols, (u, v)


def expected_window(table, position):
    """Input rows covered by the field of output pixel ``position`` per the walk's rf, jump and start."""
    rf, jump, start = (table.iloc[-1][c] for c in ("rf", "jump", "start"))
    centre = start + position * jump
    return np.arange(math.ceil(centre - (rf - 1) / 2), math.floor(centre + (rf - 1) / 2) + 1)


def test_walk_matches_the_support_of_the_input_gradient_on_a_chain():
    net = ChainNet()
    with torch.no_grad():
        for conv in (net[0], net[3], net[5]):  # positive weights: no cancellation inside the field
            conv.weight.uniform_(0.1, 1.0)
    rf, table = rfm.theoretical_receptive_field(net, return_table=True)
    # (k - 1) * dilation * jump per layer, jump = product of the strides before it.
    assert rf == 1 + 4 * 1 + 2 * 2 + 2 * 2 * 4 + 1 * 4 + 2 * 8
    rows, cols, (u, v) = gradient_support(net, 96, n_images=1)
    assert len(rows) == rf
    np.testing.assert_array_equal(rows, expected_window(table, u))
    np.testing.assert_array_equal(cols, expected_window(table, v))


@pytest.mark.slow
def test_walk_matches_the_gradient_support_of_a_small_torchvision_densenet():
    # ReLU and max pooling gate gradients per image, so take the union over many images.
    features = torchvision.models.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2
    ).features
    rf, table = rfm.theoretical_receptive_field(features, return_table=True)
    assert rf == 7 + 2 * 2 + 2 * 2 * 4 + 1 * 4 + 2 * 2 * 8  # conv0, pool0, block1, transition, block2
    rows, cols, (u, v) = gradient_support(features, 160, n_images=64)
    np.testing.assert_array_equal(rows, expected_window(table, u))
    np.testing.assert_array_equal(cols, expected_window(table, v))


# ----------------------------------------------------------------------------- ERF


@pytest.mark.parametrize("size", [9, 16])
def test_erf_of_one_3x3_convolution_is_the_mean_squared_kernel(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 5, 3, padding=1, bias=True)
    images = torch.randn(4, 1, size, size)
    result = rfm.effective_receptive_field(conv, images, exact=True, n_translations=2, max_shift=0.25)
    u, v = result.feature_position
    assert (u, v) == (size // 2, size // 2)
    expected = np.zeros((size, size))
    expected[u - 1 : u + 2, v - 1 : v + 2] = conv.weight.detach().square().mean(dim=(0, 1)).numpy()
    np.testing.assert_allclose(result.erf, expected, rtol=1e-6, atol=1e-12)


def test_erf_of_float_inputs_sums_the_channels_and_grayscale_pixels_go_through_the_normalisation():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    w = conv.weight.detach()  # [K, C, 3, 3]
    images = torch.randn(2, 3, 9, 9)
    summed = rfm.effective_receptive_field(conv, images, exact=True)  # adding one amount to every channel
    np.testing.assert_allclose(summed.erf[3:6, 3:6], w.sum(1).square().mean(0).numpy(), rtol=1e-5)
    # uint8 grayscale: derivative w.r.t. the pixel in [0, 1] through replication and ImageNet scaling.
    gray = torch.randint(0, 256, (2, 1, 9, 9), dtype=torch.uint8)
    pixel = rfm.effective_receptive_field(conv, gray, exact=True)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    np.testing.assert_allclose(pixel.erf[3:6, 3:6], (w / std).sum(1).square().mean(0).numpy(), rtol=1e-5)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1),
        )


def relative_error(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_random_sign_estimator_agrees_with_exact_eq1_and_differs_from_the_squared_sum():
    torch.manual_seed(2)
    model = TinyNet()
    images = torch.randint(0, 256, (8, 1, 24, 24), dtype=torch.uint8)
    kwargs = {"n_translations": 2}
    exact = rfm.effective_receptive_field(
        model, images, exact=True, generator=torch.Generator().manual_seed(0), **kwargs
    )
    estimate = rfm.effective_receptive_field(
        model, images, n_probes=256, chunk=64, generator=torch.Generator().manual_seed(0), **kwargs
    )
    rough = rfm.effective_receptive_field(
        model, images, n_probes=2, generator=torch.Generator().manual_seed(0), **kwargs
    )
    # Relative noise of the estimate is about sqrt(2 / (probes x samples)) = 0.025 here.
    assert relative_error(estimate.erf, exact.erf) < 0.1
    assert relative_error(rough.erf, exact.erf) > relative_error(estimate.erf, exact.erf)
    assert estimate.radius90_px == pytest.approx(exact.radius90_px, rel=0.05)
    # The square of the gradient of the channel sum is a different quantity: not eq. 1.
    x = torch.randint(0, 256, (1, 1, 24, 24), dtype=torch.uint8).float().div(255).requires_grad_(True)
    fmap = model.features(model_input(x))
    (grad_of_sum,) = torch.autograd.grad(fmap[0, :, 6, 6].sum(), x)
    one = rfm.effective_receptive_field(
        model, (x.detach() * 255).round().to(torch.uint8), exact=True, max_shift=0
    )
    assert relative_error(grad_of_sum[0, 0].square().numpy() / 24, one.erf) > 0.5


def test_model_mode_is_restored_and_eval_is_used():
    model = TinyNet().train()
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    first = rfm.effective_receptive_field(model, images, exact=True, max_shift=0)
    assert model.training
    second = rfm.effective_receptive_field(model, images[:1], exact=True, max_shift=0)
    alone = rfm.effective_receptive_field(model.eval(), images[:1], exact=True, max_shift=0)
    np.testing.assert_allclose(second.erf, alone.erf, rtol=1e-6)  # eval: no batch statistics
    assert first.n_samples == 4 and first.n_channels == 24 and first.feature_size == (8, 8)


def gaussian_map(size, sigma, centre):
    rows, cols = np.indices((size, size))
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("sigma", [4.0, 9.0])
def test_radius_summaries_on_a_known_gaussian(sigma):
    erf = gaussian_map(128, sigma, (60.0, 70.5))
    summary = rfm.erf_summary(erf)
    assert summary["centroid"] == pytest.approx((60.0, 70.5), abs=1e-6)
    assert summary["radius50_px"] == pytest.approx(sigma * math.sqrt(2 * math.log(2)), rel=0.03)
    assert summary["radius90_px"] == pytest.approx(sigma * math.sqrt(2 * math.log(10)), rel=0.03)
    assert summary["sigma_px"] == pytest.approx(sigma, rel=1e-3)
    result = rfm.ERFResult(erf, (4, 4), (8, 8), 1, 1, 1, "exact", None, 0, "reflect")
    assert result.fraction90 == pytest.approx(2 * summary["radius90_px"] / 128)
    table = rfm.erf_table({(128, "trained"): result, (64, "init"): result}, theoretical_rf_px=2071)
    assert list(table["state"]) == ["init", "trained"]
    assert {
        "erf_radius50_px",
        "erf_radius90_px",
        "erf_fraction_of_image",
        "gaussian_sigma_px",
        "definition",
    } <= set(table.columns)


def test_translate_batch_moves_content_and_fills_the_border_by_reflection():
    image = torch.arange(25.0).view(1, 1, 5, 5)
    shifted = rfm.translate_batch(image, torch.tensor([[1, -2]]), 2)
    assert torch.equal(shifted[0, 0, 1:, :3], image[0, 0, :4, 2:])  # content moved down 1, left 2
    assert torch.equal(shifted[0, 0, 0, :3], image[0, 0, 1, 2:])  # reflection of row 1 above row 0
    assert torch.equal(shifted[0, 0, 1:, 3:], image[0, 0, :4, 2:4].flip(-1))  # columns 3, 2 reflected
    with pytest.raises(ValueError, match="max_shift < image side"):
        rfm.translate_batch(image, torch.tensor([[0, 0]]), 5)


def test_the_erf_is_computed_in_float32_with_tf32_off_and_the_settings_restored():
    seen = []
    model = rfm.conv_stack(2)
    model.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    )
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # TF32 allowed outside
    try:
        rfm.effective_receptive_field(model, torch.rand(1, 1, 9, 9), max_shift=0.0)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [(False, False)]
