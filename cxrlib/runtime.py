"""Where and in which precision the model runs: device choice, autocast, channels_last, model input.

Shared by training, prediction and the analysis steps (ERF, Grad-CAM, the train x test
resolution matrix), so that all of them pick the same device and precision the same way:

* :func:`resolve_device`: ``auto`` is the GPU when one is visible, else the CPU.
* :func:`amp_dtype`: ``auto`` is bf16 on GPUs that support it, fp16 on older GPUs, off on the
  CPU; ``bf16`` also runs on the CPU.
* :func:`autocast`: ``torch.autocast`` for that dtype, or nothing for float32. The model's
  head stays float32 under it (:class:`cxrlib.models.DenseNet121`).
* :func:`model_input`: cached uint8 images on the device -> ImageNet-normalised 3 channels.
"""

from __future__ import annotations

import contextlib

import torch

from .transforms import normalize


class ConfigError(ValueError):
    """A parameter or input file is wrong; raised before any work starts."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda`` without a GPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: no CUDA GPU is visible (use auto or cpu)")
    return device


def amp_dtype(device: str | torch.device, mode: str = "auto") -> torch.dtype | None:
    """Autocast dtype for ``mode`` (auto / bf16 / fp16 / off) on ``device``; None means float32.

    ``auto``: bf16 on GPUs that support it, fp16 on older GPUs, off on the CPU.
    """
    device = torch.device(device)
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU")
        return torch.float16
    raise ConfigError(f"--amp {mode!r}: choose auto, bf16, fp16 or off")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``[B, 1, R, R]`` (already on the device) -> normalised float ``[B, 3, R, R]``."""
    x = normalize(images) if images.dtype == torch.uint8 else images.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
