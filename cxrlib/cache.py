"""Multi-resolution image cache: each source image once per resolution, as a square 8-bit file.

Layout (shared by the writer here and the reader :class:`CXRDataset`)::

    CACHE/manifest.csv             one row per cached (image, resolution), see MANIFEST_COLUMNS
    CACHE/errors.csv               sources the last build could not read (header only when none)
    CACHE/index.cleaned.csv        only with ``drop_bad``: the index without those images
    CACHE/<R>/<first two characters of dicom_id>/<dicom_id>.<png|jpg>

Each cached file is what :func:`square_images` makes of its source (the same
code :class:`CXRDataset` uses on the fly, so both give identical pixels), so
it depends only on (source, R, mode, reduced_decode), never on which other resolutions were
built with it. The builder reads each source once and decodes it once per distinct DCT scale.

Resuming: a (image, resolution) pair is skipped when the manifest lists it with the same
settings and source path, the source's size in bytes and mtime are unchanged, and the
cached file exists with the recorded size in bytes. Files are written to a temporary name
and renamed, and the manifest is rewritten atomically every ``MANIFEST_SAVE_SECONDS`` and
at the end (also after an interrupt), so an interrupted build resumes where it stopped and
a half-written file is never taken as done. A write that fails (a full disk) stops the build
with an error naming the file; the files and manifest written before it stay valid.

Bad sources (truncated or empty files, files that are not images) do not stop the build:
every other image is cached, the bad ones are listed in ``errors.csv`` (dicom_id,
source_path, error), and then :func:`build_cache` raises :class:`CacheBuildError` naming
them. Images are never silently dropped: with ``drop_bad=True`` (``--drop-bad``) the build
instead returns normally with the dropped ids in its report and writes
``index.cleaned.csv``, the index without them, for the next steps to use.

Command line::

    python -m cxrlib.cache --index index.csv --resolutions 256 512 1024 2048 --out CACHE
    python -m cxrlib.cache --index index.csv --resolutions 256 --out CACHE --workers 8 --mode pad --format jpg
    python -m cxrlib.cache --index index.csv --resolutions 256 --out CACHE --check   # is it complete?
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

_MARKER = re.compile(rb"\xff([^\x00\xff])")  # 0xFF 0x00 is a stuffed data byte, 0xFF 0xFF padding
_AFTER_SCAN = frozenset((0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))  # tables, next scan
_FRAMES = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it."""
    with Image.open(path) as image:
        return image.size


def to_grayscale_8bit(image: Image.Image) -> Image.Image:
    """Convert any Pillow image (L, 1, RGB, RGBA, CMYK, YCbCr, palette, LA, 16-bit, I, F) to 8-bit ``L``.

    16- and 32-bit integer images are divided by ``2**b - 1``, where ``b`` is the smallest
    bit depth (at least 8) that holds the image's maximum: a 16-bit image keeps its range,
    and a 12-bit radiograph stored in a 16-bit PNG keeps all its contrast instead of being
    squeezed into 16 gray levels. Float images in [0, 1] are scaled by 255.
    """
    image.load()
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max(initial=0.0))
        if image.mode == "F" and top <= 1.0:
            scale = 1.0
        else:
            scale = float(2 ** max(8, int(math.ceil(top)).bit_length()) - 1)
        return Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("1", "RGB", "YCbCr"):
        return image.convert("L")
    # CMYK, palette, alpha and anything else: through RGB, which Pillow converts from every mode.
    return image.convert("RGB").convert("L")


def jpeg_damage(data: bytes) -> str:
    """Where a JPEG's markers break the format (a marker inside compressed data, restart markers
    out of order, stray bytes, data after the end), or ``""`` when they are where the format puts
    them: segments by their length, each scan's data up to its next marker, and after the last
    scan of a sequential image only the end-of-image marker."""
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


def _draft_request(size: tuple[int, int], resolution: int, mode: str) -> tuple[int, int]:
    """The smallest decoded size that still gives a full-quality ``resolution`` px square."""
    if mode == "squash":
        return resolution, resolution
    longest = max(size)  # pad: the long side becomes the square's side
    return max(1, math.ceil(resolution * size[0] / longest)), max(
        1, math.ceil(resolution * size[1] / longest)
    )


