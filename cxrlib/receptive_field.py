"""Theoretical receptive field (a layer walk) and effective receptive field (the paper's eq. 1).
Definitions, estimator and cost: docs/method.md, "Receptive fields"."""

import functools
import math
from collections import namedtuple
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import curve_fit
from tqdm.auto import tqdm

from .models import full_float32, model_input

_IDENTITY_LAYERS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm, nn.LocalResponseNorm,
                    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                    nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Dropout2d, nn.Identity)  # fmt: skip
_GLOBAL_LAYERS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)

ERF_DEFINITION = (
    "ERF = paper eq. 1: mean over the K channels of model.features (pre-final-ReLU) at the centre "
    "feature pixel (H'//2, W'//2) and over N randomly translated samples of the squared gradient "
    "w.r.t. the input pixel; radiusQ = radius around the ERF centre of mass holding Q% of its mass; "
    "erf_fraction_of_image = 2 * radius90 / image side; gaussian_sigma = least-squares isotropic "
    "Gaussian fit; erf_radius_px = radius90"
)


_Field = namedtuple("_Field", "rf jump start")  # each an array per axis (height, width)


def _pair(value) -> np.ndarray:
    return np.array(value if isinstance(value, tuple | list) else (value, value), dtype=float)


def _show(values: np.ndarray) -> int | float | tuple:
    as_python = [int(v) if float(v).is_integer() else float(v) for v in values]
    return as_python[0] if as_python[0] == as_python[1] else tuple(as_python)


def _apply_layer(state: _Field, name: str, layer: nn.Module, rows: list[dict]) -> _Field:
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    dilation = _pair(getattr(layer, "dilation", 1))
    padding = np.zeros(2) if isinstance(layer.padding, str) else _pair(layer.padding)  # "valid": none
    padding = (kernel - 1) * dilation / 2 if layer.padding == "same" else padding  # Conv2d, stride 1 only
    start = state.start + ((kernel - 1) / 2 * dilation - padding) * state.jump
    out = _Field(state.rf + (kernel - 1) * dilation * state.jump, state.jump * stride, start)
    values = {"kernel": kernel, "stride": stride, "dilation": dilation, "padding": padding, "jump": out.jump,
              "rf": out.rf, "start": out.start}  # fmt: skip
    rows.append({"layer": name, "type": type(layer).__name__} | {k: _show(v) for k, v in values.items()})
    return out


def _walk(module: nn.Module, name: str, state: _Field, rows: list[dict]) -> _Field:
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        return _apply_layer(state, name, module, rows)
    if isinstance(module, _IDENTITY_LAYERS):
        return state
    if isinstance(module, _GLOBAL_LAYERS):
        raise ValueError(f"{name!r} ({type(module).__name__}) pools or connects globally: use .features")
    children = list(module.named_children())
    if not children:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) is not supported by the walk")
    # any container is a chain of its children; so is a dense block: each layer sees the block input and
    # every earlier output concatenated, and the largest of their fields is the last layer's
    for child_name, child in children:
        state = _walk(child, f"{name}.{child_name}" if name else child_name, state, rows)
    return state


def theoretical_receptive_field(
    module: nn.Module, return_table: bool = False
) -> int | tuple | tuple[int | tuple, pd.DataFrame]:
    """Receptive field in input pixels of one output pixel of a CNN's convolutional part (and the walk)."""
    rows: list[dict] = []
    state = _walk(module, "", _Field(np.ones(2), np.ones(2), np.zeros(2)), rows)
    return (_show(state.rf), pd.DataFrame(rows)) if return_table else _show(state.rf)


@functools.cache
def densenet121_field() -> tuple[int, pd.DataFrame]:
    """DenseNet121's theoretical receptive field (2071 px, the paper's) and its per-layer table."""
    with torch.device("meta"):  # the architecture only: no weights, no random draws
        features = torchvision.models.densenet121().features
    return theoretical_receptive_field(features, return_table=True)


@dataclass
class ERFResult:
    """An ERF map (eq. 1), how it was measured, and its summaries (computed from the map)."""

    erf: np.ndarray
    feature_position: tuple[int, int]
    feature_size: tuple[int, int]
    n_images: int
    n_samples: int
    n_channels: int
    method: str
    n_probes: int | None
    max_shift_px: int
    padding: str = "reflect"
    centroid: tuple[float, float] = (np.nan, np.nan)
    radius50_px: float = np.nan
    radius90_px: float = np.nan
    sigma_px: float = np.nan

    def __post_init__(self):
        if np.isnan(self.radius50_px):
            vars(self).update(erf_summary(self.erf))  # centroid, radius50_px, radius90_px, sigma_px

    @property
    def resolution(self) -> int:
        return int(self.erf.shape[0])

    @property
    def fraction50(self) -> float:  # the 50%-mass disc's diameter over the image side
        return 2 * self.radius50_px / self.resolution

    @property
    def fraction90(self) -> float:  # erf_fraction_of_image
        return 2 * self.radius90_px / self.resolution


