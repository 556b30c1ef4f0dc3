"""Grad-CAM (Selvaraju et al.) for one finding, on DenseNet's last feature map, at any resolution.

For image ``i`` and finding ``c`` with logit ``y_c``, and the target feature map ``A``
(``model.features`` output: DenseNet121's last dense block after ``norm5``, *before* the
ReLU that torchvision applies in ``forward``; the same tensor as the ERF of
:mod:`cxrlib.receptive_field`)::

    alpha_k = mean over (h, w) of d y_c / d A_k(h, w)         (image i's own gradient)
    cam     = ReLU(sum_k alpha_k A_k)                          (h' x w')
    map     = bilinear upsample of cam to the input size, divided by its maximum (0 where all 0)

Gradients are per image: images do not interact in eval mode, so the gradient of the sum
of the batch's logits w.r.t. the batch's feature maps is every image's own gradient.

The forward hook that captures ``A`` lives only inside a :class:`GradCAM` context (as in
pytorch-grad-cam's ``base_cam.py``) and is removed on exit, also after an exception. The
hook hands the rest of the model a copy of ``A``, because torchvision's DenseNet applies an
in-place ReLU to it, which would otherwise turn the captured map into the post-ReLU one.

Written here rather than wrapping pytorch-grad-cam: the computation is a few lines, and
this avoids a dependency for a model whose target layer and in-place ReLU need this care.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .labels import FINDINGS
from .models import full_float32, model_input


@dataclass
class GradCAMResult:
    """Maps ``[N, H, W]`` in [0, 1] at the input size, and the model's outputs for the batch."""

    maps: np.ndarray
    probabilities: np.ndarray  # [N, num_classes], sigmoid of the logits
    logits: np.ndarray
    finding: int
    raw_maps: np.ndarray  # [N, h', w'] ReLU(sum_k alpha_k A_k) before upsampling and scaling


def finding_index(
    finding: int | str, num_classes: int = len(FINDINGS), findings: Sequence[str] | None = None
) -> int:
    """Column of ``finding`` (an index, or a name of the label set ``findings``, default CheXpert's
    14); ``ValueError`` if unknown."""
    if isinstance(finding, str):
        names = list(FINDINGS if findings is None else findings)
        if finding not in names:
            raise ValueError(f"unknown finding {finding!r}; choose one of {names}")
        return names.index(finding)
    if not 0 <= int(finding) < num_classes:
        raise ValueError(f"finding index {finding} outside 0 .. {num_classes - 1}")
    return int(finding)


class GradCAM:
    """Grad-CAM on ``target_layer`` (default ``model.features``) of a classifier.

    Use as a context manager so the hook is always removed::

        with GradCAM(model) as cam:
            result = cam(images, "Cardiomegaly")

    ``model`` maps a batch to logits ``[N, num_classes]`` (torchvision DenseNet: features ->
    ReLU -> global pooling -> classifier). It is put in eval mode while a map is computed.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None):
        self.model = model
        self.target_layer = target_layer if target_layer is not None else model.features
        self._handle = None
        self._activation: torch.Tensor | None = None

    def _capture(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        self._activation = output
        return output.clone()  # later in-place ops (DenseNet's F.relu(..., inplace=True)) act on the copy

    def __enter__(self) -> GradCAM:
        self._handle = self.target_layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activation = None

    @full_float32()  # float32 gradients and maps: no TF32 convolutions on a GPU
    def __call__(
        self,
        images: torch.Tensor | np.ndarray,
        finding: int | str,
        batch_size: int = 16,
        findings: Sequence[str] | None = None,
    ) -> GradCAMResult:
        """Maps for ``finding`` (index, or name in the model's label set ``findings``, default
        CheXpert's 14) on ``images`` (uint8 grayscale or model-input floats)."""
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a 'with' block: the hook is registered on entering it")
        x_all = model_input(images)
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        was_training = self.model.training
        self.model.eval()
        maps, raw_maps, logits_all = [], [], []
        column = None
        try:
            for first in range(0, len(x_all), batch_size):
                x = x_all[first : first + batch_size].to(device)
                with torch.enable_grad():
                    logits = self.model(x)
                    column = finding_index(finding, logits.shape[1], findings)
                    activation = self._activation
                    if activation is None:
                        raise RuntimeError("the target layer did not run in the model's forward pass")
                    (grads,) = torch.autograd.grad(logits[:, column].sum(), activation)
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
                upsampled = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
                peak = upsampled.amax(dim=(2, 3), keepdim=True)
                scaled = torch.where(peak > 0, upsampled / peak.clamp_min(1e-30), torch.zeros_like(upsampled))
                maps.append(scaled[:, 0].cpu())
                raw_maps.append(cam[:, 0].cpu())
                logits_all.append(logits.detach().cpu())
                self._activation = None
        finally:
            self.model.train(was_training)
        logits = torch.cat(logits_all).float()
        return GradCAMResult(
            maps=torch.cat(maps).numpy(),
            probabilities=torch.sigmoid(logits).numpy(),
            logits=logits.numpy(),
            finding=column,
            raw_maps=torch.cat(raw_maps).numpy(),
        )


def gradcam(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    finding: int | str,
    target_layer: nn.Module | None = None,
    batch_size: int = 16,
    findings: Sequence[str] | None = None,
) -> GradCAMResult:
    """Grad-CAM maps for ``finding`` in one call (the hook is removed before returning);
    ``findings``: the model's label set, in output order (default CheXpert's 14)."""
    with GradCAM(model, target_layer) as cam:
        return cam(images, finding, batch_size=batch_size, findings=findings)


def example_for(test: pd.DataFrame, finding: str) -> tuple[pd.Series, bool]:
    """The image a Grad-CAM row shows for ``finding``: the first test image (index order) positive
    for it, an unselected example rather than the best-looking one; the first test image when none
    is positive. Returns ``(row, positive)``."""
    positives = test[test[finding] == 1.0]
    return (positives if not positives.empty else test).iloc[0], not positives.empty
