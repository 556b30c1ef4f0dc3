"""DenseNet121, its device and precision, the loaders and a trained model's logits (docs/training.md)."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import platform
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from torchvision.models import densenet

from . import paths
from .cache import CXRDataset, collate_skip_none
from .fileio import CheckpointError, ConfigError, load_verified, sidecar_path
from .labels import FINDINGS, NUM_FINDINGS

WEIGHT_CHOICES = ("imagenet", "none")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INFERENCE_BATCH_PIXELS = 64 * 512 * 512
PREFETCH_BATCHES = 4  # batches each DataLoader worker prepares ahead, at most
LOADER_SHARED_BYTES = 2**30  # of shared memory one loader's prepared batches may hold, per process
_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")  # torchvision's old "norm.1"


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable."""


class _DenseLayer(densenet._DenseLayer):
    """A dense layer whose checkpointed bottleneck counts each batch once in BatchNorm's statistics."""

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
    """A global context block (GCNet, Cao et al. 2019) that starts as the identity (docs/training.md)."""

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
    """torchvision's DenseNet121 (same state dict keys) with a float32 head, optionally a GlobalContext."""

    def __init__(self, num_classes: int, memory_efficient: bool = False, global_context: bool = False):
        super().__init__(32, (6, 12, 24, 16), 64, num_classes=num_classes, memory_efficient=memory_efficient)
        for layer in self.modules():  # same layers and state dict keys, statistics counted once
            if isinstance(layer, densenet._DenseLayer):
                layer.__class__ = _DenseLayer
        if global_context:  # after dense block 3, before transition 3
            layers = list(self.features.named_children())
            layers.insert(9, ("globalcontext", GlobalContext(self.features.transition3.norm.num_features)))
            self.features = nn.Sequential(collections.OrderedDict(layers))

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
    global_context: bool = False,
) -> nn.Module:
    """:class:`DenseNet121` with ``num_classes`` outputs and ``weights`` imagenet, none or a local file."""
    model = DenseNet121(num_classes, memory_efficient=memory_efficient, global_context=global_context)
    choice = str(weights)
    if choice == "none":
        return model
    state = _imagenet_state_dict() if choice == "imagenet" else _weights_file(weights)
    load_weights_into(model, state, source=choice)
    return model


def imagenet_weights_file() -> Path:
    """Where torch hub keeps torchvision's DenseNet121 ImageNet weights (``densenet121-a639ec97.pth``)."""
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    enum = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # no network, a proxy, a partial file: one clear message
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for DenseNet121 ({type(error).__name__}: {error}). "
            f"Without internet, download {enum.url} elsewhere and place it at {imagenet_weights_file()} "
            f"(torch hub cache; set TORCH_HOME to move it), or pass a local file with --weights PATH, "
            f"or train from scratch with --weights none"
        ) from error


def _weights_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    # a state dict, a checkpoint's "model" or a "state_dict"; verified against a sidecar if it has one
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained model or weights file at {path} (or use --weights none)")
    try:
        if sidecar_path(path).is_file():
            payload = load_verified(path, map_location)
        else:
            payload = torch.load(path, map_location, weights_only=True)
    except CheckpointError as error:
        raise ValueError(str(error)) from error
    except Exception as error:
        raise ValueError(
            f"{path}: not a safe weights file (refused by torch.load(weights_only=True)): {error}"
        ) from None
    wrapped = [payload[k] for k in ("model", "state_dict") if isinstance(payload, Mapping) and k in payload]
    payload = wrapped[0] if wrapped else payload
    if not isinstance(payload, Mapping) or not all(torch.is_tensor(v) for v in payload.values()):
        raise ValueError(f"{path}: not a model state dict (a mapping of names to tensors)")
    return dict(payload)


