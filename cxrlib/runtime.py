"""Where and in which precision the model runs: device choice, autocast, channels_last, model input.

Shared by training, prediction and the analysis steps (ERF, Grad-CAM, the train x test
resolution matrix), so that all of them pick the same device and precision the same way:

* :func:`resolve_device`: ``auto`` is the GPU when one is visible, else the CPU.
* :func:`amp_dtype`: ``auto`` is bf16 on GPUs that support it natively, fp16 on older GPUs, off
  on the CPU; ``bf16`` also runs on the CPU.
* :func:`autocast`: ``torch.autocast`` for that dtype, or nothing for float32. The model's
  head stays float32 under it (:class:`cxrlib.models.DenseNet121`).
* :func:`model_input`: cached uint8 images on the device -> ImageNet-normalised 3 channels.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from .transforms import normalize

# The CPU features that decide which floating-point kernels PyTorch and oneDNN use.
VECTOR_EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


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

    ``auto``: bf16 on GPUs that support it natively (Ampere and later), fp16 with a GradScaler on
    older ones (V100, T4), whose bf16 is emulated and slow; off on the CPU.
    """
    device = torch.device(device)
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 has no such argument
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on the CPU")
        return torch.float16
    raise ConfigError(f"--amp {mode!r}: choose auto, bf16, fp16 or off")


def use_channels_last(device: str | torch.device, mode: str = "auto") -> bool:
    """Whether the model and its input use channels_last: ``auto`` on GPUs only, or ``on`` / ``off``.

    On GPUs it is always faster; on the CPU it depends on the size (measured with DenseNet121 on
    a 2-core AVX2 CPU, fp32: 1.4-1.8x faster training at 32-64 px, none at 128 px), so CPU presets
    ask for it where it pays.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--channels-last {mode!r}: choose auto, on or off")
    return torch.device(device).type == "cuda" if mode == "auto" else mode == "on"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``[B, 1, R, R]`` (already on the device) -> normalised float ``[B, 3, R, R]``."""
    x = normalize(images) if images.dtype == torch.uint8 else images.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def cpu_info() -> dict[str, object]:
    """The CPU this process runs on: model, usable cores, vector extensions, PyTorch's kernel level.

    Results depend on the CPU's floating-point kernels (an AVX2-only CPU and one with AMX give
    different AUCs for the same seed), so provenance records this next to the GPUs.
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:  # the first processor's lines are enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the model from the platform, extensions unknown
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "cores": cores,
        "extensions": [name for name in VECTOR_EXTENSIONS if name in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def describe_cpu(info: dict[str, object] | None = None) -> str:
    """One line: ``AMD EPYC 7B13, 2 cores, AVX2 (torch kernels: AVX2)``."""
    info = cpu_info() if info is None else info
    extensions = ", ".join(str(e).upper() for e in info["extensions"]) or "no AVX2"
    return f"{info['model']}, {info['cores']} cores, {extensions} (torch kernels: {info['torch_capability']})"


@contextlib.contextmanager
def algorithm_settings(deterministic: bool, benchmark: bool = True):
    """Deterministic algorithms, or cuDNN autotuning when ``benchmark`` (it times every convolution
    algorithm at each new input shape, a cost short runs feel: docs/performance.md), for the run;
    the caller's settings afterwards."""
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    cudnn.benchmark, cudnn.deterministic = benchmark and not deterministic, deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no such variant
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]


@contextlib.contextmanager
def full_float32():
    """Convolutions and matrix products in float32 inside, not TF32 (PyTorch's default for cuDNN
    convolutions on Ampere and later GPUs); the caller's settings afterwards. For the ERF and
    Grad-CAM, which are documented as float32 gradients."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