def mass_centroid(erf: np.ndarray) -> tuple[float, float]:
    """Centre of mass (row, col) of a non-negative map."""
    total = erf.sum()
    if not total > 0:
        raise ValueError("the ERF map has no mass (all zeros): the output does not depend on the input")
    rows, cols = np.indices(erf.shape)
    return float((rows * erf).sum() / total), float((cols * erf).sum() / total)


def mass_radius(erf: np.ndarray, fraction: float, centre: tuple[float, float] | None = None) -> float:
    """Radius of the disc around ``centre`` (default: centre of mass) holding ``fraction`` of the mass."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    centre = mass_centroid(erf) if centre is None else centre
    rows, cols = np.indices(erf.shape)
    distance = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(distance, kind="stable")
    cumulative = np.cumsum(erf.ravel()[order])
    return float(np.interp(fraction * cumulative[-1], cumulative, distance[order]))


def gaussian_sigma(erf: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """Sigma of an isotropic Gaussian least-squares fitted around ``centre`` (default: centre of mass)."""
    centre = mass_centroid(erf) if centre is None else centre
    rows, cols = np.indices(erf.shape)
    r2 = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).ravel()
    values = erf.ravel() / erf.max()
    sigma0 = math.sqrt(max((r2 * values).sum() / values.sum() / 2.0, 0.25))  # the second moment's
    try:
        (_, sigma), _ = curve_fit(
            lambda r2_, a, s: a * np.exp(-r2_ / (2.0 * s**2)), r2, values, p0=(1.0, sigma0), maxfev=2000
        )
    except RuntimeError:  # no convergence: the moment estimate
        return sigma0
    return float(abs(sigma))


def erf_summary(erf: np.ndarray) -> dict:
    """Centre of mass, 50% / 90% mass radii and fitted Gaussian sigma of an ERF map."""
    centre = mass_centroid(erf)
    radii = {f"radius{q}_px": mass_radius(erf, q / 100, centre) for q in (50, 90)}
    return {"centroid": centre, **radii, "sigma_px": gaussian_sigma(erf, centre)}


def translate_batch(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each image moved by its ``(dy, dx)`` (down / right when positive), the border filled by reflection."""
    if max_shift == 0:
        return images
    height, width = images.shape[-2:]
    if max_shift >= min(height, width):
        raise ValueError(f"reflect padding needs max_shift < image side: {max_shift} for {height}x{width}")
    padded = F.pad(images, (max_shift,) * 4, mode="reflect")
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        top, left = max_shift - dy, max_shift - dx
        out[i] = padded[i, :, top : top + height, left : left + width]
    return out


