"""A tiny, learnable dataset written straight into a cache: index.csv, folds.csv and PNGs per resolution.

Cardiomegaly positives carry a bright central disk and Pleural Effusion positives a bright
bottom band, over noise, so a network can learn them in a few steps; the other findings are
random 1 / 0 / unknown (NaN) labels, which exercises the loss mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlib.cache import cached_image_path
from cxrlib.index import validate_index
from cxrlib.labels import FINDINGS
from cxrlib.splits import make_folds, write_folds


@dataclass(frozen=True)
class TinyData:
    root: Path
    index: Path
    folds: Path
    cache: Path
    frame: pd.DataFrame


def tiny_image(resolution: int, cardiomegaly: bool, effusion: bool, rng: np.random.Generator) -> np.ndarray:
    image = rng.normal(90, 25, (resolution, resolution))
    yy, xx = np.mgrid[:resolution, :resolution] / resolution
    if cardiomegaly:
        image[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.2**2] += 110
    if effusion:
        image[yy > 0.8] += 110
    return np.clip(image, 0, 255).astype(np.uint8)


def make_tiny_dataset(
    root: str | Path,
    resolutions: tuple[int, ...] = (32, 64),
    subjects: int = 16,
    images_per_subject: int = 2,
    folds: int = 4,
    seed: int = 0,
) -> TinyData:
    """Write ``subjects x images_per_subject`` images at each resolution; return the paths."""
    root = Path(root)
    cache = root / "cache"
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        for i in range(images_per_subject):
            dicom_id = f"im{s:03d}{i}"
            labels = rng.choice([1.0, 0.0, np.nan], size=len(FINDINGS), p=[0.3, 0.5, 0.2])
            labels[FINDINGS.index("Cardiomegaly")] = float(rng.random() < 0.5)
            labels[FINDINGS.index("Pleural Effusion")] = float(rng.random() < 0.5)
            image_seed = rng.integers(1 << 31)
            for resolution in resolutions:
                pixels = tiny_image(
                    resolution,
                    labels[FINDINGS.index("Cardiomegaly")] == 1.0,
                    labels[FINDINGS.index("Pleural Effusion")] == 1.0,
                    np.random.default_rng(image_seed),
                )
                path = cached_image_path(cache, resolution, dicom_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(path)
            rows.append(
                {
                    "dicom_id": dicom_id,
                    "subject_id": f"{10000000 + s}",
                    "study_id": f"{50000000 + s * 10 + i}",
                    "path": str(cached_image_path(cache, resolutions[-1], dicom_id)),
                    "view": "PA",
                    "width": resolutions[-1],
                    "height": resolutions[-1],
                    **dict(zip(FINDINGS, labels, strict=True)),
                }
            )
    frame = validate_index(pd.DataFrame(rows))
    index_path = root / "index.csv"
    frame.to_csv(index_path, index=False)
    folds_path = root / "folds.csv"
    write_folds(make_folds(frame, k=folds, seed=seed), folds_path)
    return TinyData(root, index_path, folds_path, cache, frame)
