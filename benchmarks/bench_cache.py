"""Cache build rate (images/s) at one resolution, with and without reduced JPEG decoding.

Sources are native-size radiographs: phantom images (``cxrlib.phantom.make_phantom`` at
``max_size=None``, keeping those of about 2500 x 3056) when the phantom module is there,
else JPEGs of radiograph-like smooth noise, 2500 x 3056, quality 95. Each setting builds a
fresh cache of the same images with :func:`cxrlib.cache.build_cache`. The two settings
alternate, ``--repeats`` times each, and the fastest run of each counts, so load from other
processes on a shared machine hits both alike. Reported: images/s of wall time (which includes
starting the worker processes) and CPU milliseconds per image (this process and its workers).

Usage::

    python benchmarks/bench_cache.py --images 16 --workers 1
    python benchmarks/bench_cache.py --images 64 --workers 8 --resolution 256 --source noise
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# Only light imports at the top: worker processes are spawned and re-import this script.
from cxrlib.cache import build_cache

WIDTH, HEIGHT = 2500, 3056


def noise_radiograph(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Smooth multi-scale noise on a gradient plus film grain: compresses like a radiograph."""
    image = np.zeros((height, width), np.float32)
    for cells, amplitude in ((8, 40.0), (40, 18.0), (200, 6.0)):
        coarse = rng.normal(0, amplitude, (cells * height // width + 2, cells + 2)).astype(np.float32)
        image += np.asarray(Image.fromarray(coarse, "F").resize((width, height), Image.Resampling.BICUBIC))
    image += np.linspace(60, 170, height, dtype=np.float32)[:, None]
    image += rng.normal(0, 3, (height, width)).astype(np.float32)  # film grain
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L")


def noise_sources(folder: Path, images: int, quality: int) -> pd.DataFrame:
    """The columns build_cache reads (dicom_id, path), plus the size."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        path = folder / f"noise{i:04d}.jpg"
        noise_radiograph(rng).save(path, quality=quality)
        rows.append({"dicom_id": f"{i:04d}", "path": str(path), "width": WIDTH, "height": HEIGHT})
    return pd.DataFrame(rows)


def phantom_sources(folder: Path, images: int) -> pd.DataFrame:
    from cxrlib.datasets import index_from_mimic
    from cxrlib.phantom import make_phantom

    index = pd.DataFrame()
    subjects = max(4, images)
    while True:  # most phantom images are about 2500 x 3056; draw subjects until there are enough
        root = make_phantom(folder / f"phantom{subjects}", subjects, seed=0, max_size=None)
        index = index_from_mimic(root)
        portrait = index[(abs(index["width"] - WIDTH) < 50) & (abs(index["height"] - HEIGHT) < 10)]
        if len(portrait) >= images:
            return portrait.iloc[:images]
        subjects *= 2


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="number of source images (default 16)")
    parser.add_argument("--workers", type=int, default=1, help="cache worker processes (default 1)")
    parser.add_argument("--resolution", type=int, default=256, help="cache resolution in px (default 256)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per setting; the best counts (default 2)"
    )
    parser.add_argument(
        "--source", choices=("auto", "phantom", "noise"), default="auto", help="auto: phantom if available"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the noise sources")
    parser.add_argument(
        "--work-dir", type=Path, help="where to write sources and caches (default: a temp dir)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    source = args.source
    if source == "auto":
        try:
            import cxrlib.phantom  # noqa: F401
        except ImportError:
            source = "noise"
        else:
            source = "phantom"
    work = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.work_dir))
    try:
        started = time.perf_counter()
        index = (
            phantom_sources(work, args.images)
            if source == "phantom"
            else noise_sources(work, args.images, args.quality)
        )
        sizes = index[["width", "height"]].astype(int).drop_duplicates().to_numpy().tolist()
        megabytes = sum(Path(p).stat().st_size for p in index["path"]) / len(index) / 1e6
        print(
            f"{len(index)} {source} JPEGs, sizes {sizes[:3]}, {megabytes:.2f} MB each "
            f"(made in {time.perf_counter() - started:.0f} s); {args.resolution} px, {args.workers} worker(s)"
        )
        wall = {False: float("inf"), True: float("inf")}
        cpu = dict(wall)
        for repeat in range(args.repeats):
            for reduced in (False, True):
                out = work / f"cache_{reduced}_{repeat}"
                started, cpu_started = time.perf_counter(), cpu_seconds()
                build_cache(
                    index,
                    out,
                    [args.resolution],
                    workers=args.workers,
                    reduced_decode=reduced,
                    progress=False,
                )
                wall[reduced] = min(wall[reduced], time.perf_counter() - started)
                cpu[reduced] = min(cpu[reduced], cpu_seconds() - cpu_started)
                shutil.rmtree(out)
        for reduced in (False, True):
            label = "reduced decode (draft)" if reduced else "full decode"
            print(
                f"{label:>24}: {len(index) / wall[reduced]:7.1f} images/s  ({wall[reduced]:.2f} s wall, "
                f"{1000 * cpu[reduced] / len(index):.0f} ms CPU per image)"
            )
        print(
            f"{'speed-up':>24}: {wall[False] / wall[True]:7.1f}x images/s, "
            f"{cpu[False] / cpu[True]:.1f}x CPU per image"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
