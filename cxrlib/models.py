"""DenseNet121 with one logit per finding: ImageNet weights, a local weights file, or random init.

The paper trains torchvision's DenseNet121 (first from scratch, then better from ImageNet
weights) with a 14-output classifier. :func:`build_model` gives that network:

* ``weights="imagenet"``: torchvision's ``DenseNet121_Weights.IMAGENET1K_V1``. They download
  into torch hub's cache when a network is there; without one, :class:`WeightsUnavailableError`
  says which file to place where (or to pass ``--weights none`` or a local path).
* ``weights="none"``: random initialisation (the CPU presets and the tests).
* ``weights=PATH``: a local state dict, ours (``best_model.pt``, a training checkpoint) or
  torchvision's file; loaded with ``torch.load(..., weights_only=True)``, so a file that
  would run code when unpickled is refused. A classifier of another shape (ImageNet's 1000
  classes) is replaced by a freshly initialised one.

``memory_efficient=True`` is torchvision's gradient checkpointing inside the dense blocks:
less activation memory at high resolution for some recomputation.

The head (ReLU, global average pooling, classifier) always computes in float32, also under
bf16 or fp16 autocast (:class:`DenseNet121`): the features keep the speed of mixed precision,
while the logits that validation, prediction files, metrics and the ensemble read keep float32
precision. A bf16 logit has 3 significant digits (spacing 0.03 between 4 and 8), which would
turn thousands of test images into artificial ties.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .labels import NUM_FINDINGS

WEIGHT_CHOICES = ("imagenet", "none")
# torchvision's old DenseNet files name layers "norm.1"; the module is "norm1" today.
_OLD_DENSELAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable."""


def imagenet_weights_file() -> Path:
    """Where torch hub keeps torchvision's DenseNet121 ImageNet weights (``densenet121-a639ec97.pth``)."""
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


class DenseNet121(torchvision.models.DenseNet):
    """torchvision's DenseNet121 (same layers, same state dict keys) with a float32 head.

    ``forward`` is ``head(features(x))``; :meth:`head` runs outside autocast on float32
    features, so the logits are float32 numbers, not rounded bf16 / fp16 ones.
    """

    def __init__(self, num_classes: int, memory_efficient: bool = False):
        super().__init__(32, (6, 12, 24, 16), 64, num_classes=num_classes, memory_efficient=memory_efficient)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature maps ``[N, 1024, h, w]`` -> logits ``[N, num_classes]``, in float32."""
        with torch.autocast(features.device.type, enabled=False):
            pooled = F.adaptive_avg_pool2d(F.relu(features.float()), 1).flatten(1)
            return self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    weights: str | os.PathLike = "imagenet", num_classes: int = NUM_FINDINGS, memory_efficient: bool = False
) -> nn.Module:
    """DenseNet121 (:class:`DenseNet121`: torchvision's, float32 head) with ``num_classes`` outputs.

    Args:
        weights: ``"imagenet"``, ``"none"`` or the path of a local state dict (see module docs).
        num_classes: number of outputs (14 findings).
        memory_efficient: gradient checkpointing in the dense blocks (torchvision's option).

    Raises:
        WeightsUnavailableError: ImageNet weights requested but not downloadable or cached.
        FileNotFoundError: ``weights`` is neither a choice nor an existing file.
    """
    model = DenseNet121(num_classes, memory_efficient=memory_efficient)
    choice = str(weights)
    if choice == "none":
        return model
    state = _imagenet_state_dict() if choice == "imagenet" else load_state_dict_file(weights)
    load_weights_into(model, state, source=choice)
    return model


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    enum = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # no network, a proxy, a partial file: one clear message
        target = imagenet_weights_file()
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for DenseNet121 ({type(error).__name__}: {error}). "
            f"Without internet, download {enum.url} elsewhere and place it at {target} "
            f"(torch hub cache; set TORCH_HOME to move it), or pass a local file with --weights PATH, "
            f"or train from scratch with --weights none"
        ) from error


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A model state dict from a weights file, a ``best_model.pt`` or a training checkpoint.

    Loading uses ``weights_only=True``: tensors and plain containers only, never code.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is
    not a safe state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (use --weights imagenet, --weights none or an existing file)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} is not a safe weights file (refused by torch.load(weights_only=True)): {error}"
        ) from error
    return extract_state_dict(payload, source=str(path))


def extract_state_dict(payload: object, source: str = "weights") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded payload (plain, ``{"model": ...}`` or ``{"state_dict": ...}``)."""
    if isinstance(payload, Mapping):
        for key in ("model", "state_dict"):
            if key in payload and isinstance(payload[key], Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not all(torch.is_tensor(v) for v in payload.values()):
        raise ValueError(f"{source}: not a model state dict (a mapping of names to tensors)")
    return dict(payload)


def load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model``: strips DDP's ``module.`` prefix, renames torchvision's old
    DenseNet keys, and keeps the model's own classifier when the file's has another shape."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _OLD_DENSELAYER_KEY.match(key)
        cleaned[match.group(1) + match.group(2) if match else key] = value
    own = model.state_dict()
    for key in ("classifier.weight", "classifier.bias"):
        if key in cleaned and key in own and cleaned[key].shape != own[key].shape:
            warnings.warn(
                f"{source}: classifier has shape {tuple(cleaned[key].shape)}, the model needs "
                f"{tuple(own[key].shape)}; using a freshly initialised classifier",
                stacklevel=3,
            )
            cleaned.pop("classifier.weight", None)
            cleaned.pop("classifier.bias", None)
    missing, unexpected = model.load_state_dict(cleaned, strict=False)
    # torchvision's files predate num_batches_tracked; a missing classifier was replaced on purpose
    missing = [
        k for k in missing if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit DenseNet121: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
