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
less activation memory at high resolution for some recomputation. The recomputation in the
backward pass runs each layer's first BatchNorm again in training mode; here it leaves the
running statistics as the forward pass left them (:class:`_DenseLayer`), so a model trained with
the option has the statistics, and gives the predictions, of one trained without it.

The head (ReLU, global average pooling, classifier) always computes in float32, also under
bf16 or fp16 autocast (:class:`DenseNet121`): the features keep the speed of mixed precision,
while the logits that validation, prediction files, metrics and the ensemble read keep float32
precision. A bf16 logit has 3 significant digits (spacing 0.03 between 4 and 8), which would
turn thousands of test images into artificial ties.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import densenet

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


class TiledFeatures(nn.Sequential):
    """DenseNet's feature layers applied to each of ``tiles x tiles`` non-overlapping tiles of the
    image on its own; the tiles' feature maps are put back side by side (a mosaic).

    No feature can see beyond its tile, so the receptive field is limited to the tile while the
    network, the resolution and the pixel size stay what they are: the field alone changes. The
    layers and their state dict keys are the plain model's; the head pools the mosaic, i.e. over
    all tiles. Grad-CAM and the ERF read the mosaic like any feature map.
    """

    def __init__(self, features: nn.Sequential, tiles: int):
        super().__init__(collections.OrderedDict(features.named_children()))
        self.tiles = int(tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tiles
        if t == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if h % t or w % t:
            raise ValueError(f"a {h}x{w} image cannot be cut into {t}x{t} equal tiles")
        tiles = (
            x.reshape(n, c, t, h // t, t, w // t)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(n * t * t, c, h // t, w // t)
        )
        if x.is_contiguous(memory_format=torch.channels_last):
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        maps = super().forward(tiles)
        _, k, fh, fw = maps.shape
        return maps.reshape(n, t, t, k, fh, fw).permute(0, 3, 1, 4, 2, 5).reshape(n, k, t * fh, t * fw)


class _DenseLayer(densenet._DenseLayer):
    """torchvision's dense layer whose checkpointed bottleneck counts each batch once in BatchNorm's
    running statistics: the backward pass's recomputation restores the statistics it updated."""

    def call_checkpoint_bottleneck(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        calls = []

        def bottleneck(*tensors: torch.Tensor) -> torch.Tensor:
            calls.append(None)
            if len(calls) == 1:  # the forward pass
                return self.bn_function(list(tensors))
            kept = [buffer.clone() for buffer in self.norm1.buffers()]
            try:
                return self.bn_function(list(tensors))
            finally:
                for buffer, value in zip(self.norm1.buffers(), kept, strict=True):
                    buffer.copy_(value)

        return checkpoint(bottleneck, *inputs, use_reentrant=False)


class GlobalContext(nn.Module):
    """A global context block (Cao et al. 2019, GCNet): every position's features are pooled into
    one vector with softmax attention weights, the vector is transformed (1x1 conv to
    ``channels / reduction``, LayerNorm, ReLU, 1x1 conv back) and added to every position. Each
    feature after it depends on the whole image. The last conv starts at zero, so the block
    starts as the identity and the network as the plain one.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.attention = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        weights = self.attention(x).flatten(2).softmax(dim=-1)  # [N, 1, HW]: where to look
        context = torch.bmm(x.flatten(2), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.transform(context)


class DenseNet121(torchvision.models.DenseNet):
    """torchvision's DenseNet121 (same layers, same state dict keys) with a float32 head.

    ``forward`` is ``head(features(x))``; :meth:`head` runs outside autocast on float32
    features, so the logits are float32 numbers, not rounded bf16 / fp16 ones. With ``tiles``
    above 1 the features see ``tiles x tiles`` tiles of the image separately (:class:`TiledFeatures`);
    with ``global_context`` a :class:`GlobalContext` block follows dense block 3
    (``features.globalcontext``).
    """

    def __init__(
        self, num_classes: int, memory_efficient: bool = False, tiles: int = 1, global_context: bool = False
    ):
        super().__init__(32, (6, 12, 24, 16), 64, num_classes=num_classes, memory_efficient=memory_efficient)
        for layer in self.modules():  # same layers and state dict keys, statistics counted once
            if isinstance(layer, densenet._DenseLayer):
                layer.__class__ = _DenseLayer
        if global_context:
            layers = collections.OrderedDict()
            for name, layer in self.features.named_children():
                layers[name] = layer
                if name == "denseblock3":
                    layers["globalcontext"] = GlobalContext(self.features.transition3.norm.num_features)
            self.features = nn.Sequential(layers)
        self.tiles = int(tiles)
        if self.tiles > 1:
            self.features = TiledFeatures(self.features, self.tiles)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature maps ``[N, 1024, h, w]`` -> logits ``[N, num_classes]``, in float32."""
        with torch.autocast(features.device.type, enabled=False):
            pooled = F.adaptive_avg_pool2d(F.relu(features.float()), 1).flatten(1)
            return self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    weights: str | os.PathLike = "imagenet",
    num_classes: int = NUM_FINDINGS,
    memory_efficient: bool = False,
    tiles: int = 1,
    global_context: bool = False,
) -> nn.Module:
    """DenseNet121 (:class:`DenseNet121`: torchvision's, float32 head) with ``num_classes`` outputs.

    Args:
        weights: ``"imagenet"``, ``"none"`` or the path of a local state dict (see module docs).
        num_classes: number of outputs (one per finding of the label set; CheXpert's 14 by default).
        memory_efficient: gradient checkpointing in the dense blocks (torchvision's option).
        tiles: limit the receptive field to ``tiles x tiles`` tiles of the image (1: the plain model).
        global_context: a :class:`GlobalContext` block after dense block 3, so that every later
            feature sees the whole image (ImageNet weights load into the other layers).

    Raises:
        WeightsUnavailableError: ImageNet weights requested but not downloadable or cached.
        FileNotFoundError: ``weights`` is neither a choice nor an existing file.
    """
    if tiles < 1:
        raise ValueError(f"tiles must be at least 1, got {tiles}")
    model = DenseNet121(
        num_classes, memory_efficient=memory_efficient, tiles=tiles, global_context=global_context
    )
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
    # torchvision's files predate num_batches_tracked; a missing classifier was replaced on purpose;
    # a global context block missing from a plain model's file starts as the identity
    fresh = ("classifier.", "features.globalcontext.")
    missing = [k for k in missing if not k.startswith(fresh) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit DenseNet121: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
