"""The multi-resolution image cache (square 8-bit images) and the ``Dataset`` that reads it or resizes on the
fly, both through :func:`square_images`: identical pixels. Layout, resuming, bad sources: docs/data_files.md::

    python -m cxrlib.cache --index index.csv --resolutions 256 512 1024 2048 --out CACHE [--workers 8]
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from .fileio import atomic_write, write_csv_atomic
from .index import index_findings, read_index
from .labels import targets_and_mask

RESIZE_MODES = ("squash", "pad")
INTERPOLATION = "lanczos"
CACHE_FORMATS = ("png", "jpg")
MANIFEST_NAME = "manifest.csv"
ERRORS_NAME = "errors.csv"
CLEANED_INDEX_NAME = "index.cleaned.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "dicom_id", "resolution", "path", "bytes",  # the cached file (path relative to the cache root)
    "source_path", "source_width", "source_height", "source_bytes", "source_mtime_ns",
    "mode", "format", "interpolation", "reduced_decode", "decode_scale",  # decode_scale: 1, 2, 4 or 8
)  # fmt: skip
ERROR_COLUMNS: tuple[str, ...] = ("dicom_id", "source_path", "error")
MANIFEST_SAVE_SECONDS = 30.0
# zlib level 1: 3-5x faster to write than Pillow's default 6 (2048 px: 0.16 s vs 0.43 s), files
# 12-17% larger, read as fast; the cache is written once per image and resolution.
PNG_COMPRESS_LEVEL = 1
_MARKER = re.compile(rb"\xff([^\x00\xff])")  # 0xFF 0x00 is a stuffed data byte, 0xFF 0xFF padding
_AFTER_SCAN = frozenset((0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))  # tables, next scan
_FRAMES = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


def to_grayscale_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit ``L``: integers over the smallest bit depth (>= 8) holding the maximum (a
    12-bit radiograph in a 16-bit PNG keeps its contrast), floats in [0, 1] times 255, colour through RGB."""
    image.load()
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max(initial=0.0))
        bits = 0 if image.mode == "F" and top <= 1.0 else max(8, int(math.ceil(top)).bit_length())
        scale = float(2**bits - 1) if bits else 1.0
        return Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("1", "RGB", "YCbCr"):
        return image.convert("L")
    return image.convert("RGB").convert("L")  # CMYK, palette, alpha: Pillow converts every mode to RGB


def jpeg_damage(data: bytes) -> str:
    """Where a JPEG's markers break the format (a marker inside compressed data, which libjpeg decodes past
    with a warning Pillow silences; restarts out of order, stray bytes, data after the end), or ``""``."""
    pos, scan, restart, left = 2, False, 0, None  # left: components a sequential frame has not scanned
    while match := _MARKER.search(data, pos):
        code, start = match[1][0], match.start()
        if not scan and data[pos:start].strip(b"\xff"):
            return f"{start - pos} stray bytes before marker 0x{code:02X} at byte {start}"
        pos = match.end()
        if scan and 0xD0 <= code <= 0xD7:
            if code != 0xD0 + restart % 8:
                return f"restart marker 0x{code:02X} out of order at byte {start}"
            restart += 1
            continue
        if code == 0xD9:
            rest = len(data[pos:].strip(b"\x00\xff"))
            return f"{rest} bytes after the end-of-image marker at byte {start}" if rest else ""
        if scan and (code not in _AFTER_SCAN or left == 0):
            return f"marker 0x{code:02X} inside the compressed data at byte {start}"
        header = data[pos : pos + 8].ljust(8, b"\0")  # length, then the frame's or scan's fields
        if code in _FRAMES:
            left = None if code in _PROGRESSIVE else header[7]
        elif code == 0xDA and left is not None:
            left -= header[2]
        scan, restart = code == 0xDA, 0
        pos += int.from_bytes(header[:2], "big")
    return "no end-of-image marker"


