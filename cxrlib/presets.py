"""Presets: named settings of a study; ``presets/defaults.yaml`` holds every setting with its default and
meaning, a preset file sets what differs, :func:`resolve` applies overrides (``preset.train.epochs``)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from . import paths

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULTS = PRESET_DIR / "defaults.yaml"
FREE_FORM = {"phantom_options", "csv_options", "options", "per_resolution", "arms"}  # dicts of any keys
DATA_SOURCES = ("phantom", "mimic", "chexpert", "nih", "kermany", "csv")
BASELINE_ARM = "baseline"


class Preset(SimpleNamespace):
    """A resolved preset: its settings, and the folders of the artifacts contract."""

    run_path = property(lambda self: Path(self.run_dir or paths.RUNS_DIR / self.name))
    figures_path = property(lambda self: Path(self.figures_dir or paths.FIGURES_DIR / self.name))
    cache_path = property(
        lambda self: _in_project(self.cache.dir) if self.cache.dir else self.run_path / "cache"
    )

    @property
    def data_path(self) -> Path:
        if self.data.root:
            return _in_project(self.data.root)
        if self.data.source == "phantom":
            return paths.DATA_DIR / f"phantom-{self.name}"
        raise ValueError(
            f"preset {self.name!r}: data source {self.data.source!r} needs a data root "
            f"(--data-root DIR, or data.root in the preset)"
        )

    index_path = property(lambda self: self.run_path / paths.INDEX)
    folds_path = property(lambda self: self.run_path / paths.FOLDS)
    tables_path = property(lambda self: paths.tables_dir(self.run_path))
    fold_count = property(lambda self: 1 if self.folds.split == "official" else self.folds.k)

    def trained_folds(self) -> list[int]:
        """The folds this preset trains and evaluates."""
        train = self.folds.train
        return list(range(self.fold_count)) if train == "all" else [int(f) for f in train]

    def train_options(self, resolution: int) -> dict[str, Any]:
        """Flags for ``cxrlib.train`` at one resolution (shared options, then per-resolution ones)."""
        options = {"epochs": self.train.epochs, "weights": self.train.weights, **self.train.options}
        if not self.train.cudnn_benchmark:
            options["no_cudnn_benchmark"] = True
        return options | self.train.per_resolution.get(int(resolution), {})

    def to_dict(self) -> dict[str, Any]:
        return {k: vars(v).copy() if isinstance(v, SimpleNamespace) else v for k, v in vars(self).items()}


def _in_project(folder: str) -> Path:
    """A folder written in a preset file is relative to the project; overrides are made absolute."""
    return Path(folder) if Path(folder).is_absolute() else paths.PROJECT_ROOT / folder


def available_presets() -> list[str]:
    """Names of the presets shipped in ``cxrlib/presets/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p != DEFAULTS)


