"""Presets: named, complete settings of a study (data, folds, resolutions, training, analysis).

A preset is data, never a code branch: one YAML file in ``cxrlib/presets/`` (or any
YAML path given instead of a name). Every notebook and the pipeline resolve their
settings through :func:`resolve`, which applies command-line or papermill overrides
and fills in the folders of the artifacts contract.

============= ==============================================================
``smoke``     tiny phantom, two resolutions: the whole pipeline in a minute or two (tests, CI)
``demo``      phantom, four resolutions sized for a 2-core laptop CPU (``make demo``)
``phantom-gpu`` phantom at the paper's 256/512/1024/2048 px on one GPU
``kermany``   Kermany's pediatric chest X-rays as downloaded, in ``data/chest_xray`` (Pneumonia, No Finding)
``mimic``     the paper's study on MIMIC-CXR-JPG: 5 folds, Table 1 batches and learning rates, all GPUs
``nih``       the same on NIH ChestX-ray14 (its own 14 findings and No Finding) at 256/512/1024 px
============= ==============================================================
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import paths

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DATA_SOURCES = ("phantom", "mimic", "chexpert", "nih", "kermany", "csv")
FOLD_SPLITS = ("patients", "official")
MIN_RESOLUTION = 32


@dataclass
class DataConfig:
    """Where the images and labels come from and how labels are read."""

    source: str = "phantom"  # phantom | mimic | chexpert | nih | kermany | csv
    root: str | None = (
        None  # data folder; for the phantom, where it is written (default data/phantom-<preset>)
    )
    subjects: int = 60  # phantom only: number of patients
    seed: int = 0  # phantom only
    max_size: int | None = 512  # phantom only: cap on the long side of the written images
    phantom_options: dict[str, Any] = field(default_factory=dict)  # extra make_phantom() options
    csv: str | None = None  # csv/chexpert: the label file (relative to root)
    csv_options: dict[str, Any] = field(
        default_factory=dict
    )  # csv: column names, label_map, ...; nih: subset
    views: str = "all"  # all | frontal | comma-separated ViewPosition values
    policy: str = "u-zeros"  # u-zeros (paper) | u-ones | u-ignore
    blank: str = "zero"  # zero (paper) | unknown
    findings: list[str] | None = None  # a subset of the data's label set to train and report (None: all)


@dataclass
class FoldConfig:
    """Patient-level cross-validation, or the data's official test split as the one test fold."""

    k: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    train: list[int] | str = "all"  # which folds to train and evaluate: "all" or a list
    split: str = "patients"  # patients (k folds) | official (one fold: the index's split column's test)

    @property
    def count(self) -> int:
        """The number of folds: k, or 1 with the official split."""
        return 1 if self.split == "official" else self.k


@dataclass
class CacheConfig:
    """The multi-resolution image cache."""

    dir: str | None = None  # default <run_dir>/cache
    mode: str = "squash"  # squash (paper) | pad
    format: str = "png"  # png | jpg
    workers: int | None = None  # default: all CPU cores


@dataclass
class TrainConfig:
    """Training settings; anything not named here is passed to ``cxrlib.train`` as a flag."""

    epochs: int = 50
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    gpus: int | str = "all"  # GPUs per node: "all" or a number
    cpu_processes: int = 1  # without a CUDA GPU: training processes (gloo), each with its own cores
    nnodes: int = 1  # the notebooks and the pipeline train on one node (more: torchrun on each node)
    cudnn_benchmark: bool = True  # cuDNN autotuning in training and 08_throughput (off: no start-up cost)
    options: dict[str, Any] = field(default_factory=dict)  # more cxrlib.train flags, e.g. batch_size
    per_resolution: dict[int, dict[str, Any]] = field(default_factory=dict)  # flags for one resolution


@dataclass
class AnalysisConfig:
    """Receptive fields, Grad-CAM, ensemble and throughput settings."""

    findings: list[str] | None = None  # findings reported in figures (None: all 14)
    erf_images: int = 16
    erf_exact: bool = False
    gradcam_findings: list[str] = field(default_factory=lambda: ["Cardiomegaly", "Pneumothorax"])
    bootstrap: int = 1000
    throughput_steps: int = 10
    throughput_resolutions: list[int] | None = None  # None: the preset's resolutions
    device: str = "auto"  # ERF, Grad-CAM and prediction in the notebooks: auto (GPU if visible) | cpu | cuda