@full_float32()  # float32 as documented: TF32 convolutions (a GPU default) would round the gradients
def effective_receptive_field(
    model: nn.Module, images: torch.Tensor | np.ndarray, *, n_translations: int = 1, max_shift: float = 0.25,
    exact: bool = False, n_probes: int = 8, chunk: int = 8, batch_size: int = 8,
    generator: torch.Generator | None = None, progress: bool = False,
) -> ERFResult:  # fmt: skip
    """Eq. 1 of ``model.features`` over randomly shifted uint8 grayscale images (or float model inputs)."""
    if min(n_translations, n_probes, chunk, batch_size) < 1:
        raise ValueError("n_translations, n_probes, chunk and batch_size must be at least 1")
    features = getattr(model, "features", model)
    device = next(model.parameters(), torch.empty(0)).device
    pixels = torch.as_tensor(images)
    grayscale = pixels.dtype == torch.uint8  # gray pixels [N, 1, H, W], through the model's input scaling
    pixels = pixels.float() / 255.0 if grayscale else pixels.float()
    n_images, _, height, width = pixels.shape
    shift_px = int(round(max_shift * min(height, width)))
    generator = generator or torch.Generator().manual_seed(0)
    # All shifts first, so the exact and estimated maps of one seed see the same samples.
    all_shifts = torch.randint(-shift_px, shift_px + 1, (n_translations, n_images, 2), generator=generator)
    was_training = model.training
    model.eval()
    total = torch.zeros(height, width, dtype=torch.float64, device=device)
    bar = tqdm(total=n_images * n_translations, desc="ERF", disable=not progress, unit="img")
    try:
        for shifts in all_shifts:
            for first in range(0, n_images, batch_size):
                batch = pixels[first : first + batch_size]
                x = translate_batch(batch, shifts[first : first + batch_size], shift_px).to(device)
                x.requires_grad_(True)
                with torch.enable_grad():
                    fmap = features(model_input(x) if grayscale else x)
                    position = (fmap.shape[-2] // 2, fmap.shape[-1] // 2)
                    target = fmap[:, :, position[0], position[1]]  # [b, K]
                    total += _squared_gradient_sum(target, x, exact, n_probes, chunk, generator).double()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    n_samples, n_channels = n_images * n_translations, fmap.shape[1]
    erf = (total / (n_channels * n_samples)).cpu().numpy()
    method, probes = ("exact", None) if exact else ("estimator", n_probes)
    return ERFResult(
        erf, position, tuple(fmap.shape[-2:]), n_images, n_samples, n_channels, method, probes, shift_px
    )


def _squared_gradient_sum(target, x, exact, n_probes, chunk, generator) -> torch.Tensor:
    # sum_i sum_k (d target[i, k] / d x_i)^2, exactly or estimated. Images are independent in eval mode,
    # so one backward of sum_i v_i . target[i] gives each image's own gradient, for several v at once.
    batch, n_channels = target.shape
    total = torch.zeros(x.shape[-2:], dtype=torch.float32, device=x.device)
    count = n_channels if exact else n_probes
    for first in range(0, count, chunk):
        size = min(chunk, count - first)
        if exact:  # one-hot cotangents: channel first + j for every image
            cotangents = torch.zeros(size, batch, n_channels, device=x.device, dtype=target.dtype)
            cotangents[torch.arange(size), :, first + torch.arange(size)] = 1.0
        else:  # Rademacher signs per probe, image and channel
            signs = torch.randint(0, 2, (size, batch, n_channels), generator=generator)
            cotangents = (2.0 * signs - 1.0).to(device=x.device, dtype=target.dtype)
        retain = first + size < count  # for the next chunk
        (grads,) = torch.autograd.grad(target, x, cotangents, retain_graph=retain, is_grads_batched=True)
        total += grads.sum(dim=2).square().sum(dim=(0, 1))  # grads: [size, b, C, H, W]
    return total if exact else total / n_probes


def erf_table(results: Mapping, theoretical_rf_px: int | None = None) -> pd.DataFrame:
    """``erf.csv`` rows of ``{(resolution, state): result}``, init first."""
    rows = [
        {"resolution": r.resolution, "state": state, "erf_radius50_px": r.radius50_px,
         "erf_radius90_px": r.radius90_px, "erf_radius_px": r.radius90_px,
         "erf_fraction50_of_image": r.fraction50, "erf_fraction_of_image": r.fraction90,
         "gaussian_sigma_px": r.sigma_px, "n_images": r.n_images, "n_samples": r.n_samples,
         "method": r.method, "n_probes": r.n_probes, "max_shift_px": r.max_shift_px, "padding": r.padding,
         "theoretical_rf_px": theoretical_rf_px, "definition": ERF_DEFINITION}
        for (_, state), r in results.items()
    ]  # fmt: skip
    order = {"init": 0, "trained": 1}
    table = pd.DataFrame(rows).sort_values(
        ["state", "resolution"], key=lambda c: c.map(order).fillna(2) if c.name == "state" else c
    )
    return table.reset_index(drop=True)


def default_erf_batch(height: int, width: int) -> int:
    """Samples per ERF forward pass: 8 images of 256 px or fewer, one from 1024 px on (memory)."""
    return max(1, min(8, 8 * 256 * 256 // max(1, int(height) * int(width))))


def compute_erfs(models: Mapping, images: Mapping, seed: int = 0, **kwargs) -> dict:
    """:func:`effective_receptive_field` of each ``{(resolution, state): model}``, each with ``seed``."""
    results = {}
    for (resolution, state), model in models.items():
        batch = default_erf_batch(*images[resolution].shape[-2:])
        generator = torch.Generator().manual_seed(seed)
        results[(resolution, state)] = effective_receptive_field(
            model, images[resolution], generator=generator, batch_size=batch, **kwargs
        )
    return results


def resize_images(images: torch.Tensor | np.ndarray, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """uint8 ``[N, 1, R, R]`` images resized (antialiased bilinear) to each side in ``sizes``."""
    batch = torch.as_tensor(images).float()
    resized = [F.interpolate(batch, size=(s, s), mode="bilinear", antialias=True) for s in sizes]
    return {int(s): r.round().clamp(0, 255).to(torch.uint8) for s, r in zip(sizes, resized, strict=True)}


def conv_stack(depth: int, channels: int = 4, seed: int = 0) -> nn.Sequential:
    """``depth`` seeded linear 3x3 convolutions: a field of ``2 * depth + 1`` px, an ERF ~ ``sqrt(depth)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Conv2d(channels if i else 1, channels, 3, padding=1) for i in range(depth)])


def erf_of_conv_stack(
    depths: Sequence[int], size: int = 65, channels: int = 4, n_images: int = 8, seed: int = 0
) -> dict[int, np.ndarray]:
    """Exact eq. 1 maps of :func:`conv_stack` at each depth, on random images."""
    images = torch.rand(n_images, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return {
        int(depth): effective_receptive_field(
            conv_stack(int(depth), channels, seed), images, exact=True, max_shift=0.0,
            generator=torch.Generator().manual_seed(seed),
        ).erf
        for depth in depths
    }  # fmt: skip
