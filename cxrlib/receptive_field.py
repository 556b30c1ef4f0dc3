"""Theoretical receptive field (a layer walk) and effective receptive field (the paper's eq. 1).

Theoretical receptive field
---------------------------
:func:`theoretical_receptive_field` walks a torchvision-style CNN with the standard
recurrence, per layer of kernel ``k``, stride ``s``, dilation ``d`` and padding ``p``::

    rf    += (k - 1) * d * jump        # the field grows by the kernel's reach in input pixels
    start += ((k - 1) / 2 * d - p) * jump   # centre of output pixel 0, in input pixels
    jump  *= s                          # input pixels between neighbouring output pixels

BatchNorm, activations and dropout leave the field unchanged. A dense block concatenates
its input with every layer's output, so its field is the largest of its branches (the
last layer's). ``torchvision.models.densenet121().features`` gives 2071 px, the paper's
figure.

Effective receptive field (ERF), eq. 1
--------------------------------------
``ERF(p, q) = 1/(K N) sum_k sum_i (d f^k(x_i, u, v) / d x_i(p, q))^2``, exactly as follows:

* **Tensor**: ``f = model.features(x)`` (DenseNet's last dense block after ``norm5``),
  *before* the final ReLU that torchvision applies in ``forward``. Without the ReLU
  every channel contributes; with it (``final_relu=True``) the channels that happen to
  be negative at the centre of an image contribute nothing, so the map would also
  measure which channels are active. Grad-CAM (:mod:`cxrlib.gradcam`) uses the same tensor.
* **Position**: ``(u, v) = (H' // 2, W' // 2)`` of the ``H' x W'`` feature map (the exact
  centre when odd; the lower-right of the four central pixels when even). The radii below
  are measured from the ERF's own centre of mass, so this choice does not bias them.
* **Model**: put in eval mode for the computation (BatchNorm uses running statistics, so
  images do not interact), restored afterwards.
* **Translations**: each sample is an image shifted by an integer offset drawn uniformly
  from ``[-S, S]`` in each axis, ``S = round(max_shift * side)`` (default 1/4 of the side),
  the uncovered border filled by **reflection** (default): the content under the centre
  varies over a large part of the image, and reflection adds no artificial edge (a
  constant fill puts a sharp border inside the field, which attracts gradient).
  ``padding="zeros"`` (black, like the rotation augmentation) and ``"circular"`` exist too.
  ``n_translations`` samples are drawn per image; ``N`` = images x translations.
* **Pixel and channels**: uint8 grayscale images (the data set's format) are converted
  inside the differentiated graph (``[0, 1]``, replicated to 3 channels, ImageNet
  normalisation), so the gradient is with respect to the grayscale pixel value in
  ``[0, 1]`` units, the three replicated channels' contributions summed by the chain rule.
  Float inputs are taken as the model's input; then ``channel_mode="sum"`` squares the
  sum over input channels (the derivative for adding the same amount to every channel,
  as a grayscale pixel does) and ``"sum_of_squares"`` sums the per-channel squares.
* **Exact**: ``exact=True`` computes all ``K`` per-channel gradients with batched
  vector-Jacobian products (``torch.autograd.grad(..., is_grads_batched=True)``) over
  chunks of ``chunk`` channels: about ``K`` backward passes per image (K = 1024 for
  DenseNet121), so meant for small models, small images or a GPU.
* **Estimator** (default): random-sign channel mixing. For Rademacher signs ``s_k``,
  ``E[(sum_k s_k df^k/dx)^2] = sum_k (df^k/dx)^2`` since ``E[s_k s_l] = [k = l]``; each of
  ``n_probes`` probes costs one backward pass, so the estimate is unbiased at ``n_probes``
  instead of ``K`` backward passes per image. Its relative noise falls as
  ``1/sqrt(n_probes x N)``; a test checks it against the exact map.

Cost (DenseNet121, CPU, one thread, measured): one image-probe (a backward pass of one
image) takes about 0.016 s at 64 px, 0.05 s at 128 px and 0.22 s at 256 px; 8 images x 4
probes at 256 px took 7 s of CPU time. The exact map needs 1024 image-probes per image
(about 4 minutes per 256 px image on one CPU thread). On an H200 (fp32, measured): the
exact map of 4 samples at 256 px took 9.7 s; the estimator with 8 probes on 4 images took
0.4 s at 256 and 512 px, 1.3 s at 1024 px and 5.4 s at 2048 px (batch 1, chunk 2, 12 GiB
peak), and with 256 probes its map was within 4.6% (relative L2) of the exact one. Memory
grows with ``chunk`` x ``batch_size`` (input gradients and the batched backward's
intermediates).

Summaries (:class:`ERFResult`): ``radius50_px`` / ``radius90_px``, the radius of the disc
around the ERF's centre of mass that holds 50% / 90% of the ERF's total mass (sum of the
map); ``fraction50`` / ``fraction90 = 2 * radius / side`` (the disc's diameter as a fraction of
the image side; ``erf_fraction_of_image`` in ``erf.csv`` is ``fraction90``); and
``sigma_px``, the width of an isotropic Gaussian fitted to the map by least squares (for a
Gaussian ERF, radius50 = 1.18 sigma and radius90 = 2.15 sigma).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import curve_fit
from tqdm.auto import tqdm

from .fileio import write_csv_atomic
from .models import full_float32, model_input
from .paths import tables_dir

# Layers that leave the spatial field unchanged.
_IDENTITY_LAYERS = (
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
# Layers after which one output depends on the whole input.
_GLOBAL_LAYERS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)

ERF_DEFINITION = (
    "ERF = paper eq. 1: mean over the K channels of model.features (pre-final-ReLU) at the centre "
    "feature pixel (H'//2, W'//2) and over N randomly translated samples of the squared gradient "
    "w.r.t. the input pixel; radiusQ = radius around the ERF centre of mass holding Q% of its mass; "
    "erf_fraction_of_image = 2 * radius90 / image side; gaussian_sigma = least-squares isotropic "
    "Gaussian fit; erf_radius_px = radius90"
)


# ----------------------------------------------------------------------------- theoretical RF


@dataclass
class _Field:
    """Receptive field state per axis (height, width)."""

    rf: np.ndarray = field(default_factory=lambda: np.ones(2))
    jump: np.ndarray = field(default_factory=lambda: np.ones(2))
    start: np.ndarray = field(default_factory=lambda: np.zeros(2))
    size: np.ndarray | None = None

    def copy(self) -> _Field:
        size = None if self.size is None else self.size.copy()
        return _Field(self.rf.copy(), self.jump.copy(), self.start.copy(), size)


def _pair(value) -> np.ndarray:
    return np.array(value if isinstance(value, tuple | list) else (value, value), dtype=float)


def _is_dense_block(module: nn.Module) -> bool:
    """torchvision's ``_DenseBlock`` (a ModuleDict whose forward concatenates every layer's output)."""
    return type(module).__name__ == "_DenseBlock"


def _show(values: np.ndarray) -> int | float | tuple:
    as_python = [int(v) if float(v).is_integer() else float(v) for v in values]
    return as_python[0] if as_python[0] == as_python[1] else tuple(as_python)


def _apply_layer(state: _Field, name: str, layer: nn.Module, rows: list[dict]) -> _Field:
    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    dilation = _pair(getattr(layer, "dilation", 1))
    padding_value = layer.padding
    if isinstance(padding_value, str):  # Conv2d(padding="same" | "valid"), stride 1 only
        padding = (kernel - 1) * dilation / 2 if padding_value == "same" else np.zeros(2)
    else:
        padding = _pair(padding_value)
    out = state.copy()
    out.rf = state.rf + (kernel - 1) * dilation * state.jump
    out.start = state.start + ((kernel - 1) / 2 * dilation - padding) * state.jump
    out.jump = state.jump * stride
    if state.size is not None:
        extent = state.size + 2 * padding - dilation * (kernel - 1) - 1
        rounding = np.ceil if getattr(layer, "ceil_mode", False) else np.floor
        out.size = rounding(extent / stride) + 1
    row = {
        "layer": name,
        "type": type(layer).__name__,
        "kernel": _show(kernel),
        "stride": _show(stride),
        "dilation": _show(dilation),
        "padding": _show(padding),
        "jump": _show(out.jump),
        "rf": _show(out.rf),
        "start": _show(out.start),
    }
    if out.size is not None:
        row["size"] = _show(out.size)
    rows.append(row)
    return out


def _walk(module: nn.Module, name: str, state: _Field, rows: list[dict]) -> _Field:
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        return _apply_layer(state, name, module, rows)
    if isinstance(module, _IDENTITY_LAYERS):
        return state
    if isinstance(module, _GLOBAL_LAYERS):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) pools or connects globally, so the field "
            "becomes the whole input; pass only the convolutional part (e.g. model.features)"
        )
    children = list(module.named_children())
    if _is_dense_block(module):
        # Each layer sees the concatenation of the block input and all earlier outputs: the
        # field of a concatenation is the largest of its parts (all share jump and start).
        branches = [state]
        for child_name, child in children:
            combined = max(branches, key=lambda s: s.rf.max()).copy()
            branches.append(_walk(child, f"{name}.{child_name}", combined, rows))
        jumps = {tuple(b.jump) for b in branches}
        if len(jumps) != 1:
            raise ValueError(f"dense block {name!r} concatenates maps of different strides {jumps}")
        return max(branches, key=lambda s: s.rf.max())
    if not children:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is not supported by the receptive field walk; "
            "supported: Conv2d, MaxPool2d, AvgPool2d, norms, activations, dropout, containers"
        )
    # Any other container is taken as a chain of its children in registration order
    # (true for nn.Sequential and torchvision's _DenseLayer and _Transition).
    for child_name, child in children:
        state = _walk(child, f"{name}.{child_name}" if name else child_name, state, rows)
    return state


def theoretical_receptive_field(
    module: nn.Module, input_size: int | tuple[int, int] | None = None, return_table: bool = False
) -> int | tuple[int, int] | tuple[int | tuple[int, int], pd.DataFrame]:
    """Receptive field in input pixels of one output pixel of a torchvision-style CNN.

    ``module`` is the convolutional part (e.g. ``densenet121().features``). With
    ``return_table`` also returns a per-layer DataFrame (layer, type, kernel, stride,
    dilation, padding, jump, rf, start and, given ``input_size``, the output ``size``).
    Returns an int, or a ``(height, width)`` tuple for non-square fields.
    """
    state = _Field()
    if input_size is not None:
        state.size = _pair(input_size)
    rows: list[dict] = []
    state = _walk(module, "", state, rows)
    rf = _show(state.rf)
    if return_table:
        return rf, pd.DataFrame(rows)
    return rf


# ----------------------------------------------------------------------------- ERF


@dataclass
class ERFResult:
    """Effective receptive field map (eq. 1) and its summaries; see the module docstring."""

    erf: np.ndarray
    feature_position: tuple[int, int]
    feature_size: tuple[int, int]
    n_images: int
    n_samples: int
    n_channels: int
    method: str
    n_probes: int | None
    max_shift_px: int
    padding: str
    centroid: tuple[float, float] = (np.nan, np.nan)
    radius50_px: float = np.nan
    radius90_px: float = np.nan
    sigma_px: float = np.nan

    def __post_init__(self):
        if np.isnan(self.radius50_px):
            summary = erf_summary(self.erf)
            self.centroid = summary["centroid"]
            self.radius50_px, self.radius90_px = summary["radius50_px"], summary["radius90_px"]
            self.sigma_px = summary["sigma_px"]

    @property
    def resolution(self) -> int:
        """Image side in pixels (the map's height)."""
        return int(self.erf.shape[0])

    @property
    def fraction50(self) -> float:
        """Diameter of the 50%-mass disc over the image side."""
        return 2 * self.radius50_px / self.resolution

    @property
    def fraction90(self) -> float:
        """Diameter of the 90%-mass disc over the image side (``erf_fraction_of_image``)."""
        return 2 * self.radius90_px / self.resolution


def mass_centroid(erf: np.ndarray) -> tuple[float, float]:
    """Centre of mass (row, col) of a non-negative map, in pixel coordinates."""
    total = erf.sum()
    if not total > 0:
        raise ValueError("the ERF map has no mass (all zeros): the output does not depend on the input")
    rows, cols = np.indices(erf.shape)
    return float((rows * erf).sum() / total), float((cols * erf).sum() / total)


def mass_radius(erf: np.ndarray, fraction: float, centre: tuple[float, float] | None = None) -> float:
    """Radius in pixels of the disc around ``centre`` (default: centre of mass) holding ``fraction``
    of the map's mass, interpolated linearly between pixel-centre distances."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    centre = mass_centroid(erf) if centre is None else centre
    rows, cols = np.indices(erf.shape)
    distance = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(distance, kind="stable")
    distance, cumulative = distance[order], np.cumsum(erf.ravel()[order])
    return float(np.interp(fraction * cumulative[-1], cumulative, distance))


def gaussian_sigma(erf: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """Sigma in pixels of an isotropic Gaussian ``A exp(-r^2 / 2 sigma^2)`` fitted by least squares.

    Centred at ``centre`` (default: centre of mass); started from the second-moment estimate.
    """
    centre = mass_centroid(erf) if centre is None else centre
    rows, cols = np.indices(erf.shape)
    r2 = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).ravel()
    values = erf.ravel() / erf.max()
    sigma0 = math.sqrt(max((r2 * values).sum() / values.sum() / 2.0, 0.25))

    def model(r2_, amplitude, sigma):
        return amplitude * np.exp(-r2_ / (2.0 * sigma**2))

    try:
        (_, sigma), _ = curve_fit(model, r2, values, p0=(1.0, sigma0), maxfev=2000)
    except RuntimeError:  # no convergence: fall back to the moment estimate
        return sigma0
    return float(abs(sigma))


def erf_summary(erf: np.ndarray) -> dict:
    """Centre of mass, 50% / 90% mass radii and fitted Gaussian sigma of an ERF map."""
    centre = mass_centroid(erf)
    return {
        "centroid": centre,
        "radius50_px": mass_radius(erf, 0.5, centre),
        "radius90_px": mass_radius(erf, 0.9, centre),
        "sigma_px": gaussian_sigma(erf, centre),
    }


def translate_batch(
    images: torch.Tensor, shifts: torch.Tensor, max_shift: int, padding: str = "reflect"
) -> torch.Tensor:
    """Shift each image of ``[B, C, H, W]`` by its integer ``(dy, dx)`` in ``shifts`` ``[B, 2]``.

    Content moves by ``(dy, dx)`` (down / right for positive values); the uncovered border is
    filled by ``padding``: ``reflect``, ``zeros`` or ``circular``. ``|dy|, |dx| <= max_shift``.
    """
    if max_shift == 0:
        return images
    mode = {"reflect": "reflect", "zeros": "constant", "circular": "circular"}.get(padding)
    if mode is None:
        raise ValueError(f"padding must be 'reflect', 'zeros' or 'circular', got {padding!r}")
    height, width = images.shape[-2:]
    if mode == "reflect" and max_shift >= min(height, width):
        raise ValueError(
            f"reflect padding needs max_shift < image side, got {max_shift} for {height}x{width}"
        )
    padded = F.pad(images, (max_shift,) * 4, mode=mode)
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        top, left = max_shift - dy, max_shift - dx
        out[i] = padded[i, :, top : top + height, left : left + width]
    return out


def _as_batch(images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, bool]:
    """Images as a float ``[N, C, H, W]`` tensor and whether they are grayscale pixels in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dim() == 2:
        images = images[None, None]
    elif images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], [N, H, W] or [H, W]; got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[1] != 1:
            raise ValueError(f"uint8 images must be grayscale [N, 1, H, W]; got shape {tuple(images.shape)}")
        return images.float() / 255.0, True
    return images.float(), False


