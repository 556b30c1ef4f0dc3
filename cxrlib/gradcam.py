"""Grad-CAM (Selvaraju et al.) for one finding on DenseNet's last feature map (before the final ReLU),
at any resolution: docs/method.md, "Grad-CAM"."""

from collections import namedtuple
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .labels import FINDINGS
from .models import full_float32, model_input

# maps [N, H, W] in [0, 1] at the input size, probabilities [N, classes], raw_maps [N, h', w'] unscaled
GradCAMResult = namedtuple("GradCAMResult", "maps probabilities raw_maps")


def _finding_index(finding: int | str, num_classes: int, findings: Sequence[str] | None) -> int:
    if isinstance(finding, str):
        names = list(FINDINGS if findings is None else findings)
        if finding not in names:
            raise ValueError(f"unknown finding {finding!r}; choose one of {names}")
        return names.index(finding)
    if not 0 <= int(finding) < num_classes:
        raise ValueError(f"finding index {finding} outside 0 .. {num_classes - 1}")
    return int(finding)


@full_float32()  # float32 gradients and maps: no TF32 convolutions on a GPU
def gradcam(
    model: nn.Module, images: torch.Tensor | np.ndarray, finding: int | str,
    target_layer: nn.Module | None = None, batch_size: int = 16, findings: Sequence[str] | None = None,
) -> GradCAMResult:  # fmt: skip
    """Maps for ``finding`` (an index or a name of the label set ``findings``) on ``images``, on
    ``target_layer`` (default ``model.features``); the hook lives only during the call."""
    captured = []

    def capture(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()  # DenseNet's in-place ReLU then acts on the copy, not on the captured map

    handle = (model.features if target_layer is None else target_layer).register_forward_hook(capture)
    x_all, device = model_input(images), next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    maps, raw_maps, logits_all = [], [], []
    try:
        for first in range(0, len(x_all), batch_size):
            x = x_all[first : first + batch_size].to(device)
            with torch.enable_grad():
                logits = model(x)
                column = _finding_index(finding, logits.shape[1], findings)
                activation = captured.pop()
                (grads,) = torch.autograd.grad(logits[:, column].sum(), activation)  # each image's own
            cam = F.relu((grads.mean((2, 3), keepdim=True) * activation.detach()).sum(dim=1, keepdim=True))
            upsampled = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            peak = upsampled.amax(dim=(2, 3), keepdim=True)
            maps.append(torch.where(peak > 0, upsampled / peak.clamp_min(1e-30), 0.0)[:, 0].cpu())
            raw_maps.append(cam[:, 0].cpu())
            logits_all.append(logits.detach().cpu())
    finally:
        handle.remove()
        model.train(was_training)
    probabilities = torch.sigmoid(torch.cat(logits_all).float()).numpy()
    return GradCAMResult(torch.cat(maps).numpy(), probabilities, torch.cat(raw_maps).numpy())


def example_for(test: pd.DataFrame, finding: str) -> tuple[pd.Series, bool]:
    """``(row, positive)``: the first test image positive for ``finding``, else the first test image."""
    positives = test[test[finding] == 1.0]
    return (positives if not positives.empty else test).iloc[0], not positives.empty
