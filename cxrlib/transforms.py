"""Image transforms of the paper: grayscale -> 3 channels, ImageNet mean/std, flip and rotation.

Training augmentation is a random horizontal flip and a rotation drawn uniformly from
[-15, 15] degrees (bilinear, black fill); evaluation applies no augmentation. Both
paths start from the dataset's uint8 ``[1, H, W]`` image:

* :func:`train_transform` / :func:`eval_transform` work on one image (CPU, torchvision v2),
  for use inside a ``Dataset``;
* :class:`BatchTransform` does the same on a whole uint8 batch on the training device
  (``affine_grid`` / ``grid_sample``), so DataLoader workers only decode images.

:func:`rotate_flip_batch` is the deterministic core of the batch path; a test checks it
against torchvision's per-image ``hflip`` + ``rotate``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ROTATION_DEGREES = 15.0


def to_three_channels(image: torch.Tensor) -> torch.Tensor:
    """Replicate a grayscale ``[..., 1, H, W]`` image to ``[..., 3, H, W]``."""
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:])


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float ``[..., 1|3, H, W]`` -> float, 3 channels, ImageNet-normalised."""
    if image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    image = to_three_channels(image) if image.shape[-3] == 1 else image
    mean, std = imagenet_mean_std(image.device, image.dtype)
    return (image - mean) / std


@functools.cache
def imagenet_mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``[3, 1, 1]`` tensors on ``device``, made once per device and dtype:
    a tensor made from a list is copied to a GPU synchronously, which would stall every batch."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(3, 1, 1)


def train_transform() -> v2.Compose:
    """Per-image training transform: flip, rotation in [-15, 15] degrees, then :func:`normalize`."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomRotation(MAX_ROTATION_DEGREES, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
            v2.Lambda(normalize),
        ]
    )


def eval_transform() -> v2.Compose:
    """Per-image evaluation transform: only :func:`normalize`."""
    return v2.Compose([v2.Lambda(normalize)])


def rotate_flip_batch(images: torch.Tensor, angles_deg: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip (where ``flips``) then rotate each image counter-clockwise by its angle, black fill.

    ``images``: float ``[B, C, H, W]`` in pixel units (not yet normalised, so the fill is black).
    Matches ``torchvision`` ``hflip`` followed by ``rotate(angle, BILINEAR, fill=0)``.
    """
    batch, _, height, width = images.shape
    angles = angles_deg.to(images.device, torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(angles), torch.sin(angles)
    sign = torch.where(flips.to(images.device), -1.0, 1.0)
    aspect = height / width
    # Output pixel -> input pixel in normalised coordinates (x right, y down):
    # inverse rotation, then the flip (x -> -x) applied before the rotation.
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = sign * cos
    theta[:, 0, 1] = -sign * sin * aspect
    theta[:, 1, 0] = sin / aspect
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    # A ones channel sampled alongside gives torchvision's border weighting for the black fill.
    with_mask = torch.cat([images.float(), images.new_ones(batch, 1, height, width, dtype=torch.float32)], 1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


class BatchTransform(torch.nn.Module):
    """uint8 ``[B, 1, H, W]`` batch -> normalised float ``[B, 3, H, W]``, augmented when training.

    Runs on whatever device the batch is on; pass a ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, train: bool, max_degrees: float = MAX_ROTATION_DEGREES, flip_p: float = 0.5):
        super().__init__()
        self.train_mode, self.max_degrees, self.flip_p = train, max_degrees, flip_p

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if self.train_mode:
            batch = images.shape[0]
            device = generator.device if generator is not None else torch.device("cpu")
            angles = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * self.max_degrees
            flips = torch.rand(batch, generator=generator, device=device) < self.flip_p
            images = rotate_flip_batch(images, angles, flips)
        return normalize(images)


def reference_rotate_flip(image: torch.Tensor, angle_deg: float, flip: bool) -> torch.Tensor:
    """torchvision's per-image equivalent of :func:`rotate_flip_batch` (used by tests)."""
    if flip:
        image = TF.horizontal_flip(image)
    return TF.rotate(image, angle_deg, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
