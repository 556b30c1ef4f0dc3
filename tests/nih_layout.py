"""A copy of a written phantom in NIH ChestX-ray14's official layout, for tests and trials of
:func:`cxrlib.datasets.index_from_nih` without the real release.

The copy has ``Data_Entry_2017_v2020.csv`` with NIH's columns (the split ``OriginalImage[Width`` /
``Height]`` header included), square PNGs of ``stored_size`` px in ``images_001/images/`` ..
(as NIH's are all 1024 x 1024), and ``train_val_list.txt`` / ``test_list.txt`` by patient. The
phantom's frontal images only (NIH has no laterals). Its findings become NIH's where one is the
same or the nearest kind (:data:`PHANTOM_TO_NIH`); the phantom draws no Mass, Emphysema, Fibrosis
or Hernia, which stay 0. The native size in the metadata is the phantom file's own size, so the
stored and native sizes differ, as in the release.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlib.datasets import NIH_ENTRY_FILES, index_from_mimic
from cxrlib.fileio import write_csv_atomic, write_text_atomic
from cxrlib.labels import NO_FINDING

NIH_COLUMNS: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)

PHANTOM_TO_NIH: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Effusion",
    "Lung Opacity": "Infiltration",
    "Lung Lesion": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural Other": "Pleural_Thickening",
}


def finding_labels(row: dict) -> str:
    """NIH's ``Finding Labels`` of a phantom index row: its NIH findings joined by ``|``."""
    found = [nih for ours, nih in PHANTOM_TO_NIH.items() if row.get(ours) == 1.0]
    return "|".join(dict.fromkeys(found)) or NO_FINDING


def write_nih_layout(
    phantom_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    stored_size: int = 128,
    images_per_folder: int = 100,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write the NIH-layout copy of the phantom at ``phantom_root`` into ``out_dir``; return it."""
    out_dir = Path(out_dir)
    index = index_from_mimic(phantom_root, views="frontal")
    patients = {s: n + 1 for n, s in enumerate(sorted(index["subject_id"].unique()))}
    rows, visits = [], dict.fromkeys(patients, 0)
    for k, row in enumerate(index.to_dict("records")):  # records keep names with spaces
        patient, visit = patients[row["subject_id"]], visits[row["subject_id"]]
        name = f"{patient:08d}_{visit:03d}.png"
        visits[row["subject_id"]] += 1
        folder = out_dir / f"images_{k // images_per_folder + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(row["path"]) as image:
            image.convert("L").resize((stored_size, stored_size)).save(folder / name)
        rows.append(
            [name, finding_labels(row), visit, patient, 40 + patient % 40, "M" if patient % 2 else "F"]
            + [row["view"], int(row["width"]), int(row["height"]), 0.143, 0.143]
        )
    write_csv_atomic(pd.DataFrame(rows, columns=list(NIH_COLUMNS)), out_dir / NIH_ENTRY_FILES[0])
    rng = np.random.default_rng(seed)
    test_patients = set(
        rng.permutation(sorted(patients.values()))[: max(1, round(test_fraction * len(patients)))]
    )
    names = [r[0] for r in rows]
    test = [n for n in names if int(n[:8]) in test_patients]
    write_text_atomic(
        "\n".join(n for n in names if n not in set(test)) + "\n", out_dir / "train_val_list.txt"
    )
    write_text_atomic("\n".join(test) + "\n", out_dir / "test_list.txt")
    return out_dir