def _to_square(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    if mode == "pad":
        side = max(image.size)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


@dataclass
class SquareImages:
    """The result of :func:`square_images`: one image per resolution and what the source was."""

    images: dict[int, Image.Image]
    source_size: tuple[int, int]
    decode_scale: dict[int, int]


def square_images(
    source: str | os.PathLike | bytes,
    resolutions: list[int] | tuple[int, ...],
    mode: str = "squash",
    reduced_decode: bool = True,
) -> SquareImages:
    """Decode a source (path or its bytes) and make an 8-bit ``R`` x ``R`` image for each resolution.

    The source is read once and decoded once per distinct DCT scale; every image is what
    :func:`resize_to_square` returns for its resolution alone.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    decoded: dict[tuple[int, int], Image.Image] = {}
    images, scales = {}, {}
    source_size = (0, 0)
    for resolution in sorted({int(r) for r in resolutions}, reverse=True):
        with Image.open(io.BytesIO(data)) as image:
            source_size = image.size
            if reduced_decode and image.format == "JPEG":
                image.draft("L", _draft_request(image.size, resolution, mode))
            if image.size not in decoded:
                decoded[image.size] = to_grayscale_8bit(image)
            gray = decoded[image.size]
        images[resolution] = _to_square(gray, resolution, mode)
        scales[resolution] = max(1, round(source_size[0] / gray.width))
    if data[:2] == b"\xff\xd8" and (damage := jpeg_damage(data)):
        raise ValueError(f"corrupt JPEG data: {damage}")
    return SquareImages(images, source_size, scales)


def resize_to_square(
    source: str | os.PathLike, resolution: int, mode: str = "squash", reduced_decode: bool = True
) -> Image.Image:
    """Open an image and return it as an 8-bit grayscale ``resolution`` x ``resolution`` image.

    ``squash`` is the paper's plain resize to a square; ``pad`` keeps the aspect ratio
    and pads the short side with black. JPEGs are decoded at reduced size (``draft``)
    when the target is at most half the source, then resized with a Lanczos filter.
    The cache writer makes its files with the same code (:func:`square_images`).
    """
    return square_images(source, [resolution], mode, reduced_decode).images[int(resolution)]


CACHE_FORMATS = ("png", "jpg")
MANIFEST_NAME = "manifest.csv"
ERRORS_NAME = "errors.csv"
CLEANED_INDEX_NAME = "index.cleaned.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "resolution",
    "path",  # relative to the cache root
    "bytes",  # size of the cached file
    "source_path",
    "source_width",
    "source_height",
    "source_bytes",
    "source_mtime_ns",
    "mode",
    "format",
    "interpolation",
    "reduced_decode",
    "decode_scale",  # 1, 2, 4 or 8: the DCT scale the source was decoded at
)
ERROR_COLUMNS: tuple[str, ...] = ("dicom_id", "source_path", "error")
MANIFEST_SAVE_SECONDS = 30.0
# zlib level 1: 3-5x faster to write than Pillow's default 6 (2048 px: 0.16 s vs 0.43 s), files
# 12-17% larger, read as fast; the cache is written once per image and resolution.
PNG_COMPRESS_LEVEL = 1
_SETTINGS = ("mode", "format", "interpolation", "reduced_decode")


def cached_image_path(cache_dir: str | os.PathLike, resolution: int, dicom_id: str, fmt: str = "png") -> Path:
    """Where the ``resolution`` px copy of image ``dicom_id`` lives in the cache."""
    dicom_id = str(dicom_id)
    return Path(cache_dir) / str(int(resolution)) / dicom_id[:2] / f"{dicom_id}.{fmt}"


# --------------------------------------------------------------------------- manifest


def _empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in MANIFEST_COLUMNS})


def read_manifest(cache_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``CACHE/manifest.csv``; raises ``FileNotFoundError`` when the cache has none."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {cache_dir}: not a cache built by python -m cxrlib.cache "
            f"(or its build has not written anything yet)"
        )
    manifest = pd.read_csv(
        path,
        dtype={c: str for c in ("dicom_id", "path", "source_path", "mode", "format", "interpolation")},
        keep_default_na=False,
    )
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; rebuild the cache")
    manifest["reduced_decode"] = manifest["reduced_decode"].astype(str).str.lower() == "true"
    return manifest


def _write_manifest(rows: dict[tuple[str, int], dict], cache_dir: Path) -> None:
    frame = pd.DataFrame(list(rows.values()), columns=list(MANIFEST_COLUMNS))
    if len(frame):
        frame = frame.sort_values(["resolution", "dicom_id"], kind="stable")
    write_csv_atomic(frame, cache_dir / MANIFEST_NAME, lineterminator="\n")


def _write_errors(errors: list[dict], cache_dir: Path) -> None:
    write_csv_atomic(pd.DataFrame(errors, columns=list(ERROR_COLUMNS)), cache_dir / ERRORS_NAME)


def cache_settings(cache_dir: str | os.PathLike, resolution: int) -> dict[str, str] | None:
    """The ``format`` and ``mode`` of a cache at ``resolution``, from its manifest (None without one).

    Raises ``ValueError`` when the manifest mixes formats or modes at that resolution.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = pd.read_csv(path, usecols=["resolution", "mode", "format"], dtype=str)
    rows = manifest[manifest["resolution"] == str(int(resolution))]
    settings = {}
    for column in ("format", "mode"):
        values = sorted(rows[column].unique())
        if len(values) > 1:
            raise ValueError(
                f"{path}: {resolution} px images have several {column}s {values}; rebuild the cache"
            )
        settings[column] = values[0] if values else None
    return settings


def check_cache(
    index: pd.DataFrame,
    cache_dir: str | os.PathLike,
    resolution: int,
    fmt: str | None = None,
    mode: str | None = None,
) -> list[str]:
    """dicom_ids of ``index`` that the cache does not hold, complete, at ``resolution``.

    An image counts as cached when the manifest lists it at that resolution (with ``fmt``
    and ``mode`` when given) and its file exists with the recorded size in bytes. Sources
    are not looked at, so a cache copied to another machine checks out. Returns the
    missing ids in index order (empty when the cache is complete).
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    rows = manifest[manifest["resolution"] == int(resolution)]
    if fmt is not None:
        rows = rows[rows["format"] == fmt]
    if mode is not None:
        rows = rows[rows["mode"] == mode]
    size_of = dict(zip(rows["dicom_id"], zip(rows["path"], rows["bytes"], strict=True), strict=True))
    missing = []
    for dicom_id in index["dicom_id"].astype(str):
        entry = size_of.get(dicom_id)
        if entry is None or _file_size(cache_dir / entry[0]) != int(entry[1]):
            missing.append(dicom_id)
    return missing


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# --------------------------------------------------------------------------- building


class CacheBuildError(RuntimeError):
    """Some sources could not be read; every other image was cached. ``report`` has the details."""

    def __init__(self, report: CacheReport):
        self.report = report
        super().__init__(report.error_message())


@dataclass
class CacheReport:
    """What a :func:`build_cache` run did."""

    cache_dir: Path
    resolutions: tuple[int, ...]
    images: int  # images in the index
    written: int = 0  # (image, resolution) files written by this run
    skipped: int = 0  # (image, resolution) files that were already cached and valid
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(ERROR_COLUMNS)))
    dropped: list[str] = field(default_factory=list)  # ids left out of index.cleaned.csv (drop_bad)
    cleaned_index: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every source image was read."""
        return self.errors.empty

    def summary(self) -> str:
        text = (
            f"{self.cache_dir}: {self.images} images at {list(self.resolutions)} px: wrote {self.written} "
            f"files, {self.skipped} already cached, {len(self.errors)} unreadable "
            f"({self.seconds:.1f} s)"
        )
        if self.cleaned_index is not None:
            text += f"; dropped {len(self.dropped)}, cleaned index: {self.cleaned_index}"
        return text

    def error_message(self) -> str:
        shown = [f"{row.source_path} ({row.error})" for row in self.errors.head(5).itertuples()]
        more = f" and {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        return (
            f"{len(self.errors)} source image(s) could not be read: {'; '.join(shown)}{more}; "
            f"all are listed in {self.cache_dir / ERRORS_NAME}. Replace or fix them and run again, "
            f"or pass --drop-bad (drop_bad=True) to write {CLEANED_INDEX_NAME} without them"
        )


