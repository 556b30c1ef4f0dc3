"""Multi-resolution image cache: each source image once per resolution, as a square 8-bit file.

Layout (shared by the writer here and the readers in :mod:`cxrlib.datasets`)::

    CACHE/manifest.csv
    CACHE/<R>/<first two characters of dicom_id>/<dicom_id>.png

``resize_to_square`` is the one resize used everywhere (the cache, and datasets that
read originals on the fly), so cached and on-the-fly images are identical.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

RESIZE_MODES = ("squash", "pad")
CACHE_FORMATS = ("png", "jpg")


def cached_image_path(cache_dir: str | os.PathLike, resolution: int, dicom_id: str, fmt: str = "png") -> Path:
    """Where the ``resolution`` px copy of image ``dicom_id`` lives in the cache."""
    dicom_id = str(dicom_id)
    return Path(cache_dir) / str(int(resolution)) / dicom_id[:2] / f"{dicom_id}.{fmt}"


def resize_to_square(source: str | os.PathLike, resolution: int, mode: str = "squash") -> Image.Image:
    """Open an image and return it as an 8-bit grayscale ``resolution`` x ``resolution`` image.

    ``squash`` is the paper's plain resize to a square; ``pad`` keeps the aspect ratio
    and pads the short side with black. JPEGs are decoded at reduced size (``draft``)
    when the target is at most half the source, then resized with a Lanczos filter.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    with Image.open(source) as image:
        if image.format == "JPEG":
            # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that stays >= the requested size.
            image.draft("L", (resolution, resolution))
        image = to_grayscale_8bit(image)
        if mode == "pad":
            side = max(image.size)
            canvas = Image.new("L", (side, side), 0)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def to_grayscale_8bit(image: Image.Image) -> Image.Image:
    """Convert any Pillow image (L, RGB, CMYK, 16-bit I;16 / I, palette, LA) to 8-bit grayscale ``L``.

    16-bit images are scaled by their own maximum bit depth (not clipped), so a 12-bit or
    16-bit radiograph keeps its full contrast.
    """
    image.load()
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    return (
        image.convert("RGB").convert("L")
        if image.mode in ("CMYK", "P", "PA", "LA", "RGBA")
        else image.convert("L")
    )
