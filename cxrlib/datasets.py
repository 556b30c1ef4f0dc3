"""The torch ``Dataset`` of an image index (:class:`CXRDataset`) and its collate function.

Label contract of :class:`CXRDataset` (as in torchxrayvision): each item is
``(image, target, mask)`` with ``image`` a uint8 ``[1, R, R]`` tensor (or whatever the
``transform`` makes of it), ``target`` float ``[F]`` with unknown labels set to 0, and
``mask`` float ``[F]``, 1 where the label is known and 0 where it is unknown; ``F`` is the
number of findings of the index's label set (``dataset.findings``; CheXpert's 14 by default).

The index schema lives in :mod:`cxrlib.index` and its builders in :mod:`cxrlib.readers`; both
are re-exported here, so ``from cxrlib.datasets import read_index`` keeps working, and
``python -m cxrlib.datasets`` runs the readers' command line (:func:`cxrlib.sources.main`)::

    python -m cxrlib.datasets --dataset mimic --data-root MIMIC --out index.csv [--views frontal]
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .cache import cache_settings, cached_image_path
from .images import image_size, resize_to_square
from .index import (
    ID_COLUMNS,
    INDEX_COLUMNS,
    describe_index,
    index_findings,
    read_index,
    select_findings,
    summarize_index,
    validate_index,
    write_index,
)
from .labels import targets_and_mask
from .nih import index_from_nih
from .readers import (
    FRONTAL_VIEWS,
    LABEL_MAP_COLUMNS,
    LABEL_MAPS,
    MIMIC_LABELS,
    MIMIC_METADATA,
    MIMIC_SPLIT,
    MIMIC_SPLITS,
    find_mimic_file,
    index_from_chexpert,
    index_from_csv,
    index_from_mimic,
    multi_label_targets,
)
from .sources import build_index, check_data_root, get_args_parser, index_from_source, main

__all__ = [
    # the Dataset
    "CXRDataset",
    "ImageReadError",
    "collate_skip_none",
    # re-exported from cxrlib.index, cxrlib.readers and cxrlib.images
    "FRONTAL_VIEWS",
    "ID_COLUMNS",
    "INDEX_COLUMNS",
    "LABEL_MAPS",
    "LABEL_MAP_COLUMNS",
    "MIMIC_LABELS",
    "MIMIC_METADATA",
    "MIMIC_SPLIT",
    "MIMIC_SPLITS",
    "build_index",
    "check_data_root",
    "describe_index",
    "find_mimic_file",
    "get_args_parser",
    "image_size",
    "index_findings",
    "index_from_chexpert",
    "index_from_csv",
    "index_from_mimic",
    "index_from_nih",
    "index_from_source",
    "multi_label_targets",
    "main",
    "read_index",
    "select_findings",
    "summarize_index",
    "validate_index",
    "write_index",
]


class ImageReadError(RuntimeError):
    """An image file could not be read or decoded; the message names the path."""


class CXRDataset(Dataset):
    """Images of an index at one resolution, from the cache or resized from the originals.

    Args:
        index: a validated index (see :func:`validate_index`); its row order is kept.
        resolution: side of the square image in pixels.
        cache_dir: the cache written by :mod:`cxrlib.cache`; ``None`` resizes originals on the fly.
        transform: applied to the uint8 ``[1, R, R]`` image (e.g. :func:`cxrlib.transforms.train_transform`).
        cache_format: file format of the cache (``png`` or ``jpg``); None: the cache manifest's
            (``png`` without a manifest). A value that contradicts the manifest is an error.
        resize_mode: ``squash`` or ``pad``; None: the cache manifest's, or ``squash`` on the fly.
        reduced_decode: on the fly, decode JPEGs at reduced size as the cache does by default
            (must match the cache's setting for identical pixels).
        skip_bad_images: when True an unreadable image is reported (a warning naming its path)
            and the item is ``None``, dropped by :func:`collate_skip_none`; when False (default)
            it raises :class:`ImageReadError`. Images are never replaced by zeros.
    """

    def __init__(
        self,
        index: pd.DataFrame,
        resolution: int,
        cache_dir: str | os.PathLike | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache_format: str | None = None,
        resize_mode: str | None = None,
        skip_bad_images: bool = False,
        reduced_decode: bool = True,
    ):
        self.resolution = int(resolution)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        built = cache_settings(self.cache_dir, self.resolution) if self.cache_dir is not None else None
        for name, given in (("format", cache_format), ("mode", resize_mode)):
            if built and built[name] and given is not None and given != built[name]:
                raise ValueError(
                    f"the cache {self.cache_dir} holds {self.resolution} px images with {name} "
                    f"{built[name]!r}, but {given!r} was asked for"
                )
        self.cache_format = cache_format or (built or {}).get("format") or "png"
        self.resize_mode = resize_mode or (built or {}).get("mode") or "squash"
        self.transform, self.reduced_decode = transform, reduced_decode
        self.skip_bad_images = skip_bad_images
        self.dicom_ids = index["dicom_id"].astype(str).tolist()
        self.paths = index["path"].astype(str).tolist()
        self.findings = index_findings(index)  # the label set: the index's finding columns
        self.targets, self.masks = targets_and_mask(index[self.findings].to_numpy(dtype=np.float32))

    def __len__(self) -> int:
        return len(self.dicom_ids)

    def image_path(self, i: int) -> Path:
        """File this item's image is read from."""
        if self.cache_dir is None:
            return Path(self.paths[i])
        return cached_image_path(self.cache_dir, self.resolution, self.dicom_ids[i], self.cache_format)

    def read_image(self, i: int) -> torch.Tensor:
        """The uint8 ``[1, R, R]`` image of item ``i``; raises :class:`ImageReadError` naming the file."""
        path = self.image_path(i)
        try:
            if self.cache_dir is None:
                image = resize_to_square(path, self.resolution, self.resize_mode, self.reduced_decode)
                array = np.asarray(image)
            else:
                with Image.open(path) as image:
                    # the cache is 8-bit grayscale already; convert() would copy every pixel once more
                    array = np.asarray(image if image.mode == "L" else image.convert("L"))
        except Exception as error:  # any decoder failure becomes one error type naming the file
            raise ImageReadError(
                f"cannot read image {path} (dicom_id {self.dicom_ids[i]}): {error}"
            ) from error
        if array.shape != (self.resolution, self.resolution):
            raise ImageReadError(
                f"image {path} is {array.shape[1]}x{array.shape[0]}, "
                f"expected {self.resolution}x{self.resolution}; rebuild the cache"
            )
        return torch.from_numpy(array.copy()).unsqueeze(0)

    def __getitem__(self, i: int):
        try:
            image = self.read_image(i)
        except ImageReadError as error:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping unreadable image: {error}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i], self.masks[i]


def collate_skip_none(batch: list):
    """``default_collate`` that drops items a dataset returned as ``None`` (skipped bad images)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


if __name__ == "__main__":
    sys.exit(main())
