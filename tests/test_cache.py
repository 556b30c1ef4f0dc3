"""Multi-resolution cache: sizes, manifest, resuming, bad sources, conversions, cached == on the fly, CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxrlib.cache as cache
from cxrlib.cache import (
    MANIFEST_COLUMNS,
    CacheBuildError,
    CXRDataset,
    build_cache,
    cached_image_path,
    check_cache,
    read_manifest,
    square_images,
    to_grayscale_8bit,
)
from cxrlib.datasets import index_from_mimic
from cxrlib.index import BASE_COLUMNS, read_index, write_index
from cxrlib.labels import FINDINGS

RESOLUTIONS = (16, 32)


def index_of(paths: dict[str, Path]) -> pd.DataFrame:
    """A schema-complete index of hand-made files (ids -> paths)."""
    rows = [
        {
            "dicom_id": i,
            "subject_id": f"s{n}",
            "study_id": f"t{n}",
            "path": str(p),
            "view": "PA",
            "width": 0,
            "height": 0,
        }
        for n, (i, p) in enumerate(paths.items())
    ]
    frame = pd.DataFrame(rows)
    for finding in FINDINGS:
        frame[finding] = 0.0
    return frame[[*BASE_COLUMNS, *FINDINGS]]


def build(index, out, resolutions=RESOLUTIONS, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return build_cache(index, out, resolutions, **kwargs)


@pytest.fixture
def mimic_index(fake_mimic):
    return index_from_mimic(fake_mimic.root)


@pytest.mark.parametrize("mode", ["squash", "pad"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_every_image_is_written_at_every_resolution(mimic_index, tmp_path, mode, fmt):
    report = build(mimic_index, tmp_path / "c", mode=mode, fmt=fmt)
    assert report.ok and report.written == 2 * len(mimic_index) and report.skipped == 0
    for dicom_id in mimic_index["dicom_id"]:
        for resolution in RESOLUTIONS:
            path = cached_image_path(tmp_path / "c", resolution, dicom_id, fmt)
            assert path.parent.name == dicom_id[:2]
            with Image.open(path) as image:
                assert image.size == (resolution, resolution) and image.mode == "L"
                assert image.format == {"png": "PNG", "jpg": "JPEG"}[fmt]


def test_manifest_content(mimic_index, fake_mimic, tmp_path):
    build(mimic_index, tmp_path / "c")
    manifest = read_manifest(tmp_path / "c")
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == 2 * len(mimic_index)
    meta = fake_mimic.metadata.set_index("dicom_id")
    for row in manifest.itertuples():
        source = Path(row.source_path)
        assert (tmp_path / "c" / row.path).stat().st_size == row.bytes
        assert row.path == f"{row.resolution}/{row.dicom_id[:2]}/{row.dicom_id}.png"
        assert (row.source_width, row.source_height) == (
            meta.at[row.dicom_id, "Columns"],
            meta.at[row.dicom_id, "Rows"],
        )
        assert row.source_bytes == source.stat().st_size and row.source_mtime_ns == source.stat().st_mtime_ns
        assert (row.mode, row.format, row.interpolation, row.reduced_decode) == (
            "squash",
            "png",
            "lanczos",
            True,
        )
        assert row.decode_scale == (2 if row.resolution == 16 else 1)  # 40..48 px sources: 16 px is <= half
    assert (tmp_path / "c" / "errors.csv").read_text().strip() == "dicom_id,source_path,error"


def test_a_rerun_writes_nothing_and_a_touched_source_is_redone_alone(mimic_index, tmp_path):
    out = tmp_path / "c"
    build(mimic_index, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = build(mimic_index, out)
    assert again.written == 0 and again.skipped == 2 * len(mimic_index)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    source = Path(mimic_index["path"].iloc[3])
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    redo = build(mimic_index, out)
    assert redo.written == 2 and redo.skipped == 2 * len(mimic_index) - 2
    changed = [p for p in out.rglob("*.png") if p.stat().st_mtime_ns != before[p]]
    assert sorted(p.stem for p in changed) == [mimic_index["dicom_id"].iloc[3]] * 2
    manifest = read_manifest(out).set_index(["dicom_id", "resolution"])
    assert manifest.at[(mimic_index["dicom_id"].iloc[3], 16), "source_mtime_ns"] == source.stat().st_mtime_ns


def test_a_leftover_temp_file_or_a_damaged_file_is_not_taken_as_done(mimic_index, tmp_path):
    out = tmp_path / "c"
    build(mimic_index, out)
    crashed = cached_image_path(out, 32, mimic_index["dicom_id"].iloc[0])
    temp = crashed.parent / f".{crashed.name}.abc123.tmp"  # what a crash mid-write leaves behind
    crashed.rename(temp)
    damaged = cached_image_path(out, 16, mimic_index["dicom_id"].iloc[1])
    damaged.write_bytes(damaged.read_bytes()[:20])
    assert set(check_cache(mimic_index, out, 32)) == {mimic_index["dicom_id"].iloc[0]}
    assert set(check_cache(mimic_index, out, 16)) == {mimic_index["dicom_id"].iloc[1]}
    report = build(mimic_index, out)
    assert report.written == 2
    assert check_cache(mimic_index, out, 32) == [] and check_cache(mimic_index, out, 16) == []
    with Image.open(crashed) as image, Image.open(damaged) as other:
        assert image.size == (32, 32) and other.size == (16, 16)


def test_an_interrupted_build_resumes_where_it_stopped(mimic_index, tmp_path, monkeypatch):
    calls = []
    real = cache._cache_image

    def interrupted_after_five(task):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(cache, "_cache_image", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        build(mimic_index, tmp_path / "c")
    monkeypatch.undo()
    manifest = read_manifest(tmp_path / "c")
    assert sorted(set(manifest["dicom_id"])) == sorted(calls) and len(manifest) == 10
    report = build(mimic_index, tmp_path / "c")
    assert report.written == 2 * (len(mimic_index) - 5) and report.skipped == 10


def test_changed_settings_redo_the_cache(mimic_index, tmp_path):
    build(mimic_index, tmp_path / "c")
    report = build(mimic_index, tmp_path / "c", mode="pad")
    assert report.written == 2 * len(mimic_index)
    assert set(read_manifest(tmp_path / "c")["mode"]) == {"pad"}
    assert build(mimic_index, tmp_path / "c", [16], mode="pad", reduced_decode=False).written == len(
        mimic_index
    )


def write_bad_sources(folder: Path) -> dict[str, Path]:
    good = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (48, 1))
    Image.fromarray(good).save(folder / "good.jpg", quality=90)
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(good[::-1]).save(folder / "good2.jpg", quality=90)
    return {
        p.stem: p
        for p in (folder / n for n in ("good.jpg", "truncated.jpg", "empty.jpg", "text.jpg", "good2.jpg"))
    }


def test_bad_sources_are_listed_and_everything_else_is_cached(tmp_path):
    index = index_of(write_bad_sources(tmp_path))
    with pytest.raises(CacheBuildError, match=r"3 source image\(s\).*truncated.jpg.*--drop-bad") as caught:
        build(index, tmp_path / "c")
    errors = pd.read_csv(tmp_path / "c" / "errors.csv")
    assert sorted(errors["dicom_id"]) == ["empty", "text", "truncated"]
    assert errors.set_index("dicom_id").at["truncated", "source_path"] == str(tmp_path / "truncated.jpg")
    assert "truncated" in errors.set_index("dicom_id").at["truncated", "error"].lower()
    assert caught.value.report.written == 4
    for resolution in RESOLUTIONS:
        assert check_cache(index, tmp_path / "c", resolution) == ["truncated", "empty", "text"]
    assert not (tmp_path / "c" / "index.cleaned.csv").exists()
    report = build(index, tmp_path / "c", drop_bad=True)
    assert report.dropped == ["truncated", "empty", "text"] and report.written == 0 and not report.ok
    cleaned = read_index(report.cleaned_index)
    assert cleaned["dicom_id"].tolist() == ["good", "good2"]


def overwrite_middle(data: bytes, seed: int, size: int = 4096) -> bytes:
    """``data`` with ``size`` random bytes written over its middle (a JPEG's compressed data)."""
    middle = len(data) // 2
    noise = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return data[:middle] + noise + data[middle + size :]


def test_a_jpeg_with_corrupt_compressed_data_is_listed_not_cached(tmp_path):
    rng = np.random.default_rng(0)
    radiograph = (rng.random((512, 512)) * 50 + np.linspace(0, 200, 512)).astype(np.uint8)
    Image.fromarray(radiograph).save(tmp_path / "good.jpg", quality=95)
    corrupt = overwrite_middle((tmp_path / "good.jpg").read_bytes(), seed=1)
    (tmp_path / "corrupt.jpg").write_bytes(corrupt)
    with Image.open(tmp_path / "corrupt.jpg") as silent:  # Pillow decodes it without a word
        damage = np.abs(np.asarray(silent, dtype=int) - radiograph.astype(int)).max()
    assert damage > 100
    index = index_of({"good": tmp_path / "good.jpg", "corrupt": tmp_path / "corrupt.jpg"})
    with pytest.raises(CacheBuildError, match=r"1 source image\(s\).*corrupt.jpg"):
        build(index, tmp_path / "c", resolutions=(64,))
    errors = pd.read_csv(tmp_path / "c" / "errors.csv")
    assert errors["dicom_id"].tolist() == ["corrupt"]
    assert "corrupt JPEG data: marker" in errors["error"].iloc[0]
    assert check_cache(index, tmp_path / "c", 64) == ["corrupt"]


def test_a_source_that_goes_bad_is_no_longer_listed_as_cached(mimic_index, tmp_path):
    build(mimic_index, tmp_path / "c")
    index = mimic_index.copy()  # point one image at a broken copy; the shared tree stays intact
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(index["path"].iloc[2]).read_bytes()[:200])
    index.loc[2, "path"] = str(broken)
    with pytest.raises(CacheBuildError):
        build(index, tmp_path / "c")
    assert check_cache(index, tmp_path / "c", 16) == [index["dicom_id"].iloc[2]]