def _feature_extractor(model: nn.Module) -> nn.Module:
    return getattr(model, "features", model)


def _check_erf_options(channel_mode, n_translations, n_probes, chunk, batch_size, max_shift) -> None:
    if channel_mode not in ("sum", "sum_of_squares"):
        raise ValueError(f"channel_mode must be 'sum' or 'sum_of_squares', got {channel_mode!r}")
    if n_translations < 1 or n_probes < 1 or chunk < 1 or batch_size < 1:
        raise ValueError("n_translations, n_probes, chunk and batch_size must be at least 1")
    if not 0.0 <= max_shift < 1.0:
        raise ValueError(f"max_shift is a fraction of the image side in [0, 1), got {max_shift}")


@full_float32()  # float32 as documented: TF32 convolutions (a GPU default) would round the gradients
def effective_receptive_field(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    n_translations: int = 1,
    max_shift: float = 0.25,
    padding: str = "reflect",
    exact: bool = False,
    n_probes: int = 8,
    chunk: int = 8,
    batch_size: int = 8,
    final_relu: bool = False,
    channel_mode: str = "sum",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ERFResult:
    """The paper's eq. 1 for ``model`` over randomly translated ``images`` (see the module docstring).

    Args:
        model: a CNN with ``.features`` (torchvision DenseNet) or a module returning a feature map.
        images: uint8 grayscale ``[N, 1, R, R]`` / ``[N, R, R]`` (normalised here, gradients per
            grayscale pixel) or float ``[N, C, R, R]`` model inputs.
        n_translations: random translations per image (samples = images x translations).
        max_shift: largest shift per axis as a fraction of the side (uniform integer shifts).
        padding: fill of the uncovered border: ``reflect``, ``zeros`` or ``circular``.
        exact: all K channel gradients (K backward passes per image) instead of the estimator.
        n_probes: random-sign probes per sample for the estimator.
        chunk: channels (exact) or probes (estimator) per batched backward; memory grows with it.
        batch_size: samples per forward pass.
        final_relu: apply the ReLU that follows ``features`` in torchvision's forward.
        channel_mode: for float inputs, ``sum`` or ``sum_of_squares`` over input channels.
        generator: a ``torch.Generator`` for reproducible shifts and probes.
        progress: show a tqdm bar.
    """
    _check_erf_options(channel_mode, n_translations, n_probes, chunk, batch_size, max_shift)
    features = _feature_extractor(model)
    device = next(model.parameters(), torch.empty(0)).device
    pixels, grayscale = _as_batch(images)
    n_images, _, height, width = pixels.shape
    shift_px = int(round(max_shift * min(height, width)))
    generator = generator or torch.Generator().manual_seed(0)

    was_training = model.training
    model.eval()
    total = torch.zeros(height, width, dtype=torch.float64, device=device)
    n_channels = feature_size = position = None
    bar = tqdm(total=n_images * n_translations, desc="ERF", disable=not progress, unit="img")
    try:
        # All shifts first, so the exact and estimated maps of one seed see the same samples.
        all_shifts = torch.randint(
            -shift_px, shift_px + 1, (n_translations, n_images, 2), generator=generator
        )
        for shifts_of_round in all_shifts:
            for first in range(0, n_images, batch_size):
                batch = pixels[first : first + batch_size]
                shifts = shifts_of_round[first : first + batch_size]
                x = translate_batch(batch, shifts, shift_px, padding).to(device).requires_grad_(True)
                with torch.enable_grad():
                    fmap = features(model_input(x) if grayscale else x)
                    fmap = F.relu(fmap) if final_relu else fmap
                    n_channels, feature_size = fmap.shape[1], tuple(fmap.shape[-2:])
                    position = (feature_size[0] // 2, feature_size[1] // 2)
                    target = fmap[:, :, position[0], position[1]]  # [b, K]
                    squared = _squared_gradient_sum(
                        target, x, exact, n_probes, chunk, channel_mode, generator
                    )
                total += squared.double()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    n_samples = n_images * n_translations
    erf = (total / (n_channels * n_samples)).cpu().numpy()
    return ERFResult(
        erf=erf, feature_position=position, feature_size=feature_size, n_images=n_images,
        n_samples=n_samples, n_channels=n_channels, method="exact" if exact else "estimator",
        n_probes=None if exact else n_probes, max_shift_px=shift_px, padding=padding,
    )  # fmt: skip


def _squared_gradient_sum(
    target: torch.Tensor,
    x: torch.Tensor,
    exact: bool,
    n_probes: int,
    chunk: int,
    channel_mode: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """``sum_i sum_k (d target[i, k] / d x_i)^2`` as an ``[H, W]`` map, exactly or estimated.

    Images are independent in eval mode, so one backward of ``sum_i v_i . target[i]`` gives
    every image's own gradient; ``is_grads_batched`` runs several cotangents ``v`` at once.
    """
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
        last = first + size >= count
        (grads,) = torch.autograd.grad(
            target, x, cotangents, retain_graph=not last, is_grads_batched=True
        )  # [size, b, C, H, W]
        squared = grads.sum(dim=2).square() if channel_mode == "sum" else grads.square().sum(dim=2)
        total += squared.sum(dim=(0, 1))
    return total if exact else total / n_probes


def erf_row(result: ERFResult, state: str, theoretical_rf_px: int | None = None) -> dict:
    """One row of ``erf.csv`` for ``result`` (``state`` = ``init`` or ``trained``)."""
    return {
        "resolution": result.resolution,
        "state": state,
        "erf_radius50_px": result.radius50_px,
        "erf_radius90_px": result.radius90_px,
        "erf_radius_px": result.radius90_px,
        "erf_fraction50_of_image": result.fraction50,
        "erf_fraction_of_image": result.fraction90,
        "gaussian_sigma_px": result.sigma_px,
        "n_images": result.n_images,
        "n_samples": result.n_samples,
        "method": result.method,
        "n_probes": result.n_probes,
        "max_shift_px": result.max_shift_px,
        "padding": result.padding,
        "theoretical_rf_px": theoretical_rf_px,
        "definition": ERF_DEFINITION,
    }


def erf_table(
    results: Iterable[tuple[str, ERFResult]] | Mapping[tuple[int, str], ERFResult],
    theoretical_rf_px: int | None = None,
) -> pd.DataFrame:
    """``erf.csv`` rows from ``(state, result)`` pairs or a ``{(resolution, state): result}`` mapping,
    sorted by state (init first) and resolution."""
    pairs = [(key[1], value) for key, value in results.items()] if isinstance(results, Mapping) else results
    table = pd.DataFrame([erf_row(result, state, theoretical_rf_px) for state, result in pairs])
    state_order = {"init": 0, "trained": 1}
    table = table.sort_values(
        ["state", "resolution"], key=lambda c: c.map(state_order).fillna(2) if c.name == "state" else c
    )
    return table.reset_index(drop=True)


ERF_BATCH_PIXELS = 8 * 256 * 256  # pixels of one ERF batch in compute_erfs (8 images of 256 px)


def default_erf_batch(height: int, width: int) -> int:
    """Samples per ERF forward pass in :func:`compute_erfs`: 8 images of 256 px or fewer, one image
    from 1024 px on.

    Memory grows with batch x pixels (float32, ``chunk`` probes in one backward): measured on the
    CPU at 256 px, batch 8 with 8 probes needs about 2.4 GiB, about 155 GiB at 2048 px, more than
    an H200 has; one 2048 px image needs about an eighth of that.
    """
    return max(1, min(8, ERF_BATCH_PIXELS // max(1, int(height) * int(width))))


def compute_erfs(
    models: Mapping[tuple[int, str], nn.Module],
    images: Mapping[int, torch.Tensor | np.ndarray],
    **kwargs,
) -> dict[tuple[int, str], ERFResult]:
    """:func:`effective_receptive_field` for each ``{(resolution, state): model}`` on ``images[resolution]``.

    Keyword arguments go to :func:`effective_receptive_field`; every model gets the same seed.
    Without ``batch_size`` each resolution gets :func:`default_erf_batch`.
    """
    seed = kwargs.pop("seed", 0)
    batch_size = kwargs.pop("batch_size", None)
    results = {}
    for (resolution, state), model in models.items():
        if resolution not in images:
            raise ValueError(f"no images given for resolution {resolution}")
        generator = torch.Generator().manual_seed(seed)
        batch = batch_size or default_erf_batch(*tuple(images[resolution].shape[-2:]))
        results[(resolution, state)] = effective_receptive_field(
            model, images[resolution], generator=generator, batch_size=batch, **kwargs
        )
    return results


def write_erf_table(run: str | os.PathLike, table: pd.DataFrame) -> Path:
    """Write ``tables/erf.csv`` atomically."""
    return write_csv_atomic(table, tables_dir(run) / "erf.csv")


def resize_images(images: torch.Tensor | np.ndarray, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """uint8 ``[N, 1, R, R]`` images resized (antialiased bilinear) to each side in ``sizes``."""
    batch = torch.as_tensor(images)
    if batch.dim() == 3:
        batch = batch[:, None]
    out = {}
    for size in sizes:
        resized = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True)
        out[int(size)] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def conv_stack(depth: int, channels: int = 4, seed: int = 0) -> nn.Sequential:
    """``depth`` linear 3x3 convolutions (stride 1, padding 1), seeded: the textbook ERF example.

    Its theoretical receptive field is ``2 * depth + 1`` px; its ERF grows only about as
    ``sqrt(depth)`` (Luo et al. 2016). Linear, so no unit is dead and every map has mass.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1) for i in range(depth)]
    return nn.Sequential(*layers)


def erf_of_conv_stack(
    depths: Sequence[int], size: int = 65, channels: int = 4, n_images: int = 8, seed: int = 0
) -> dict[int, np.ndarray]:
    """Exact eq. 1 ERF maps (``size`` x ``size``) of :func:`conv_stack` at each depth, on random images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 1, size, size, generator=generator)
    maps = {}
    for depth in depths:
        model = conv_stack(int(depth), channels, seed)
        result = effective_receptive_field(
            model, images, exact=True, max_shift=0.0, generator=torch.Generator().manual_seed(seed)
        )
        maps[int(depth)] = result.erf
    return maps
