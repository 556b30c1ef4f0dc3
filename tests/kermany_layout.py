"""Kermany's chest X-rays in their official layout (``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``)
for tests: a tiny generated tree, and this project's CSV copy arranged as the release.

The CSV copy (``labels.csv`` and ``images/``, see its README) holds images of the official train split
only; :func:`arrange_csv_copy` deals its patients, shuffled with a seed, into ``test/`` (20%),
``val/`` (2%) and ``train/`` and links each image there under its release name (``.jpeg``)::

    python tests/kermany_layout.py ../shared/data/kermany-pediatric-cxr /tmp/chest_xray
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# The generated tree: path under the root -> (patient, subtype, image mode, width, height).
# Two images of one patient, both subtypes of one patient, NORMAL2- and four-part names, an
# upper-case suffix, RGB beside grayscale, and IM-0115 in both train and test.
TINY_TREE: dict[str, tuple[str, str, str, int, int]] = {
    "train/NORMAL/IM-0115-0001.jpeg": ("IM-0115", "normal", "L", 40, 32),
    "train/NORMAL/IM-0439-0001-0001.jpeg": ("IM-0439", "normal", "L", 36, 36),
    "train/NORMAL/IM-0439-0001-0002.jpeg": ("IM-0439", "normal", "L", 36, 36),
    "train/NORMAL/NORMAL2-IM-0927-0001.jpeg": ("NORMAL2-IM-0927", "normal", "RGB", 48, 40),
    "train/PNEUMONIA/person1_bacteria_1.jpeg": ("person1", "bacteria", "L", 44, 32),
    "train/PNEUMONIA/person1_virus_6.jpeg": ("person1", "virus", "RGB", 32, 44),
    "train/PNEUMONIA/person3_bacteria_10.JPEG": ("person3", "bacteria", "L", 40, 40),
    "train/PNEUMONIA/person5_virus_11.jpeg": ("person5", "virus", "L", 36, 40),
    "val/NORMAL/IM-0200-0001.jpeg": ("IM-0200", "normal", "L", 40, 36),
    "val/PNEUMONIA/person7_bacteria_20.jpeg": ("person7", "bacteria", "L", 40, 36),
    "test/NORMAL/IM-0001-0001.jpeg": ("IM-0001", "normal", "L", 32, 32),
    "test/NORMAL/IM-0115-0002.jpeg": ("IM-0115", "normal", "L", 40, 32),
    "test/PNEUMONIA/person100_bacteria_475.jpeg": ("person100", "bacteria", "RGB", 48, 36),
    "test/PNEUMONIA/person101_virus_187.jpeg": ("person101", "virus", "L", 36, 48),
}


def write_tiny_tree(root: Path) -> Path:
    """Write :data:`TINY_TREE` (small noisy JPEGs) and a ``.DS_Store`` under ``root``; return it."""
    rng = np.random.default_rng(0)
    for relative, (_, _, mode, width, height) in TINY_TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(pixels, "L")
        (image.convert("RGB") if mode == "RGB" else image).save(path, format="JPEG", quality=90)
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def arrange_csv_copy(
    csv_folder: Path, out: Path, test_fraction: float = 0.2, val_fraction: float = 0.02, seed: int = 0
) -> Path:
    """Link every image of the CSV copy at ``csv_folder`` into ``out`` in the official layout (see
    the module docs); return ``out``."""
    table = pd.read_csv(csv_folder / "labels.csv", dtype=str)
    patients = np.random.default_rng(seed).permutation(sorted(table["patient_id"].unique()))
    n_test, n_val = round(test_fraction * len(patients)), max(1, round(val_fraction * len(patients)))
    split_of = dict.fromkeys(patients[n_test + n_val :], "train")
    split_of.update(dict.fromkeys(patients[n_test : n_test + n_val], "val"))
    split_of.update(dict.fromkeys(patients[:n_test], "test"))
    for path, patient, finding in table[["path", "patient_id", "finding"]].itertuples(index=False):
        folder = out / split_of[patient] / finding
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(csv_folder / path), folder / (Path(path).stem + ".jpeg"))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/kermany_layout.py CSV_FOLDER OUT")
    print(arrange_csv_copy(Path(sys.argv[1]), Path(sys.argv[2])))