# --------------------------------------------------------------------------- conversions


def test_to_grayscale_8bit_scales_16_bit_images_by_their_bit_depth():
    full = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert full.mode.startswith("I;16")
    assert np.asarray(to_grayscale_8bit(full)).tolist() == [[0, 128, 255]]
    twelve_bit = Image.fromarray(np.array([[0, 2048, 4095]], dtype=np.uint16))
    assert np.asarray(to_grayscale_8bit(twelve_bit)).tolist() == [[0, 128, 255]]
    as_int32 = Image.fromarray(np.array([[0, 2048, 4095]], dtype=np.int32))
    assert as_int32.mode == "I" and np.asarray(to_grayscale_8bit(as_int32)).tolist() == [[0, 128, 255]]
    small_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_grayscale_8bit(small_float)).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize(
    "mode, color, gray",
    [
        ("RGB", (255, 0, 0), 76),
        ("RGBA", (0, 255, 0, 128), 150),
        ("CMYK", (0, 0, 0, 0), 255),
        ("CMYK", (0, 0, 0, 255), 0),
        ("1", 1, 255),
        ("LA", (77, 200), 77),
    ],
)
def test_to_grayscale_8bit_colour_modes(mode, color, gray):
    converted = to_grayscale_8bit(Image.new(mode, (4, 4), color))
    assert converted.mode == "L" and np.asarray(converted).tolist() == [[gray] * 4] * 4


