"""Kermany et al.'s pediatric chest X-rays in their official layout -> an image index with
Pneumonia and No Finding.

The release (Kermany, Zhang, Goldbaum, "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray
Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0; mirrored
widely) unpacks as::

    chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg      (val/ only in some mirrors)

5,856 images, RGB and grayscale mixed. The patient is only in the file name: NORMAL's
``IM-0115-0001.jpeg`` and ``NORMAL2-IM-0927-0001.jpeg`` (patients ``IM-0115``, ``NORMAL2-IM-0927``),
PNEUMONIA's ``person1_bacteria_1.jpeg`` and ``person1_virus_6.jpeg`` (patient ``person1``, subtype
bacteria / virus). A name that fits neither is a one-line error naming the file.

The index's label set is Pneumonia and No Finding, mapped from the folder as the CSV route's
``label_map="kermany"`` does; ``split`` (the folder: train / val / test) and ``subtype`` (normal /
bacteria / virus) are kept as columns. With the folds' ``split: official``
(:func:`cxrlib.splits.official_folds`) the official test images are the test fold.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from .fileio import DataError, DataFileNotFound
from .images import image_size
from .index import validate_index
from .readers import LABEL_MAPS, _filter_views, _ids_from_paths

KERMANY_SPLITS: tuple[str, ...] = ("train", "val", "test")
KERMANY_FINDINGS: tuple[str, ...] = ("Pneumonia", "No Finding")
KERMANY_NAMES: dict[str, re.Pattern] = {  # class folder -> file name without extension
    "NORMAL": re.compile(r"(?P<patient>(?:NORMAL\d*-)?IM-\d+)(?:-\d+)+"),
    "PNEUMONIA": re.compile(r"(?P<patient>person\d+)_(?P<subtype>bacteria|virus)_\d+"),
}
KERMANY_SOURCE = (
    "Kermany et al., Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for "
    "Classification, Mendeley Data v2, https://doi.org/10.17632/rscbjbr9sj.2, CC BY 4.0"
)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")


def check_kermany_root(root: str | os.PathLike) -> Path:
    """``root`` as an absolute path when it holds ``train/`` or ``test/``; else one line saying
    where to download the set and where to unpack it."""
    root = Path(os.path.abspath(root))
    if not any((root / split).is_dir() for split in KERMANY_SPLITS):
        raise DataFileNotFound(
            f"Kermany's chest X-rays not found: {root} has no train/ or test/ folder; download "
            f"ChestXRay2017.zip ({KERMANY_SOURCE}) and unpack it so that {root}/train/NORMAL/ exists"
        )
    return root


def kermany_files(root: Path) -> pd.DataFrame:
    """One row per image under ``root/<split>/<NORMAL|PNEUMONIA>/``: path, split, class folder,
    patient and subtype, sorted by path; a file name that fits no pattern is an error naming it."""
    rows = []
    for split in KERMANY_SPLITS:
        for folder, pattern in KERMANY_NAMES.items():
            directory = root / split / folder
            names = sorted(os.listdir(directory)) if directory.is_dir() else []
            for name in names:
                stem, suffix = os.path.splitext(name)
                if name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES:
                    continue  # .DS_Store and other files that are not images
                match = pattern.fullmatch(stem)
                if match is None:
                    example = "IM-0115-0001.jpeg" if folder == "NORMAL" else "person1_bacteria_1.jpeg"
                    raise DataError(
                        f"{directory / name}: the file name names no patient (a {folder} image is "
                        f"named like {example})"
                    )
                subtype = match.groupdict().get("subtype") or "normal"
                rows.append((str(directory / name), split, folder, match["patient"], subtype))
    if not rows:
        raise DataError(f"{root}: no image in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    return pd.DataFrame(rows, columns=["path", "split", "finding", "subject_id", "subtype"])


def index_from_kermany(root: str | os.PathLike, views: str | None = None) -> pd.DataFrame:
    """Index of Kermany's chest X-rays from the official layout (see the module docs).

    ``views``: None / ``"all"`` keeps every image (the release names no view, so ``view`` is blank).
    Width and height are read from each image's header.
    """
    root = check_kermany_root(root)
    frame = kermany_files(root)
    dicom_ids = _ids_from_paths(frame["path"], root)
    frame = frame.assign(dicom_id=dicom_ids, study_id=dicom_ids, view="")
    frame = _filter_views(frame, views, root)
    sizes = []
    for path in frame["path"]:
        try:
            sizes.append(image_size(path))
        except Exception as error:  # name the file, whatever Pillow raised
            raise DataError(f"{path}: cannot read the image: {error}") from error
    frame[["width", "height"]] = pd.DataFrame(sizes, index=frame.index, dtype="int64")
    mapping = LABEL_MAPS["kermany"]
    labels = pd.DataFrame([mapping[f] for f in frame["finding"]], index=frame.index, dtype=float)
    columns = ["dicom_id", "subject_id", "study_id", "path", "view", "width", "height", "split", "subtype"]
    index = pd.concat([frame[columns], labels[list(KERMANY_FINDINGS)]], axis=1)
    return validate_index(index.reset_index(drop=True), source=str(root))