@dataclass(frozen=True)
class _Settings:
    cache_dir: str
    mode: str
    fmt: str
    jpeg_quality: int
    reduced_decode: bool


def _cache_image(
    task: tuple[str, str, tuple[int, ...], _Settings],
) -> tuple[str, str, list[dict] | None, str]:
    """Worker: decode one source, write it at each resolution; (dicom_id, source, manifest rows, error)."""
    dicom_id, source, resolutions, settings = task
    try:
        stat = os.stat(source)
        made = square_images(Path(source).read_bytes(), resolutions, settings.mode, settings.reduced_decode)
    except Exception as error:  # a bad source is reported, not fatal; writing errors below are
        return dicom_id, source, None, f"{type(error).__name__}: {error}"
    rows = []
    for resolution, image in made.images.items():
        target = cached_image_path(settings.cache_dir, resolution, dicom_id, settings.fmt)
        # no fsync per file (about 4 ms each): the rename keeps a crash from leaving a partial file
        # under the final name, and the manifest's byte count catches one lost in a power cut
        with atomic_write(target, fsync=False) as handle:
            if settings.fmt == "png":
                image.save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            else:
                image.save(handle, format="JPEG", quality=settings.jpeg_quality)
        rows.append(
            {
                "dicom_id": dicom_id,
                "resolution": resolution,
                "path": target.relative_to(settings.cache_dir).as_posix(),
                "bytes": target.stat().st_size,
                "source_path": source,
                "source_width": made.source_size[0],
                "source_height": made.source_size[1],
                "source_bytes": stat.st_size,
                "source_mtime_ns": stat.st_mtime_ns,
                "mode": settings.mode,
                "format": settings.fmt,
                "interpolation": INTERPOLATION,
                "reduced_decode": settings.reduced_decode,
                "decode_scale": made.decode_scale[resolution],
            }
        )
    return dicom_id, source, rows, ""