BASELINE_ARM = "baseline"
ARM_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass
class FieldSweepConfig:
    """What makes coarse findings fail at a higher resolution (notebook 10_field_sweep).

    ``arms``: name -> settings, each trained at ``resolution`` on the preset's images and fold with
    the preset's recipe changed by its settings: ``cxrlib.train`` options (``global_context: true``,
    ``epochs: 4``, ``tiles: 2``), ``findings`` (train on this subset of the label set) and
    ``continue_from`` (an earlier arm whose last checkpoint this one continues, to its own
    ``epochs``). ``baseline`` (no settings) is the plain model every arm is tested against;
    ``reuse``: a run folder (``runs/<preset>``) whose model at ``resolution`` is the baseline when
    it was trained on the same index, folds and seed (trained here otherwise).
    """

    resolution: int | None = None  # None: the preset's largest resolution
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {BASELINE_ARM: {}})
    reuse: str | None = None
    compare: str | None = None  # a run folder whose resolution sweep the figure shows beside
    coarse: list[str] = field(default_factory=lambda: ["Cardiomegaly", "Enlarged Cardiomediastinum", "Edema"])
    fine: list[str] = field(default_factory=lambda: ["Pneumothorax", "Lung Lesion", "Support Devices"])


@dataclass
class Preset:
    """A resolved preset: settings plus the folders of the artifacts contract."""

    name: str
    description: str = ""
    resolutions: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    field_sweep: FieldSweepConfig = field(default_factory=FieldSweepConfig)
    steps: list[str] | None = None  # the notebooks this preset runs (None: 00_data ... 09)
    run_dir: str | None = None
    figures_dir: str | None = None

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else paths.run_dir(self.name)

    @property
    def figures_path(self) -> Path:
        return Path(self.figures_dir) if self.figures_dir else paths.figures_dir(self.name)

    @property
    def cache_path(self) -> Path:
        if not self.cache.dir:
            return self.run_path / "cache"
        folder = Path(self.cache.dir)  # a folder written in a preset file is relative to the project
        return folder if folder.is_absolute() else paths.PROJECT_ROOT / folder

    @property
    def data_path(self) -> Path:
        if self.data.root:
            root = Path(self.data.root)
            # A root written in a preset file is relative to the project; overrides are made absolute.
            return root if root.is_absolute() else paths.PROJECT_ROOT / root
        if self.data.source == "phantom":
            return paths.DATA_DIR / f"phantom-{self.name}"
        raise ValueError(
            f"preset {self.name!r}: data source {self.data.source!r} needs a data root "
            f"(--data-root DIR, or data.root in the preset)"
        )

    @property
    def index_path(self) -> Path:
        return self.run_path / "index.csv"

    @property
    def folds_path(self) -> Path:
        return self.run_path / "folds.csv"

    @property
    def tables_path(self) -> Path:
        return paths.tables_dir(self.run_path)

    def trained_folds(self) -> list[int]:
        """The folds this preset trains and evaluates."""
        if self.folds.train == "all":
            return list(range(self.folds.count))
        return [int(f) for f in self.folds.train]

    def train_options(self, resolution: int) -> dict[str, Any]:
        """Flags for ``cxrlib.train`` at one resolution (shared options, then per-resolution ones)."""
        options = {"epochs": self.train.epochs, "weights": self.train.weights, **self.train.options}
        if not self.train.cudnn_benchmark:
            options["no_cudnn_benchmark"] = True
        options.update(self.train.per_resolution.get(int(resolution), {}))
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    """Names of the presets shipped in ``cxrlib/presets/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_file(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise FileNotFoundError(f"preset file not found: {candidate}")
        return candidate
    shipped = PRESET_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ValueError(
            f"unknown preset {str(name_or_path)!r}; choose one of {available_presets()} "
            f"or give the path of a YAML file"
        )
    return shipped


def _build(cls, values: dict[str, Any] | None, where: str):
    """Instantiate a config dataclass, refusing unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Read a shipped preset by name, or a YAML file by path, and validate it."""
    path = _preset_file(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path.name)
    sections = {
        "data": DataConfig,
        "folds": FoldConfig,
        "cache": CacheConfig,
        "train": TrainConfig,
        "analysis": AnalysisConfig,
        "field_sweep": FieldSweepConfig,
    }
    top = {k: v for k, v in raw.items() if k not in sections}
    top.setdefault("name", path.stem)
    preset = _build(Preset, top, where)
    for key, cls in sections.items():
        setattr(preset, key, _build(cls, raw.get(key), f"{where}: {key}"))
    preset.train.per_resolution = {int(r): dict(v) for r, v in preset.train.per_resolution.items()}
    preset.field_sweep.arms = {str(arm): dict(v or {}) for arm, v in preset.field_sweep.arms.items()}
    validate(preset)
    return preset


def _check_resolutions(resolutions: list[int], where: str) -> None:
    if not resolutions:
        raise ValueError(f"{where}: resolutions is empty")
    for resolution in resolutions:
        check_resolution(resolution, where)
    if len(set(resolutions)) != len(resolutions):
        raise ValueError(f"{where}: resolutions {resolutions} repeat a value")


def validate(preset: Preset) -> None:
    """Raise ``ValueError`` naming the setting on anything that would fail later."""
    where = f"preset {preset.name!r}"
    _check_resolutions(preset.resolutions, where)
    if preset.data.source not in DATA_SOURCES:
        raise ValueError(f"{where}: data.source {preset.data.source!r} is not one of {DATA_SOURCES}")
    device = str(preset.analysis.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"{where}: analysis.device {device!r} is not auto, cpu, cuda or cuda:N")
    validate_arms(preset.field_sweep, f"{where}: field_sweep.arms")
    nodes = preset.train.nnodes
    if nodes != 1:
        raise ValueError(
            f"{where}: train.nnodes {nodes}: the notebooks and the pipeline train on one node; for "
            f"{nodes} nodes run on each: torchrun --nnodes={nodes} --node-rank=<0..{nodes - 1}> "
            "--nproc-per-node=<GPUs> --rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 "
            "--rdzv-id=<job> -m cxrlib.train ... (docs/training.md)"
        )
    if preset.train.cpu_processes < 1:
        raise ValueError(f"{where}: train.cpu_processes must be at least 1, got {preset.train.cpu_processes}")
    if preset.folds.k < 2:
        raise ValueError(f"{where}: folds.k must be at least 2, got {preset.folds.k}")
    if preset.folds.split not in FOLD_SPLITS:
        raise ValueError(f"{where}: folds.split {preset.folds.split!r} is not one of {FOLD_SPLITS}")
    if preset.folds.train != "all":
        count = preset.folds.count
        for fold in preset.folds.train:
            if not 0 <= int(fold) < count:
                folds = f"folds.k = {count} (folds are 0 .. {count - 1})"
                if preset.folds.split == "official":
                    folds = "folds.split = official (one fold, 0)"
                raise ValueError(f"{where}: fold {fold} does not exist with {folds}")


def validate_arms(sweep: FieldSweepConfig, where: str) -> None:
    """The arms of notebook 10: ``baseline`` first and plain, names usable as folder names and
    ``continue_from`` naming an earlier arm (other settings are checked by the trainer's launch)."""
    arms = list(sweep.arms)
    if not arms or arms[0] != BASELINE_ARM or sweep.arms[BASELINE_ARM]:
        raise ValueError(f"{where}: the first arm must be {BASELINE_ARM!r}, with no settings")
    for position, (arm, settings) in enumerate(sweep.arms.items()):
        if not ARM_NAME.match(arm):
            raise ValueError(f"{where}: arm name {arm!r}: use lower-case letters, digits and '-'")
        source = settings.get("continue_from")
        if source is not None and source not in arms[:position]:
            raise ValueError(f"{where}: {arm}.continue_from {source!r} is not an earlier arm")


def check_resolution(resolution: int, where: str = "resolution") -> int:
    """Resolutions are multiples of 32 and at least 32 (DenseNet121 downsamples by 32)."""
    if int(resolution) != resolution or resolution < MIN_RESOLUTION or int(resolution) % 32:
        raise ValueError(
            f"{where}: resolution {resolution} must be a multiple of 32 and at least "
            f"{MIN_RESOLUTION} (DenseNet121 reduces the image 32-fold)"
        )
    return int(resolution)


def resolve(
    preset: str | os.PathLike | Preset = "demo",
    *,
    data_root: str | None = None,
    resolutions: list[int] | None = None,
    folds: list[int] | str | None = None,
    gpus: int | str | None = None,
    run_dir: str | None = None,
    figures_dir: str | None = None,
    device: str | None = None,
    fold_split: str | None = None,
) -> Preset:
    """Load a preset and apply overrides (``None`` keeps the preset's value); ``device`` is the
    analysis device (``analysis.device``), ``fold_split`` the folds' ``split``."""
    resolved = copy.deepcopy(preset) if isinstance(preset, Preset) else load_preset(preset)
    if data_root is not None:
        resolved.data.root = str(Path(data_root).resolve())
    if resolutions is not None:
        resolved.resolutions = [int(r) for r in resolutions]
    if folds is not None:
        resolved.folds.train = folds if folds == "all" else [int(f) for f in folds]
    if gpus is not None:
        resolved.train.gpus = gpus
    if run_dir is not None:
        resolved.run_dir = str(Path(run_dir).resolve())
    if figures_dir is not None:
        resolved.figures_dir = str(Path(figures_dir).resolve())
    if device is not None:
        resolved.analysis.device = str(device)
    if fold_split is not None:
        resolved.folds.split = str(fold_split)
    validate(resolved)
    return resolved