def write_odd_sources(folder: Path) -> dict[str, Path]:
    """Sources in every format the cache must turn into 8-bit gray: left half dark, right half bright."""
    gray = np.zeros((48, 40), np.uint8)
    gray[:, 20:] = 200
    files = {}
    files["sixteen"] = folder / "sixteen.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(files["sixteen"])  # 16-bit, 0 and 51400
    files["twelve"] = folder / "twelve.png"
    Image.fromarray((gray.astype(np.uint32) * 4095 // 255).astype(np.uint16)).save(files["twelve"])  # 12 bits
    files["rgb"] = folder / "rgb.jpg"
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(files["rgb"], quality=95)
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(np.stack([gray] * 3, axis=-1)).convert("CMYK").save(files["cmyk"], quality=95)
    files["palette"] = folder / "palette.png"
    Image.fromarray(np.stack([gray] * 3, axis=-1)).convert("P").save(files["palette"])
    files["png_named_jpg"] = folder / "png_named.jpg"
    Image.fromarray(gray).save(files["png_named_jpg"], format="PNG")
    return files


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_odd_sources_are_cached_as_8_bit_gray(tmp_path, resolution):
    files = write_odd_sources(tmp_path)
    build(index_of(files), tmp_path / "c", [resolution])
    for dicom_id in files:
        with Image.open(cached_image_path(tmp_path / "c", resolution, dicom_id)) as image:
            assert image.mode == "L", dicom_id
            array = np.asarray(image, dtype=float)
        left, right = array[:, : resolution // 4].mean(), array[:, -resolution // 4 :].mean()
        # 12-bit 3211 is 200 on an 8-bit scale (divided by 65535 it would be 12)
        assert abs(left - 0) < 6 and abs(right - 200) < 6, (dicom_id, left, right)


# --------------------------------------------------------------------------- cached == on the fly


def resize_to_square(path, resolution, mode, reduced_decode):
    return square_images(path, [resolution], mode, reduced_decode)[0][resolution]


@pytest.mark.parametrize("mode", ["squash", "pad"])
@pytest.mark.parametrize("reduced_decode", [True, False])
def test_cached_images_equal_on_the_fly_images(mimic_index, tmp_path, mode, reduced_decode):
    index = mimic_index.iloc[:6]
    build(index, tmp_path / "c", mode=mode, reduced_decode=reduced_decode)
    for resolution in RESOLUTIONS:
        cached = CXRDataset(index, resolution, cache_dir=tmp_path / "c")
        fly = CXRDataset(index, resolution, resize_mode=mode, reduced_decode=reduced_decode)
        assert cached.resize_mode == mode
        for i in range(len(index)):
            expected = np.asarray(resize_to_square(index["path"].iloc[i], resolution, mode, reduced_decode))
            assert np.array_equal(cached[i][0][0].numpy(), expected)
            assert np.array_equal(fly[i][0][0].numpy(), expected)


def test_reduced_decoding_changes_pixels_only_where_the_target_is_at_most_half(mimic_index):
    path = mimic_index["path"].iloc[0]  # 40 x 48
    same = [
        np.array_equal(
            np.asarray(resize_to_square(path, r, "squash", True)),
            np.asarray(resize_to_square(path, r, "squash", False)),
        )
        for r in (16, 20, 24)
    ]
    assert same == [False, False, True]  # 16 and 20 are <= half of 40 x 48; 24 is not


def test_dataset_reads_the_cache_format_from_the_manifest(mimic_index, tmp_path):
    index = mimic_index.iloc[:3]
    build(index, tmp_path / "c", [16], fmt="jpg", mode="pad")
    dataset = CXRDataset(index, 16, cache_dir=tmp_path / "c")
    assert (dataset.cache_format, dataset.resize_mode) == ("jpg", "pad")
    assert dataset[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="format 'jpg', but 'png' was asked for"):
        CXRDataset(index, 16, cache_dir=tmp_path / "c", cache_format="png")
    build(index.iloc[:1], tmp_path / "c", [16], fmt="png", mode="pad")  # one image rebuilt as PNG
    with pytest.raises(ValueError, match="16 px images with format 'jpg' and 'png'$"):
        CXRDataset(index, 16, cache_dir=tmp_path / "c")


@pytest.mark.slow
def test_two_worker_processes_give_the_same_cache(mimic_index, tmp_path):
    build(mimic_index, tmp_path / "one")
    report = build(mimic_index, tmp_path / "two", workers=2)
    assert report.written == 2 * len(mimic_index)
    one = read_manifest(tmp_path / "one").drop(columns="path")
    two = read_manifest(tmp_path / "two").drop(columns="path")
    pd.testing.assert_frame_equal(one, two)
    for path in (tmp_path / "one").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / "two" / path.relative_to(tmp_path / "one")).read_bytes()


# --------------------------------------------------------------------------- command line


def test_cli_round_trip(mimic_index, tmp_path, capsys):
    index_csv = write_index(mimic_index, tmp_path / "index.csv")
    out = tmp_path / "c"
    args = ["--index", str(index_csv), "--out", str(out), "--workers", "1", "--no-progress"]
    assert cache.main([*args, "--resolutions", "16", "32"]) == 0
    assert f"wrote {2 * len(mimic_index)} files" in capsys.readouterr().out
    assert check_cache(mimic_index, out, 16) == [] and check_cache(mimic_index, out, 32) == []
    assert len(check_cache(mimic_index, out, 64)) == len(mimic_index) == 18


def test_cli_fails_on_bad_sources_unless_told_to_drop_them(tmp_path, capsys):
    index_csv = write_index(index_of(write_bad_sources(tmp_path)), tmp_path / "index.csv")
    args = [
        "--index",
        str(index_csv),
        "--out",
        str(tmp_path / "c"),
        "--resolutions",
        "16",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert cache.main(args) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "truncated.jpg") in err and "--drop-bad" in err
    assert cache.main([*args, "--drop-bad"]) == 0
    assert "3 unreadable image(s) dropped" in capsys.readouterr().err
    assert read_index(tmp_path / "c" / "index.cleaned.csv")["dicom_id"].tolist() == ["good", "good2"]
    assert cache.main(["--index", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "c")]) == 1
    assert "index file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- phantom end to end


def test_phantom_to_index_to_folds_to_cache(tmp_path):
    from cxrlib.phantom import make_phantom
    from cxrlib.splits import check_folds, make_folds

    root = make_phantom(tmp_path / "phantom", 8, seed=0, max_size=64, workers=1)
    index = index_from_mimic(root)
    assert index["subject_id"].nunique() == 8 and index[list(FINDINGS)].isin([0.0, 1.0]).all().all()
    folds = make_folds(index, k=3, seed=0)
    check_folds(folds, index)
    report = build(index, tmp_path / "cache", [16, 32])
    assert report.ok and report.written == 2 * len(index)
    assert (
        check_cache(index, tmp_path / "cache", 16) == [] and check_cache(index, tmp_path / "cache", 32) == []
    )
    manifest = read_manifest(tmp_path / "cache").query("resolution == 32").set_index("dicom_id")
    sizes = manifest.loc[index["dicom_id"], ["source_width", "source_height"]].to_numpy()
    np.testing.assert_array_equal(sizes, index[["width", "height"]].to_numpy())  # metadata matches the files
    test_ids = set(folds.loc[folds["role_0"] == "test", "dicom_id"])
    dataset = CXRDataset(index[index["dicom_id"].isin(test_ids)], 32, cache_dir=tmp_path / "cache")
    image, target, mask = dataset[0]
    assert image.shape == (1, 32, 32) and mask.sum() == 14