def _preset_file(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise FileNotFoundError(f"preset file not found: {candidate}")
        return candidate
    if str(name_or_path) not in available_presets():
        raise ValueError(
            f"unknown preset {str(name_or_path)!r}; choose one of {available_presets()} or a YAML file"
        )
    return PRESET_DIR / f"{name_or_path}.yaml"


def _merge(defaults: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` updated by ``values``, section by section; an unknown key is refused by name."""
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{where}unknown setting(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **values}
    for key, default in defaults.items():
        if isinstance(default, dict) and key not in FREE_FORM:
            merged[key] = SimpleNamespace(**_merge(default, values.get(key) or {}, f"{where}{key}: "))
    return merged


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Read a shipped preset by name, or a YAML file by path, and validate it."""
    path = _preset_file(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    preset = Preset(**_merge(yaml.safe_load(DEFAULTS.read_text()), raw, f"{path.name}: "))
    preset.name = preset.name or path.stem
    preset.train.per_resolution = {int(r): dict(v) for r, v in preset.train.per_resolution.items()}
    preset.field_sweep.arms = {str(arm): dict(v or {}) for arm, v in preset.field_sweep.arms.items()}
    validate(preset)
    return preset


def validate(preset: Preset) -> None:
    """Raise ``ValueError`` naming the setting on anything that would fail later."""
    where, folds, nodes = f"preset {preset.name!r}", preset.folds, preset.train.nnodes
    if not preset.resolutions or len(set(preset.resolutions)) != len(preset.resolutions):
        raise ValueError(f"{where}: resolutions {preset.resolutions} are empty or repeat a value")
    for resolution in preset.resolutions:
        check_resolution(resolution, where)
    source, device, processes = preset.data.source, str(preset.analysis.device), preset.train.cpu_processes
    for failed, message in (
        (source not in DATA_SOURCES, f"data.source {source!r} is not one of {DATA_SOURCES}"),
        (not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device), f"analysis.device {device!r} is not auto, cpu, "
         "cuda or cuda:N"),
        (processes < 1, f"train.cpu_processes must be at least 1, got {processes}"),
        (folds.k < 2, f"folds.k must be at least 2, got {folds.k}"),
        (folds.split not in ("patients", "official"), f"folds.split {folds.split!r} is not patients or "
         "official"),
        (nodes != 1, f"train.nnodes {nodes}: the notebooks and the pipeline train on one node; for {nodes} "
         f"nodes run on each: torchrun --nnodes={nodes} --node-rank=<0..{nodes - 1}> --nproc-per-node=<GPUs> "
         "--rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 --rdzv-id=<job> -m cxrlib.train ... "
         "(docs/training.md)"),
    ):  # fmt: skip
        if failed:
            raise ValueError(f"{where}: {message}")
    for fold in preset.trained_folds():
        if not 0 <= fold < preset.fold_count:
            split = f"folds.k = {folds.k} (folds are 0 .. {folds.k - 1})"
            split = "folds.split = official (one fold, 0)" if folds.split == "official" else split
            raise ValueError(f"{where}: fold {fold} does not exist with {split}")
    _validate_arms(preset.field_sweep.arms, f"{where}: field_sweep.arms")


def _validate_arms(arms: dict[str, dict[str, Any]], where: str) -> None:
    """``baseline`` first and plain, names usable as folder names, ``continue_from`` an earlier arm."""
    names = list(arms)
    if not names or names[0] != BASELINE_ARM or arms[BASELINE_ARM]:
        raise ValueError(f"{where}: the first arm must be {BASELINE_ARM!r}, with no settings")
    for position, (arm, settings) in enumerate(arms.items()):
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", arm):
            raise ValueError(f"{where}: arm name {arm!r}: use lower-case letters, digits and '-'")
        source = settings.get("continue_from")
        if source is not None and source not in names[:position]:
            raise ValueError(f"{where}: {arm}.continue_from {source!r} is not an earlier arm")


def check_resolution(resolution: int, where: str = "resolution") -> None:
    """Resolutions are multiples of 32 and at least 32 (DenseNet121 downsamples by 32)."""
    if int(resolution) != resolution or resolution < 32 or int(resolution) % 32:
        raise ValueError(
            f"{where}: resolution {resolution} must be a multiple of 32 and at least 32 "
            f"(DenseNet121 reduces the image 32-fold)"
        )


def resolve(preset: str | os.PathLike | Preset = "demo", **overrides: Any) -> Preset:
    """Load a preset and apply overrides (None: the preset's value); device and fold_split are
    ``analysis.device`` and ``folds.split``."""
    p = copy.deepcopy(preset) if isinstance(preset, Preset) else load_preset(preset)
    where = {"data_root": (p.data, "root"), "resolutions": (p, "resolutions"), "folds": (p.folds, "train"),
             "gpus": (p.train, "gpus"), "run_dir": (p, "run_dir"), "figures_dir": (p, "figures_dir"),
             "device": (p.analysis, "device"), "fold_split": (p.folds, "split")}  # fmt: skip
    for key, value in overrides.items():
        if key not in where:
            raise TypeError(f"resolve() got an unknown override {key!r}; overrides are {list(where)}")
        if key in ("data_root", "run_dir", "figures_dir") and value is not None:
            value = str(Path(value).resolve())  # folders made absolute
        elif key in ("resolutions", "folds") and value not in (None, "all"):
            value = [int(v) for v in value]
        if value is not None:
            setattr(*where[key], value)
    validate(p)
    return p
