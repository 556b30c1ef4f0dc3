"""Image operations shared by the cache writer and the dataset: 8-bit gray, square resize, draft decoding.

How one square image is made (:func:`square_images`, the single definition used by the
cache writer in :mod:`cxrlib.cache` and by :class:`cxrlib.datasets.CXRDataset` when it
reads originals on the fly, so both give identical pixels):

1. JPEG sources with ``reduced_decode``: ``Image.draft`` asks libjpeg for the smallest DCT
   scale (1/2, 1/4, 1/8) whose output is still at least the target size, so the reduction
   only happens when the target is at most half the source;
2. :func:`to_grayscale_8bit`;
3. ``squash`` (the paper's plain resize to a square) or ``pad`` (keep the aspect ratio, pad
   the short side with black to a square), then a Lanczos resize to ``R`` x ``R``.

An image therefore depends only on (source, R, mode, reduced_decode), never on which other
resolutions were made with it. A JPEG whose compressed data holds a marker where none may be
(random or overwritten bytes carry one about every 256 bytes) is refused (:func:`jpeg_damage`):
libjpeg warns "Corrupt JPEG data" and decodes on, and Pillow silences that warning. A source is
read once and decoded once per distinct DCT scale: resolutions above half the source share one
full decode, and each smaller one gets a cheap reduced decode (a 256 px image from a 1/8-scale
decode).
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RESIZE_MODES = ("squash", "pad")
INTERPOLATION = "lanczos"

_MARKER = re.compile(rb"\xff([^\x00\xff])")  # 0xFF 0x00 is a stuffed data byte, 0xFF 0xFF padding
_AFTER_SCAN = frozenset((0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))  # tables, next scan
_FRAMES = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it."""
    with Image.open(path) as image:
        return image.size


def to_grayscale_8bit(image: Image.Image) -> Image.Image:
    """Convert any Pillow image (L, 1, RGB, RGBA, CMYK, YCbCr, palette, LA, 16-bit, I, F) to 8-bit ``L``.

    16- and 32-bit integer images are divided by ``2**b - 1``, where ``b`` is the smallest
    bit depth (at least 8) that holds the image's maximum: a 16-bit image keeps its range,
    and a 12-bit radiograph stored in a 16-bit PNG keeps all its contrast instead of being
    squeezed into 16 gray levels. Float images in [0, 1] are scaled by 255.
    """
    image.load()
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max(initial=0.0))
        if image.mode == "F" and top <= 1.0:
            scale = 1.0
        else:
            scale = float(2 ** max(8, int(math.ceil(top)).bit_length()) - 1)
        return Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("1", "RGB", "YCbCr"):
        return image.convert("L")
    # CMYK, palette, alpha and anything else: through RGB, which Pillow converts from every mode.
    return image.convert("RGB").convert("L")


def jpeg_damage(data: bytes) -> str:
    """Where a JPEG's markers break the format (a marker inside compressed data, restart markers
    out of order, stray bytes, data after the end), or ``""`` when they are where the format puts
    them: segments by their length, each scan's data up to its next marker, and after the last
    scan of a sequential image only the end-of-image marker."""
    pos, scan, restart, left = 2, False, 0, None  # left: components a sequential frame has not scanned
    while match := _MARKER.search(data, pos):
        code, start = match[1][0], match.start()
        if not scan and data[pos:start].strip(b"\xff"):
            return f"{start - pos} stray bytes before marker 0x{code:02X} at byte {start}"
        pos = match.end()
        if scan and 0xD0 <= code <= 0xD7:
            if code != 0xD0 + restart % 8:
                return f"restart marker 0x{code:02X} out of order at byte {start}"
            restart += 1
            continue
        if code == 0xD9:
            rest = len(data[pos:].strip(b"\x00\xff"))
            return f"{rest} bytes after the end-of-image marker at byte {start}" if rest else ""
        if scan and (code not in _AFTER_SCAN or left == 0):
            return f"marker 0x{code:02X} inside the compressed data at byte {start}"
        header = data[pos : pos + 8].ljust(8, b"\0")  # length, then the frame's or scan's fields
        if code in _FRAMES:
            left = None if code in _PROGRESSIVE else header[7]
        elif code == 0xDA and left is not None:
            left -= header[2]
        scan, restart = code == 0xDA, 0
        pos += int.from_bytes(header[:2], "big")
    return "no end-of-image marker"


def _draft_request(size: tuple[int, int], resolution: int, mode: str) -> tuple[int, int]:
    """The smallest decoded size that still gives a full-quality ``resolution`` px square."""
    if mode == "squash":
        return resolution, resolution
    longest = max(size)  # pad: the long side becomes the square's side
    return max(1, math.ceil(resolution * size[0] / longest)), max(
        1, math.ceil(resolution * size[1] / longest)
    )


def _to_square(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    if mode == "pad":
        side = max(image.size)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


@dataclass
class SquareImages:
    """The result of :func:`square_images`: one image per resolution and what the source was."""

    images: dict[int, Image.Image]
    source_size: tuple[int, int]
    decode_scale: dict[int, int]


def square_images(
    source: str | os.PathLike | bytes,
    resolutions: list[int] | tuple[int, ...],
    mode: str = "squash",
    reduced_decode: bool = True,
) -> SquareImages:
    """Decode a source (path or its bytes) and make an 8-bit ``R`` x ``R`` image for each resolution.

    The source is read once and decoded once per distinct DCT scale; every image is what
    :func:`resize_to_square` returns for its resolution alone.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    decoded: dict[tuple[int, int], Image.Image] = {}
    images, scales = {}, {}
    source_size = (0, 0)
    for resolution in sorted({int(r) for r in resolutions}, reverse=True):
        with Image.open(io.BytesIO(data)) as image:
            source_size = image.size
            if reduced_decode and image.format == "JPEG":
                image.draft("L", _draft_request(image.size, resolution, mode))
            if image.size not in decoded:
                decoded[image.size] = to_grayscale_8bit(image)
            gray = decoded[image.size]
        images[resolution] = _to_square(gray, resolution, mode)
        scales[resolution] = max(1, round(source_size[0] / gray.width))
    if data[:2] == b"\xff\xd8" and (damage := jpeg_damage(data)):
        raise ValueError(f"corrupt JPEG data: {damage}")
    return SquareImages(images, source_size, scales)


def resize_to_square(
    source: str | os.PathLike, resolution: int, mode: str = "squash", reduced_decode: bool = True
) -> Image.Image:
    """Open an image and return it as an 8-bit grayscale ``resolution`` x ``resolution`` image.

    ``squash`` is the paper's plain resize to a square; ``pad`` keeps the aspect ratio
    and pads the short side with black. JPEGs are decoded at reduced size (``draft``)
    when the target is at most half the source, then resized with a Lanczos filter.
    The cache writer makes its files with the same code (:func:`square_images`).
    """
    return square_images(source, [resolution], mode, reduced_decode).images[int(resolution)]
