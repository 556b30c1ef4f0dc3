"""Augmentation: the batched device path equals torchvision's per-image path."""

import pytest
import torch

from cxrlib.transforms import (
    IMAGENET_MEAN,
    BatchTransform,
    eval_transform,
    normalize,
    reference_rotate_flip,
    rotate_flip_batch,
    train_transform,
)


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


def test_normalize_makes_three_imagenet_channels():
    image = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    out = normalize(image)
    assert out.shape == (3, 8, 8)
    assert torch.allclose(
        out[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor([0.229, 0.224, 0.225])
    )


def test_normalisation_constants_are_made_once_per_device_not_copied_to_it_per_batch(monkeypatch):
    from cxrlib.receptive_field import _grayscale_to_model_input

    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kw: made.append(kw) or real(*args, **kw))
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8, device="meta")  # a device other than the CPU
    for _ in range(3):  # three batches
        assert normalize(images).shape == (2, 3, 8, 8)
        assert _grayscale_to_model_input(images.float()).shape == (2, 3, 8, 8)
    assert len(made) <= 2  # mean and std once, not per batch


def test_eval_transform_is_deterministic_and_train_transform_augments():
    image = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    assert torch.equal(eval_transform()(image), eval_transform()(image))
    torch.manual_seed(0)
    outs = [train_transform()(image) for _ in range(4)]
    assert outs[0].shape == (3, 32, 32)
    assert any(not torch.equal(outs[0], other) for other in outs[1:])


def test_batch_transform_eval_equals_normalize_and_train_is_seeded():
    batch = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(BatchTransform(train=False)(batch), normalize(batch))
    first = BatchTransform(train=True)(batch, torch.Generator().manual_seed(1))
    second = BatchTransform(train=True)(batch, torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert not torch.equal(first, normalize(batch))