def load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model`` (DDP's or torchvision's old keys; another classifier shape: fresh)."""
    cleaned = {_OLD_KEY.sub(r"\1\2.", key.removeprefix("module.")): value for key, value in state.items()}
    theirs, own = cleaned.get("classifier.weight"), model.state_dict()["classifier.weight"]
    if theirs is not None and theirs.shape != own.shape:
        warnings.warn(
            f"{source}: classifier has shape {tuple(theirs.shape)}, the model needs {tuple(own.shape)}; "
            "using a freshly initialised classifier",
            stacklevel=3,
        )
        del cleaned["classifier.weight"], cleaned["classifier.bias"]
    missing, unexpected = model.load_state_dict(cleaned, strict=False)
    # torchvision's files predate num_batches_tracked; a missing classifier was replaced on purpose;
    # a global context block missing from a plain model's file starts as the identity
    fresh = ("classifier.", "features.globalcontext.")
    missing = [k for k in missing if not k.startswith(fresh) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit DenseNet121: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda`` without a GPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: no CUDA GPU is visible (use auto or cpu)")
    return device


def amp_dtype(device: str | torch.device, mode: str = "auto") -> torch.dtype | None:
    """Autocast dtype for ``mode`` (auto / bf16 / fp16 / off) on ``device``; None means float32."""
    cuda = torch.device(device).type == "cuda"
    if mode == "auto" and cuda:  # bf16 where native, else fp16 with a GradScaler
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 has no such argument
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    if mode not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError(f"--amp {mode!r}: choose auto, bf16, fp16 or off")
    if mode == "fp16" and not cuda:
        raise ConfigError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)


def use_channels_last(device: str | torch.device, mode: str = "auto") -> bool:
    """channels_last for the model and its input: ``auto`` (on GPUs only), ``on`` or ``off``."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--channels-last {mode!r}: choose auto, on or off")
    return torch.device(device).type == "cuda" if mode == "auto" else mode == "on"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextlib.contextmanager
def algorithm_settings(deterministic: bool, benchmark: bool = True):
    """Deterministic algorithms, or cuDNN autotuning when ``benchmark`` (docs/performance.md), inside."""
    cudnn, warn_only = torch.backends.cudnn, torch.is_deterministic_algorithms_warn_only_enabled()
    before = torch.are_deterministic_algorithms_enabled(), warn_only, cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = benchmark and not deterministic, deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no such variant
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2:]


@contextlib.contextmanager
def full_float32():
    """Float32 convolutions and matrix products, not TF32, inside (the ERF and Grad-CAM)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device, local_world_size: int | None = None) -> int:
    """DataLoader workers per process: none on the CPU, else a share of the node's cores, 2 .. 8."""
    if device.type != "cuda":
        return 0
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())
    share = max(1, _usable_cores() // max(1, local_world_size))
    return max(min(2, share), min(8, share - 1))


def cpu_info() -> dict[str, object]:
    """This CPU's model, usable cores, vector extensions and PyTorch's kernel level (for provenance)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
        for key, _, value in (line.partition(":") for line in lines):  # the first processor's
            fields.setdefault(key.strip(), value.strip())
    extensions = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {
        "model": fields.get("model name") or platform.machine(),
        "cores": _usable_cores(),
        "extensions": [name for name in extensions if name in fields.get("flags", "").split()],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def describe_cpu() -> str:
    """One line: ``AMD EPYC 7B13, 2 cores, AVX2 (torch kernels: AVX2)``."""
    info = cpu_info()
    extensions = ", ".join(str(e).upper() for e in info["extensions"]) or "no AVX2"
    return f"{info['model']}, {info['cores']} cores, {extensions} (torch kernels: {info['torch_capability']})"


@functools.cache
def _imagenet_mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device and dtype: a tensor made from a list is copied to a GPU synchronously
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(3, 1, 1)


def model_input(images: torch.Tensor | np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """Gray uint8 or [0, 1] float images -> ImageNet-normalised float ``[N, 3, H, W]``."""
    x = torch.as_tensor(images)
    x = x[:, None] if x.dim() == 3 else x
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W]; got shape {tuple(x.shape)}")
    gray = x.dtype == torch.uint8 or x.shape[1] == 1
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if gray:
        mean, std = _imagenet_mean_std(x.device, x.dtype)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Positioned(Dataset):
    """Each item of ``dataset`` preceded by its position (``None`` items, skipped images, stay None)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, *item)


