"""Grad-CAM: localises a planted square per image, matches a hand computation, releases its hook."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cxrlib.gradcam import gradcam
from cxrlib.labels import FINDINGS

SQUARE = 8
TARGET = FINDINGS.index("Cardiomegaly")


pytestmark = pytest.mark.usefixtures("one_thread")


class SquareDetector(nn.Module):
    """DenseNet-shaped (features -> in-place ReLU -> pooling -> classifier) with one channel that
    responds to bright areas and a finding whose logit reads that channel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.AvgPool2d(4))
        self.classifier = nn.Linear(4, len(FINDINGS))
        with torch.no_grad():
            self.features[0].weight[0] = 1.0 / 75  # mean of a 5 x 5 x 3 patch: bright -> positive
            self.features[0].bias[0] = 0.0
            self.classifier.weight.zero_()
            self.classifier.weight[TARGET, 0] = 5.0
            self.classifier.weight[TARGET + 1, 1:] = 1.0  # another finding reads the other channels

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def planted_images(corners, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(10, 50, size=(len(corners), 1, size, size)).astype(np.uint8)
    for i, (r, c) in enumerate(corners):
        images[i, 0, r : r + SQUARE, c : c + SQUARE] = 230
    return torch.from_numpy(images)


def test_map_peaks_inside_the_planted_square_for_each_image_of_a_batch():
    corners = [(4, 4), (40, 12), (20, 48), (50, 50)]
    model = SquareDetector()
    result = gradcam(model, planted_images(corners), "Cardiomegaly")
    assert result.maps.shape == (4, 64, 64) and result.probabilities.shape == (4, len(FINDINGS))
    assert result.maps.min() >= 0 and np.allclose(result.maps.max(axis=(1, 2)), 1.0)
    for i, (r, c) in enumerate(corners):
        peak = np.unravel_index(result.maps[i].argmax(), result.maps[i].shape)
        assert r <= peak[0] < r + SQUARE and c <= peak[1] < c + SQUARE
        near = np.zeros((64, 64), bool)
        near[max(r - 4, 0) : r + SQUARE + 4, max(c - 4, 0) : c + SQUARE + 4] = True  # one pooling cell around
        assert result.maps[i][near].sum() > 0.9 * result.maps[i].sum()


@pytest.mark.slow
def test_each_image_uses_its_own_gradients():
    torch.manual_seed(3)
    model = torchvision.models.densenet121(weights=None, num_classes=len(FINDINGS))
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    batch = gradcam(model, images, "Pneumothorax")
    alone = [gradcam(model, images[i : i + 1], "Pneumothorax") for i in range(3)]
    for i in range(3):
        np.testing.assert_allclose(batch.raw_maps[i], alone[i].raw_maps[0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(batch.probabilities[i], alone[i].probabilities[0], rtol=1e-5)


def test_densenet_map_is_computed_on_the_pre_relu_features_output():
    torch.manual_seed(4)
    model = torchvision.models.densenet121(weights=None, num_classes=len(FINDINGS)).eval()
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    result = gradcam(model, images, 1)
    from cxrlib.models import model_input

    features = model.features(model_input(images)).detach().requires_grad_(True)
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(features), 1), 1))
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), features)
    expected = F.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1)).detach().numpy()
    np.testing.assert_allclose(result.raw_maps, expected, rtol=1e-4, atol=1e-7)
    assert (features < 0).any()  # the pre-ReLU map has negative values the post-ReLU one would not
    np.testing.assert_allclose(result.probabilities, torch.sigmoid(logits).detach().numpy(), rtol=1e-5)


def test_hook_lives_only_during_the_call_and_is_removed_on_an_exception():
    model, hooks_seen = SquareDetector(), []
    model.classifier.register_forward_hook(lambda *_: hooks_seen.append(len(model.features._forward_hooks)))
    gradcam(model, planted_images([(0, 0)]), TARGET)
    assert hooks_seen == [1] and len(model.features._forward_hooks) == 0
    with pytest.raises(ValueError, match="unknown finding"):
        gradcam(model, planted_images([(0, 0)]), "Not A Finding")
    assert hooks_seen == [1, 1] and len(model.features._forward_hooks) == 0


def test_gradcam_is_computed_in_float32_with_tf32_off_and_the_settings_restored():
    seen = []
    model = SquareDetector()
    model.features.register_forward_hook(
        lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    )
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # TF32 allowed outside
    try:
        gradcam(model, planted_images([(8, 8)]), TARGET)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [(False, False)]