def square_images(
    source: str | os.PathLike | bytes, resolutions, mode: str = "squash", reduced_decode: bool = True
) -> tuple[dict[int, Image.Image], tuple[int, int], dict[int, int]]:
    """The 8-bit ``R`` px squares of a source (path or bytes), its size, and the DCT scale of each: a JPEG is
    decoded once per scale (``reduced_decode``), gray, squash or pad, Lanczos; a corrupt JPEG raises."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    decoded, images, scales, source_size = {}, {}, {}, (0, 0)
    for resolution in sorted({int(r) for r in resolutions}, reverse=True):
        with Image.open(io.BytesIO(data)) as image:
            source_size = image.size
            if reduced_decode and image.format == "JPEG":  # the smallest size giving a full-quality square
                longest = max(image.size) if mode == "pad" else 0  # pad: the long side is the square's
                request = [math.ceil(resolution * s / longest) if longest else resolution for s in image.size]
                image.draft("L", tuple(max(1, side) for side in request))
            if image.size not in decoded:
                decoded[image.size] = to_grayscale_8bit(image)
            gray = square = decoded[image.size]
        if mode == "pad":  # the long side becomes the square's side
            square = Image.new("L", (max(gray.size),) * 2, 0)
            square.paste(gray, ((square.width - gray.width) // 2, (square.height - gray.height) // 2))
        images[resolution] = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
        scales[resolution] = max(1, round(source_size[0] / gray.width))
    if data[:2] == b"\xff\xd8" and (damage := jpeg_damage(data)):
        raise ValueError(f"corrupt JPEG data: {damage}")
    return images, source_size, scales


def cached_image_path(cache_dir: str | os.PathLike, resolution: int, dicom_id: str, fmt: str = "png") -> Path:
    """Where the ``resolution`` px copy of image ``dicom_id`` lives in the cache."""
    dicom_id = str(dicom_id)
    return Path(cache_dir) / str(int(resolution)) / dicom_id[:2] / f"{dicom_id}.{fmt}"


def read_manifest(cache_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``CACHE/manifest.csv``; raises ``FileNotFoundError`` when the cache has none."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a cache built (yet) by python -m cxrlib.cache")
    text = ("dicom_id", "path", "source_path", "mode", "format", "interpolation")
    manifest = pd.read_csv(path, dtype=dict.fromkeys(text, str), keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; rebuild the cache")
    manifest["reduced_decode"] = manifest["reduced_decode"].astype(str).str.lower() == "true"
    return manifest


def check_cache(
    index: pd.DataFrame, cache_dir: str | os.PathLike, resolution: int, fmt: str | None = None, mode=None
) -> list[str]:
    """The dicom_ids of ``index`` with no file of the recorded size at ``resolution`` (``fmt``, ``mode``)."""
    manifest = read_manifest(cache_dir)
    rows = manifest[manifest["resolution"] == int(resolution)]
    rows = rows[(rows["format"] == (fmt or rows["format"])) & (rows["mode"] == (mode or rows["mode"]))]
    size_of = dict(zip(rows["dicom_id"], zip(rows["path"], rows["bytes"], strict=True), strict=True))
    ids = index["dicom_id"].astype(str)
    return [d for d in ids if d not in size_of or _size(Path(cache_dir) / size_of[d][0]) != size_of[d][1]]


def _stat(path: str | os.PathLike) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _size(path: str | os.PathLike) -> int:
    return getattr(_stat(path), "st_size", -1)


class CacheBuildError(RuntimeError):
    """Some sources could not be read; every other image was cached. ``report`` has the details."""

    def __init__(self, report: CacheReport):
        self.report, errors = report, report.errors
        shown = [f"{row.source_path} ({row.error})" for row in errors.head(5).itertuples()]
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(
            f"{len(errors)} source image(s) could not be read: {'; '.join(shown)}{more}; "
            f"all are listed in {report.cache_dir / ERRORS_NAME}. Replace or fix them and run again, "
            f"or pass --drop-bad (drop_bad=True) to write {CLEANED_INDEX_NAME} without them"
        )


@dataclass
class CacheReport:
    """What a :func:`build_cache` run did (``dropped``: the ids left out of ``index.cleaned.csv``)."""

    cache_dir: Path
    resolutions: tuple[int, ...]
    images: int
    written: int = 0
    skipped: int = 0
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(ERROR_COLUMNS)))
    dropped: list[str] = field(default_factory=list)
    cleaned_index: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:  # every source image was read
        return self.errors.empty

    def summary(self) -> str:
        done = f"{self.written} files, {self.skipped} already cached, {len(self.errors)} unreadable"
        text = f"{self.cache_dir}: {self.images} images at {list(self.resolutions)} px: wrote {done}"
        dropped = f"; dropped {len(self.dropped)}, cleaned index: {self.cleaned_index}"
        return f"{text} ({self.seconds:.1f} s){dropped if self.cleaned_index else ''}"


def _cache_image(task: tuple) -> tuple[str, str, list[dict] | None, str]:
    # decode one source, write it at each resolution; (dicom_id, source, manifest rows, error)
    dicom_id, source, resolutions, cache_dir, settings, jpeg_quality = task
    try:
        stat = os.stat(source)
        images, source_size, scales = square_images(
            source, resolutions, settings["mode"], settings["reduced_decode"]
        )
    except Exception as error:  # a bad source is reported, not fatal; writing errors below are
        return dicom_id, source, None, f"{type(error).__name__}: {error}"
    rows = []
    for resolution, image in images.items():
        target = cached_image_path(cache_dir, resolution, dicom_id, settings["format"])
        # no fsync per file (about 4 ms each): the rename keeps a crash from leaving a partial file
        # under the final name, and the manifest's byte count catches one lost in a power cut
        with atomic_write(target, fsync=False) as handle:
            if settings["format"] == "png":
                image.save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            else:
                image.save(handle, format="JPEG", quality=jpeg_quality)
        cached = (dicom_id, resolution, target.relative_to(cache_dir).as_posix(), target.stat().st_size)
        values = (*cached, source, *source_size, stat.st_size, stat.st_mtime_ns, *settings.values())
        rows.append(dict(zip(MANIFEST_COLUMNS, (*values, scales[resolution]), strict=True)))
    return dicom_id, source, rows, ""


def build_cache(
    index: pd.DataFrame,
    out_dir: str | os.PathLike,
    resolutions: list[int] | tuple[int, ...],
    workers: int | None = None,
    mode: str = "squash",
    fmt: str = "png",
    jpeg_quality: int = 95,
    reduced_decode: bool = True,
    drop_bad: bool = False,
    progress: bool = True,
) -> CacheReport:
    """Write or resume each image of ``index`` at each resolution; unreadable ones raise (or are dropped)."""
    started = time.monotonic()
    for name, value, choices in (("resize mode", mode, RESIZE_MODES), ("cache format", fmt, CACHE_FORMATS)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    resolutions = tuple(sorted({int(r) for r in resolutions}))
    if not resolutions or resolutions[0] < 1:
        raise ValueError(f"resolutions must be positive integers, got {list(resolutions)}")
    ids = index["dicom_id"].astype(str)
    unsafe = ids.str.contains(r"[/\\]") | ids.str.startswith(".") | (ids.str.len() == 0)
    if unsafe.any():
        raise ValueError(f"index: dicom_id {ids[unsafe].iloc[0]!r} cannot name a cache file")
    cache_dir = Path(out_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(cache_dir).to_dict("records") if (cache_dir / MANIFEST_NAME).is_file() else []
    rows = {(row["dicom_id"], int(row["resolution"])): row for row in old}
    # in MANIFEST_COLUMNS' order
    settings = dict(mode=mode, format=fmt, interpolation=INTERPOLATION, reduced_decode=bool(reduced_decode))
    tasks, skipped = [], 0
    sources = tqdm(index["path"].astype(str), desc="checking cache", leave=False, disable=not progress)
    for dicom_id, source in zip(ids, sources, strict=True):
        stat = _stat(source) if any((dicom_id, r) in rows for r in resolutions) else None
        fresh = [_is_current(rows.get((dicom_id, r)), source, stat, settings, cache_dir) for r in resolutions]
        todo = tuple(r for r, ok in zip(resolutions, fresh, strict=True) if not ok)
        skipped += sum(fresh)
        if todo:
            tasks.append((dicom_id, source, todo, cache_dir, settings, int(jpeg_quality)))
    report = CacheReport(cache_dir, resolutions, len(index), skipped=skipped)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    report.written, errors = _write_pending(tasks, workers, rows, resolutions, cache_dir, progress)
    report.errors = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    if drop_bad:
        report.dropped = report.errors["dicom_id"].tolist()
        cleaned = index[~ids.isin(report.dropped)]
        report.cleaned_index = write_csv_atomic(cleaned, cache_dir / CLEANED_INDEX_NAME, lineterminator="\n")
    report.seconds = time.monotonic() - started
    if not report.ok and not drop_bad:
        raise CacheBuildError(report)
    return report


def _is_current(row: dict | None, source: str, stat, settings: dict, root: Path) -> bool:
    return (
        row is not None
        and stat is not None
        and all(row[key] == value for key, value in settings.items())
        and row["source_path"] == source
        and int(row["source_bytes"]) == stat.st_size
        and int(row["source_mtime_ns"]) == stat.st_mtime_ns
        and _size(root / row["path"]) == int(row["bytes"])
    )


def _write_pending(
    tasks: list, workers: int, rows: dict, resolutions: tuple[int, ...], cache_dir: Path, progress: bool
) -> tuple[int, list[dict]]:
    written, errors, last_save = 0, [], time.monotonic()
    bar = dict(total=len(tasks), desc=f"caching {list(resolutions)} px", unit="img", disable=not progress)
    try:
        for dicom_id, source, new_rows, error in tqdm(_run(tasks, workers), **bar):
            if new_rows is None:
                errors.append({"dicom_id": dicom_id, "source_path": source, "error": error})
                for resolution in resolutions:  # a source that went bad is no longer cached
                    rows.pop((dicom_id, resolution), None)
            else:
                rows.update({(dicom_id, row["resolution"]): row for row in new_rows})
                written += len(new_rows)
            if time.monotonic() - last_save > MANIFEST_SAVE_SECONDS:
                _write_manifest(rows, cache_dir)
                last_save = time.monotonic()
    finally:
        _write_manifest(rows, cache_dir)
        write_csv_atomic(pd.DataFrame(errors, columns=list(ERROR_COLUMNS)), cache_dir / ERRORS_NAME)
    return written, errors


def _write_manifest(rows: dict, cache_dir: Path) -> None:
    frame = pd.DataFrame(list(rows.values()), columns=list(MANIFEST_COLUMNS))
    frame = frame.sort_values(["resolution", "dicom_id"], kind="stable")
    write_csv_atomic(frame, cache_dir / MANIFEST_NAME, lineterminator="\n")


def _run(tasks: list, workers: int):
    if workers == 1:
        yield from map(_cache_image, tasks)
        return
    chunksize = max(1, min(8, len(tasks) // (workers * 16)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: safe beside torch's threads
        yield from pool.imap_unordered(_cache_image, tasks, chunksize=chunksize)


class ImageReadError(RuntimeError):
    """An image file could not be read or decoded; the message names the path."""


class CXRDataset(Dataset):
    """An index's (uint8 ``[1, R, R]`` image, targets, mask) from ``cache_dir`` or resized on the fly; an
    unreadable image raises :class:`ImageReadError` (``skip_bad_images``: a warning and ``None``)."""

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
        rows = pd.DataFrame(columns=["resolution", "format", "mode"])  # the settings the cache was built with
        if self.cache_dir and (manifest := self.cache_dir / MANIFEST_NAME).is_file():
            rows = pd.read_csv(manifest, usecols=["resolution", "mode", "format"], dtype=str)
        rows, chosen = rows[rows["resolution"] == str(self.resolution)], {}
        for name, given, default in (("format", cache_format, "png"), ("mode", resize_mode, "squash")):
            built = sorted(rows[name].unique())
            if len(built) > 1 or (built and given not in (None, built[0])):
                raise ValueError(
                    f"the cache {self.cache_dir} holds {self.resolution} px images with {name} "
                    f"{' and '.join(map(repr, built))}{f', but {given!r} was asked for' if given else ''}"
                )
            chosen[name] = given or (built or [default])[0]
        self.cache_format, self.resize_mode = chosen["format"], chosen["mode"]
        self.transform, self.reduced_decode, self.skip_bad_images = transform, reduced_decode, skip_bad_images
        self.dicom_ids = index["dicom_id"].astype(str).tolist()
        self.paths = index["path"].astype(str).tolist()
        self.findings = index_findings(index)
        self.targets, self.masks = targets_and_mask(index[self.findings].to_numpy(dtype=np.float32))

    def __len__(self) -> int:
        return len(self.dicom_ids)

    def read_image(self, i: int) -> torch.Tensor:
        """The uint8 ``[1, R, R]`` image of item ``i``; raises :class:`ImageReadError` naming the file."""
        path = Path(self.paths[i])
        if self.cache_dir is not None:
            path = cached_image_path(self.cache_dir, self.resolution, self.dicom_ids[i], self.cache_format)
        try:
            if self.cache_dir is None:
                squares = square_images(path, [self.resolution], self.resize_mode, self.reduced_decode)[0]
                array = np.asarray(squares[self.resolution])
            else:
                with Image.open(path) as image:  # 8-bit gray already: convert() would copy every pixel again
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
    return default_collate(kept) if kept else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--index", type=Path, required=True, help="index.csv (from python -m cxrlib.datasets)")
    add("--out", type=Path, required=True, help="cache folder (created or resumed)")
    add("--resolutions", type=int, nargs="+", default=[256, 512, 1024, 2048], help="square sizes in px")
    add("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    add("--mode", choices=RESIZE_MODES, default="squash", help="squash (paper) or pad")
    add("--format", choices=CACHE_FORMATS, default="png", help="file format (default png)")
    add("--no-reduced-decode", action="store_true", help="always decode JPEGs at full size (slower)")
    add("--drop-bad", action="store_true", help=f"leave unreadable images out, write {CLEANED_INDEX_NAME}")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = build_cache(
            read_index(args.index), args.out, args.resolutions, args.workers, args.mode, args.format,
            95, not args.no_reduced_decode, args.drop_bad, not args.no_progress,
        )  # fmt: skip
    except (CacheBuildError, ValueError, OSError) as error:  # OSError: a full disk, a failing write ...
        done = f"{error.report.summary()}\n" if isinstance(error, CacheBuildError) else ""
        written = isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
        kept = "; images cached before are kept: fix this (free disk space) and run the same command again"
        print(f"{done}error: {error}{kept if written else ''}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.dropped:
        print(f"warning: {len(report.dropped)} unreadable image(s) dropped: {report.dropped[:5]}; use "
              f"{report.cleaned_index} from here on", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