def make_loader(
    dataset,
    batch_size: int,
    sampler,
    workers: int,
    device: torch.device,
    seed: int | None,
    persistent: bool = True,
) -> DataLoader:
    """The DataLoader of training and prediction: ``(positions, images, targets, masks)`` batches."""
    return DataLoader(
        _Positioned(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=prefetch_batches(workers, batch_size, dataset.resolution) if workers > 0 else None,
        collate_fn=collate_skip_none,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )


def prefetch_batches(workers: int, batch_size: int, resolution: int) -> int:
    """Batches each worker prepares ahead: 4, fewer (at least 1) above :data:`LOADER_SHARED_BYTES` in all."""
    batch_bytes = batch_size * int(resolution) ** 2
    return max(1, min(PREFETCH_BATCHES, LOADER_SHARED_BYTES // max(1, workers * batch_bytes)))


def inference_batch(resolution: int) -> int:
    """Images per batch outside training: 64 up to 512 px, then as many pixels (4 at 2048 px)."""
    return max(1, min(64, INFERENCE_BATCH_PIXELS // int(resolution) ** 2))


@torch.no_grad()
def predict_arrays(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    num_workers: int = 0,
    channels_last: bool | None = None,
    positions: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, logits) of the readable items of ``dataset`` (or of its ``positions``), in order."""
    device = torch.device(device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    layout = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout).eval()
    order = range(len(dataset)) if positions is None else positions
    loader = make_loader(dataset, batch_size, order, num_workers, device, None, persistent=False)
    found, logits = [], []
    for batch in loader:
        if batch is None:
            continue
        with autocast(device, amp):
            out = model(model_input(batch[1].to(device, non_blocking=True), channels_last))
        found.append(batch[0].numpy())
        logits.append(out.float().cpu().numpy())
    if not found:
        width = len(getattr(dataset, "findings", FINDINGS))
        return np.zeros(0, dtype=np.int64), np.zeros((0, width), dtype=np.float32)
    return np.concatenate(found), np.concatenate(logits)


def logits_frame(
    dicom_ids: list[str], positions: np.ndarray, logits: np.ndarray, findings: list[str] | None = None
) -> pd.DataFrame:
    """The predictions table (``dicom_id``, one column per finding); skipped images: a warning."""
    findings = list(FINDINGS if findings is None else findings)
    if logits.ndim != 2 or logits.shape[1] != len(findings):
        raise ValueError(
            f"the model has {logits.shape[-1]} outputs but the label set has {len(findings)} findings "
            f"({findings[:3]}...): it was trained on another label set"
        )
    order = np.argsort(positions, kind="stable")
    positions, logits = positions[order], logits[order]
    frame = pd.DataFrame(logits.astype(np.float64), columns=findings)
    frame.insert(0, "dicom_id", [dicom_ids[i] for i in positions])
    missing = sorted(set(range(len(dicom_ids))) - set(positions.tolist()))
    if missing:
        names = [dicom_ids[i] for i in missing[:5]]
        warnings.warn(
            f"{len(missing)} image(s) could not be read and have no prediction (first: {names})", stacklevel=2
        )
    return frame


def predict_logits(
    model: nn.Module,
    dataset: CXRDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    num_workers: int = 0,
) -> pd.DataFrame:
    """``dicom_id`` and one logit column per finding of ``dataset.findings``, dataset order."""
    positions, logits = predict_arrays(model, dataset, batch_size, device, amp, num_workers)
    return logits_frame(list(dataset.dicom_ids), positions, logits, getattr(dataset, "findings", None))


def load_trained_model(source: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """DenseNet121 in eval mode from a run folder or a weights file, loaded ``weights_only``."""
    path = Path(source) / paths.BEST_MODEL if Path(source).is_dir() else Path(source)
    state = _weights_file(path, map_location)
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else len(FINDINGS)
    global_context = any(key.startswith("features.globalcontext.") for key in state)
    model = build_model("none", num_classes, global_context=global_context)
    load_weights_into(model, state, source=str(path))
    return model.eval()