def _is_current(
    row: dict, source: str, source_stat: os.stat_result | None, settings: dict, root: Path
) -> bool:
    return (
        source_stat is not None
        and all(row[key] == value for key, value in settings.items())
        and row["source_path"] == source
        and int(row["source_bytes"]) == source_stat.st_size
        and int(row["source_mtime_ns"]) == source_stat.st_mtime_ns
        and _file_size(root / row["path"]) == int(row["bytes"])
    )


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _check_inputs(index: pd.DataFrame, resolutions, mode: str, fmt: str) -> tuple[int, ...]:
    for column in ("dicom_id", "path"):
        if column not in index.columns:
            raise ValueError(f"index: missing column {column!r}; build it with python -m cxrlib.datasets")
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format {fmt!r}; choose one of {CACHE_FORMATS}")
    resolutions = tuple(sorted({int(r) for r in resolutions}))
    if not resolutions or resolutions[0] < 1:
        raise ValueError(f"resolutions must be positive integers, got {list(resolutions)}")
    ids = index["dicom_id"].astype(str)
    duplicated = ids.duplicated()
    if duplicated.any():
        raise ValueError(f"index: dicom_id {ids[duplicated].iloc[0]!r} is listed twice")
    unsafe = ids.str.contains(r"[/\\]") | ids.str.startswith(".") | (ids.str.len() == 0)
    if unsafe.any():
        raise ValueError(f"index: dicom_id {ids[unsafe].iloc[0]!r} cannot name a cache file")
    return resolutions


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
    """Write every image of ``index`` (columns ``dicom_id``, ``path``) at each resolution into ``out_dir``.

    Resumes a previous build (see the module docstring); runs ``workers`` processes
    (default ``os.cpu_count()``; 1 runs in this process). Unreadable sources go to
    ``errors.csv``; afterwards this raises :class:`CacheBuildError` naming them, unless
    ``drop_bad`` is set, in which case it writes ``index.cleaned.csv`` without them and
    returns the report with their ids in ``dropped``.
    """
    started = time.monotonic()
    resolutions = _check_inputs(index, resolutions, mode, fmt)
    cache_dir = Path(out_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = _manifest_rows(cache_dir)
    wanted = {"mode": mode, "format": fmt, "interpolation": INTERPOLATION, "reduced_decode": reduced_decode}
    settings = _Settings(str(cache_dir), mode, fmt, int(jpeg_quality), bool(reduced_decode))
    tasks, skipped = _pending(index, resolutions, rows, wanted, settings, progress)
    report = CacheReport(cache_dir, resolutions, len(index), skipped=skipped)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    report.written, errors = _write_pending(tasks, workers, rows, resolutions, cache_dir, progress)
    report.errors = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    if drop_bad:
        report.dropped = report.errors["dicom_id"].tolist()
        cleaned = index[~index["dicom_id"].astype(str).isin(report.dropped)]
        report.cleaned_index = write_csv_atomic(cleaned, cache_dir / CLEANED_INDEX_NAME, lineterminator="\n")
    report.seconds = time.monotonic() - started
    if not report.ok and not drop_bad:
        raise CacheBuildError(report)
    return report


def _manifest_rows(cache_dir: Path) -> dict[tuple[str, int], dict]:
    """The manifest of a previous build (empty when there is none), by (dicom_id, resolution)."""
    try:
        old = read_manifest(cache_dir)
    except FileNotFoundError:
        old = _empty_manifest()
    return {(row["dicom_id"], int(row["resolution"])): row for row in old.to_dict("records")}


def _pending(
    index: pd.DataFrame,
    resolutions: tuple[int, ...],
    rows: dict[tuple[str, int], dict],
    wanted: dict,
    settings: _Settings,
    progress: bool,
) -> tuple[list, int]:
    """Worker tasks for the (image, resolution) pairs not cached and current; and how many are."""
    tasks, skipped = [], 0
    cache_dir = Path(settings.cache_dir)
    pairs = zip(index["dicom_id"].astype(str), index["path"].astype(str), strict=True)
    for dicom_id, source in tqdm(
        pairs, total=len(index), desc="checking cache", leave=False, disable=not progress
    ):
        known = [rows.get((dicom_id, r)) for r in resolutions]
        source_stat = _stat(source) if any(known) else None
        todo = tuple(
            r
            for r, row in zip(resolutions, known, strict=True)
            if row is None or not _is_current(row, source, source_stat, wanted, cache_dir)
        )
        skipped += len(resolutions) - len(todo)
        if todo:
            tasks.append((dicom_id, source, todo, settings))
    return tasks, skipped


def _write_pending(
    tasks: list,
    workers: int,
    rows: dict[tuple[str, int], dict],
    resolutions: tuple[int, ...],
    cache_dir: Path,
    progress: bool,
) -> tuple[int, list[dict]]:
    """Run the tasks, updating ``rows`` and saving the manifest as they finish; (files written, errors)."""
    written, errors = 0, []
    last_save = time.monotonic()
    try:
        with tqdm(
            total=len(tasks), desc=f"caching {list(resolutions)} px", unit="img", disable=not progress
        ) as bar:
            for dicom_id, source, new_rows, error in _run(tasks, workers):
                if new_rows is None:
                    errors.append({"dicom_id": dicom_id, "source_path": source, "error": error})
                    for resolution in resolutions:  # a source that went bad is no longer cached
                        rows.pop((dicom_id, resolution), None)
                else:
                    for row in new_rows:
                        rows[(dicom_id, row["resolution"])] = row
                    written += len(new_rows)
                bar.update()
                if time.monotonic() - last_save > MANIFEST_SAVE_SECONDS:
                    _write_manifest(rows, cache_dir)
                    last_save = time.monotonic()
    finally:  # also after an interrupt, so the next run resumes from here
        _write_manifest(rows, cache_dir)
        _write_errors(errors, cache_dir)
    return written, errors


def _run(tasks: list, workers: int):
    """Yield worker results, in this process for one worker, else from a pool of processes."""
    if workers == 1:
        yield from map(_cache_image, tasks)
        return
    # spawn: safe next to torch and notebook threads, where fork is not
    chunksize = max(1, min(8, len(tasks) // (workers * 16)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_cache_image, tasks, chunksize=chunksize)


# --------------------------------------------------------------------------- the Dataset


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


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--index", type=Path, required=True, help="index.csv (from python -m cxrlib.datasets)"
    )
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created or resumed)")
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=[256, 512, 1024, 2048], help="square sizes in px"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument("--mode", choices=RESIZE_MODES, default="squash", help="squash (paper) or pad")
    parser.add_argument("--format", choices=CACHE_FORMATS, default="png", help="file format (default png)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality for --format jpg")
    parser.add_argument(
        "--no-reduced-decode", action="store_true", help="always decode JPEGs at full size (slower)"
    )
    parser.add_argument(
        "--drop-bad",
        action="store_true",
        help=f"leave unreadable images out and write {CLEANED_INDEX_NAME} into the cache (default: fail)",
    )
    parser.add_argument("--check", action="store_true", help="only report images the cache lacks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        index = read_index(args.index)
        if args.check:
            incomplete = 0
            for resolution in sorted(set(args.resolutions)):
                missing = check_cache(index, args.out, resolution, args.format, args.mode)
                incomplete += bool(missing)
                example = f", e.g. {missing[:3]}" if missing else ""
                print(
                    f"{args.out}: {resolution} px: {len(index) - len(missing)}/{len(index)} cached{example}"
                )
            return 1 if incomplete else 0
        report = build_cache(
            index,
            args.out,
            args.resolutions,
            workers=args.workers,
            mode=args.mode,
            fmt=args.format,
            jpeg_quality=args.jpeg_quality,
            reduced_decode=not args.no_reduced_decode,
            drop_bad=args.drop_bad,
            progress=not args.no_progress,
        )
    except CacheBuildError as error:
        print(error.report.summary(), file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk or a failing write: nothing finished before is lost
        print(
            f"error: {error}; the images cached before are kept: fix this (e.g. free disk space) "
            "and run the same command again to continue",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    if report.dropped:
        print(
            f"warning: {len(report.dropped)} unreadable image(s) dropped: {report.dropped[:5]}; "
            f"use {report.cleaned_index} from here on",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
