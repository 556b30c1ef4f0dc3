"""Image index (one row per image) and the torch ``Dataset`` that reads it at a resolution.

Index schema (a DataFrame, also written as ``index.csv``), one row per image:

================= ==========================================================
``dicom_id``      unique image id (string)
``subject_id``    patient id (string); folds are grouped by it
``study_id``      study id (string)
``path``          path of the original image file
``view``          view position (``PA``, ``AP``, ``LATERAL``, ...; may be empty)
``width``         native width in pixels
``height``        native height in pixels
14 findings       ``FINDINGS`` columns, 1.0 / 0.0 / NaN (unknown), after the policy
================= ==========================================================

Label contract of :class:`CXRDataset` (as in torchxrayvision): each item is
``(image, target, mask)`` with ``image`` a uint8 ``[1, R, R]`` tensor (or whatever the
``transform`` makes of it), ``target`` float ``[14]`` with unknown labels set to 0, and
``mask`` float ``[14]``, 1 where the label is known and 0 where it is unknown.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from .cache import cached_image_path, resize_to_square
from .labels import FINDINGS, targets_and_mask

ID_COLUMNS: tuple[str, ...] = ("dicom_id", "subject_id", "study_id")
INDEX_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "path", "view", "width", "height", *FINDINGS)
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "PA RLD", "AP RLD")


class ImageReadError(RuntimeError):
    """An image file could not be read or decoded; the message names the path."""


def validate_index(index: pd.DataFrame, source: str = "index") -> pd.DataFrame:
    """Check an index against the schema; return it with ids as strings and labels as floats.

    Raises ``ValueError`` naming ``source`` and the column or row on a missing column,
    a duplicate ``dicom_id`` or a label outside {1, 0, NaN}.
    """
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; an index needs {list(INDEX_COLUMNS)}")
    if index.empty:
        raise ValueError(f"{source}: the index has no rows")
    index = index.copy()
    for column in ID_COLUMNS:
        index[column] = index[column].astype(str)
    duplicated = index["dicom_id"].duplicated(keep=False)
    if duplicated.any():
        rows = (np.flatnonzero(duplicated.to_numpy()) + 2).tolist()[:5]
        raise ValueError(
            f"{source}: duplicate dicom_id {index['dicom_id'][duplicated].iloc[0]!r} (CSV lines {rows})"
        )
    for finding in FINDINGS:
        values = pd.to_numeric(index[finding], errors="coerce")
        bad = (values.isna() & index[finding].notna()) | (values.notna() & ~values.isin([0.0, 1.0]))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: column {finding!r}, CSV line {row + 2}: value "
                f"{index[finding].iloc[row]!r} is not 1, 0 or blank (unknown)"
            )
        index[finding] = values.astype(float)
    index["view"] = index["view"].fillna("").astype(str)
    return index


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``index.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    frame = pd.read_csv(
        path,
        dtype={c: str for c in (*ID_COLUMNS, "path", "view")},
        keep_default_na=False,
        na_values={f: [""] for f in FINDINGS},
    )
    return validate_index(frame, source=str(path))


class CXRDataset(Dataset):
    """Images of an index at one resolution, from the cache or resized from the originals.

    Args:
        index: a validated index (see :func:`validate_index`); its row order is kept.
        resolution: side of the square image in pixels.
        cache_dir: the cache written by :mod:`cxrlib.cache`; ``None`` resizes originals on the fly.
        transform: applied to the uint8 ``[1, R, R]`` image (e.g. :func:`cxrlib.transforms.train_transform`).
        cache_format: file format of the cache (``png`` or ``jpg``).
        resize_mode: ``squash`` or ``pad`` when reading originals (must match the cache's).
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
        cache_format: str = "png",
        resize_mode: str = "squash",
        skip_bad_images: bool = False,
    ):
        self.resolution = int(resolution)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.transform, self.cache_format, self.resize_mode = transform, cache_format, resize_mode
        self.skip_bad_images = skip_bad_images
        self.dicom_ids = index["dicom_id"].astype(str).tolist()
        self.paths = index["path"].astype(str).tolist()
        self.targets, self.masks = targets_and_mask(index[list(FINDINGS)].to_numpy(dtype=np.float32))

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
                array = np.asarray(resize_to_square(path, self.resolution, self.resize_mode))
            else:
                from PIL import Image

                with Image.open(path) as image:
                    array = np.asarray(image.convert("L"))
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
