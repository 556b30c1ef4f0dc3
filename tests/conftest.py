"""Shared pytest fixtures; each is self-contained and named after what it builds.

``fake_mimic`` / ``fake_mimic_copy``: a tiny MIMIC-CXR-JPG tree (6 subjects, 9 studies,
18 small JPEGs, the three official CSVs gzipped) with hand-planted uncertain (-1) and
blank labels, a study without a label row kept out (tests add that case themselves),
and the tables it was written from, so tests can compare against them.

``smoke_run``: the whole ``smoke`` preset run once per session by the pipeline (about
1m40s on 2 CPU cores), shared by the smoke and browser tests; do not modify it (copy it).

The terminal summary ends with one line when the browser tests were skipped for want of Chromium.
"""

from __future__ import annotations

import os
import tempfile

# Before torch loads OpenMP: waiting threads sleep instead of spinning, which keeps tests that
# start several processes (DDP ranks, notebook kernels) fast on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Time calibrations and step times of the pipeline's estimate stay inside the test session.
os.environ.setdefault("CXR_CACHE_DIR", tempfile.mkdtemp(prefix="cxrlib-test-cache-"))

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.labels import FINDINGS
from cxrlib.pipeline import run_pipeline
from cxrlib.presets import Preset

FAKE_MIMIC_SUBJECTS = ("10000032", "10000764", "11000183", "12000005", "15000001", "19999987")
FAKE_MIMIC_SPLIT = ("train", "train", "train", "train", "validate", "test")  # per subject
FAKE_MIMIC_VIEWS = ("PA", "LATERAL", "AP", "LL", "", "AP", "PA")
FAKE_MIMIC_SIZES = ((40, 48), (48, 40), (44, 44))  # (width, height)


@dataclass
class FakeMimic:
    root: Path
    metadata: (
        pd.DataFrame
    )  # as written: dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, StudyDate
    labels: pd.DataFrame  # as written: subject_id, study_id, 14 findings as "1.0" / "0.0" / "-1.0" / ""
    split: pd.DataFrame  # as written: dicom_id, study_id, subject_id, split

    def image_path(self, dicom_id: str) -> Path:
        row = self.metadata.set_index("dicom_id").loc[dicom_id]
        subject, study = row["subject_id"], row["study_id"]
        return self.root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def write_fake_mimic(root: Path, seed: int = 0) -> FakeMimic:
    """Write the tiny MIMIC-CXR-JPG tree under ``root`` and return what was written."""
    rng = np.random.default_rng(seed)
    meta_rows, label_rows, split_rows = [], [], []
    image_number = 0
    for s, subject in enumerate(FAKE_MIMIC_SUBJECTS):
        for k in range(2 if s < 3 else 1):
            study = str(50000000 + 1000 * s + k)
            raw = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(FINDINGS), p=[0.3, 0.3, 0.2, 0.2])
            label_rows.append(
                {"subject_id": subject, "study_id": study, **dict(zip(FINDINGS, raw, strict=True))}
            )
            for _ in range((2, 1, 3)[(s + k) % 3]):
                dicom_id = f"{rng.integers(16**8):08x}-{rng.integers(16**8):08x}-{image_number:04d}"
                width, height = FAKE_MIMIC_SIZES[image_number % 3]
                view = FAKE_MIMIC_VIEWS[image_number % len(FAKE_MIMIC_VIEWS)]
                image_number += 1
                meta_rows.append(
                    {
                        "dicom_id": dicom_id,
                        "subject_id": subject,
                        "study_id": study,
                        "ViewPosition": view,
                        "Rows": height,
                        "Columns": width,
                        "StudyDate": "21800101",
                    }
                )
                split_rows.append(
                    {
                        "dicom_id": dicom_id,
                        "study_id": study,
                        "subject_id": subject,
                        "split": FAKE_MIMIC_SPLIT[s],
                    }
                )
                folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
                folder.mkdir(parents=True, exist_ok=True)
                smooth = np.add.outer(np.linspace(30, 200, height), np.linspace(0, 40, width))
                pixels = np.clip(smooth + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{dicom_id}.jpg", quality=90)
    labels = pd.DataFrame(label_rows)
    # plant the values the policy tests look for in the first study
    labels.loc[0, ["Atelectasis", "Cardiomegaly", "Edema"]] = ["1.0", "-1.0", ""]
    metadata, split = pd.DataFrame(meta_rows), pd.DataFrame(split_rows)
    metadata.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False, compression="gzip")
    labels.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False, compression="gzip")
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False, compression="gzip")
    return FakeMimic(root, metadata, labels, split)


@pytest.fixture(scope="session")
def fake_mimic(tmp_path_factory) -> FakeMimic:
    """A tiny MIMIC-CXR-JPG tree shared by the session; do not modify it (use ``fake_mimic_copy``)."""
    return write_fake_mimic(tmp_path_factory.mktemp("fake_mimic"))


@pytest.fixture
def fake_mimic_copy(fake_mimic, tmp_path) -> FakeMimic:
    """A private copy of ``fake_mimic`` that a test may change."""
    root = tmp_path / "mimic"
    shutil.copytree(fake_mimic.root, root)
    return FakeMimic(root, fake_mimic.metadata.copy(), fake_mimic.labels.copy(), fake_mimic.split.copy())


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, then the caller's setting: on a small or shared CPU,
    threads waiting on each other cost far more than they gain on tiny inputs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Preset:
    """The ``smoke`` preset run by the pipeline into ``run/``, ``figures/`` and ``phantom/`` of one
    session folder; returns the resolved preset. Shared by the session: copy it to change it."""
    root = tmp_path_factory.mktemp("smoke")
    return run_pipeline(
        "smoke",
        run_dir=str(root / "run"),
        figures_dir=str(root / "figures"),
        data_root=str(root / "phantom"),
        progress_bar=False,
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Say in one line that the browser tests were skipped for want of Chromium, and how to install it."""
    skipped = [
        report.longrepr[2]
        for report in terminalreporter.stats.get("skipped", [])
        if "browser" in report.keywords and isinstance(report.longrepr, tuple)
    ]
    no_chromium = [reason for reason in skipped if "no Chromium at" in reason]
    if no_chromium:
        where = no_chromium[0].split("no Chromium at ", 1)[1].split(" (", 1)[0]
        terminalreporter.write_line(
            f"{len(no_chromium)} browser tests skipped: no Chromium at {where}; install it "
            "(Debian: apt-get install chromium) or set CXR_CHROMIUM to its path"
        )
