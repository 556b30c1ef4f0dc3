"""Augmentation and model input: the batched device path equals torchvision's per-image path."""

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cxrlib.models import IMAGENET_MEAN, IMAGENET_STD, model_input
from cxrlib.train import rotate_flip_batch


def reference_rotate_flip(image: torch.Tensor, angle_deg: float, flip: bool) -> torch.Tensor:
    """torchvision's per-image equivalent of :func:`rotate_flip_batch`."""
    if flip:
        image = TF.horizontal_flip(image)
    return TF.rotate(image, angle_deg, interpolation=v2.InterpolationMode.BILINEAR, fill=0)


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_batch_rotation_and_flip_match_torchvision(size):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, *size, generator=generator)
    angles = torch.tensor([15.0, -15.0, 7.5, 0.0])
    flips = torch.tensor([True, False, True, False])
    batched = rotate_flip_batch(images, angles, flips)
    for i in range(4):
        reference = reference_rotate_flip(images[i], float(angles[i]), bool(flips[i]))
        assert torch.allclose(batched[i], reference, atol=1e-5)


def test_model_input_makes_three_imagenet_channels_from_gray_pixels_of_either_kind():
    image = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    out = model_input(image)
    assert out.shape == (1, 3, 8, 8)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)
    assert torch.equal(model_input(image[:, 0]), out)  # [N, H, W] is read as [N, 1, H, W]
    assert torch.equal(model_input(image.float() / 255.0), out)  # [0, 1] floats: the same input
    ready = torch.randn(1, 3, 8, 8)
    assert torch.equal(model_input(ready), ready)  # 3-channel floats are model input already
    assert model_input(image, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_normalisation_constants_are_made_once_per_device_not_copied_to_it_per_batch(monkeypatch):
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kw: made.append(kw) or real(*args, **kw))
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8, device="meta")  # a device other than the CPU
    for _ in range(3):  # three batches
        assert model_input(images).shape == (2, 3, 8, 8)
        assert model_input(images.float()).shape == (2, 3, 8, 8)
    assert len(made) <= 2  # mean and std once, not per batch
