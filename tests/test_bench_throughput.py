"""The throughput benchmark's functions on the CPU: step planning, the timed batch wrapper, the
sources of the cache rate, the report's ratios and goals, the compile time limit, and one tiny
run through the trainer's own loops. Not a timed test: no speed is asserted."""

import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_data import make_tiny_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_throughput as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_steps_follow_the_ceiling_and_stay_within_bounds():
    assert bench.expected_rate(bench.CEILING_TRAIN_IMG_S, 512) == 553
    assert bench.expected_rate(bench.CEILING_TRAIN_IMG_S, 128) == 1680 * 4  # pixel count from 256 px
    assert bench.planned_steps(2.0, 1680, 256) == 14  # ceil(2 s x 1680 img/s / 256)
    assert bench.planned_steps(2.0, 34, 8, minimum=5) == 9
    assert bench.planned_steps(0.01, 34, 8, minimum=5) == 5
    assert bench.planned_steps(1000, 7365, 1, maximum=200) == 200


def test_timed_batches_hand_out_warmup_plus_steps_and_time_only_the_steps():
    def slow_forever():
        number = 0
        while True:
            time.sleep(0.05 if number < 2 else 0.0)  # the two warm-up batches are slow
            yield number
            number += 1

    timed = bench.TimedBatches(slow_forever(), warmup=2, steps=3, device=torch.device("cpu"), batch_size=4)
    assert len(timed) == 5 and len(timed.sampler) == 20
    assert list(timed) == [0, 1, 2, 3, 4]
    assert 0 <= timed.seconds() < 0.05  # the slow warm-up is not in the clock
    short = bench.TimedBatches(iter([1, 2]), warmup=2, steps=1, device=torch.device("cpu"), batch_size=1)
    assert list(short) == [1, 2]
    with pytest.raises(RuntimeError, match="nothing was timed"):
        short.seconds()
    with pytest.raises(ValueError, match="steps >= 1"):
        bench.TimedBatches([], warmup=0, steps=0, device=torch.device("cpu"), batch_size=1)


def test_cache_sources_are_the_native_portrait_images_repeated_under_new_ids():
    index = pd.DataFrame(
        {
            "dicom_id": ["a", "b", "c"],
            "path": ["a.jpg", "b.jpg", "c.jpg"],
            "width": [2539, 2000, 2500],
            "height": [3056, 2000, 3050],
        }
    )
    rows, note = bench.native_sources(index, 5)
    assert rows["path"].tolist() == ["a.jpg", "c.jpg", "a.jpg", "c.jpg", "a.jpg"]  # 2000 x 2000 left out
    assert rows["dicom_id"].is_unique and len(rows) == 5
    assert "2 distinct source" in note and "(2500, 3050)" in note
    square_only, note = bench.native_sources(index.iloc[[1]], 2)  # no portrait image: take what there is
    assert square_only["path"].tolist() == ["b.jpg", "b.jpg"] and "(2000, 2000)" in note


def records(**rates):
    rows = []
    for variant, (resolution, img_s, batch) in rates.items():
        rows.append({"part": "pipeline", "resolution": resolution, "variant": variant.replace("_", " "),
                     "batch": batch, "img_s": img_s})  # fmt: skip
    return rows


def test_report_computes_the_ratios_and_says_which_goals_are_met():
    rows = records(
        **{"train_model-only": (256, 1000.0, 256), "train_end-to-end": (256, 950.0, 256)},
        **{"infer_model-only": (256, 8000.0, 512), "infer_end-to-end": (256, 3000.0, 512)},
    )
    rows += [
        {"part": "pipeline", "resolution": 2048, "variant": "train model-only", "batch": 7, "img_s": 30.0},
        {"part": "pipeline", "resolution": 2048, "variant": "train end-to-end", "batch": 7, "img_s": 20.0},
        {"part": "pipeline", "resolution": 2048, "variant": "infer end-to-end", "batch": 14, "img_s": 40.0},
        {"part": "memory", "resolution": 2048, "variant": "train", "batch": 8, "img_s": 30.0,
         "peak_gib": 42.0},
        {"part": "memory", "resolution": 2048, "variant": "train memory_efficient", "batch": 8, "img_s": 24.0,
         "peak_gib": 25.0},
        {"part": "cache", "resolution": 256, "variant": "build_cache from native JPEGs", "workers": 16,
         "img_s": 450.0},
        {"part": "compile", "variant": "status", "note": "skipped: compiling took longer than 150 s"},
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=list(bench.COLUMNS))
    table = bench.pipeline_table(frame).set_index("px")
    assert table.loc[256, "e2e/model"] == pytest.approx(0.95) and table.loc[256, ">=0.9"] == "met"
    assert table.loc[2048, "e2e/model"] == pytest.approx(2 / 3) and table.loc[2048, ">=0.9"] == "NOT met"
    assert table.loc[256, "x paper"] == pytest.approx(3000 / 65) and table.loc[256, ">=50x"] == "NOT met"
    assert table.loc[2048, "x paper"] == pytest.approx(40 / (4 / 6)) and table.loc[2048, ">=50x"] == "met"
    lines = "\n".join(bench.goal_lines(frame))
    assert "memory (2048 px, batch 8)" in lines and "(-20%)" in lines and "goal <= 40 GB: met" in lines
    assert "450 img/s (goal >= 400 on 16 cores: met)" in lines
    assert "compile: skipped: compiling took longer than 150 s" in lines
    report = bench.format_report(frame, {"device": "test device"})
    assert report.startswith("device: test device") and "e2e/model" in report


@pytest.mark.slow
def test_saved_activations_shrink_with_checkpointing_and_double_in_float32():
    cpu = torch.device("cpu")
    plain = bench.saved_gib_per_image(32, 2, cpu, torch.bfloat16, memory_efficient=False)
    checkpointed = bench.saved_gib_per_image(32, 2, cpu, torch.bfloat16, memory_efficient=True)
    float32 = bench.saved_gib_per_image(32, 2, cpu, None, memory_efficient=False)
    assert 0 < checkpointed < 0.6 * plain
    assert 1.7 * plain < float32 < 2.1 * plain


@pytest.mark.slow
def test_compile_child_past_its_time_limit_is_stopped_and_recorded(tmp_path):
    args = bench.get_args_parser().parse_args(
        ["--device", "cpu", "--compile-backend", "eager", "--compile-resolutions", "32", "--steps", "1"]
    )
    results = bench.Results(tmp_path / "r.csv", tmp_path / "r.json", {})
    started = time.perf_counter()
    bench.run_compile_child(args, results, timeout=1.0)
    assert time.perf_counter() - started < 30
    assert results.records[-1]["note"] == "skipped: compiling took longer than 1 s"
    assert pd.read_csv(tmp_path / "r.csv")["note"].iloc[-1].startswith("skipped")


@pytest.mark.slow
def test_tiny_cpu_run_through_the_trainer_writes_every_measurement(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32, 64), subjects=6)
    out = tmp_path / "bench" / "throughput.csv"
    argv = [
        "--device", "cpu", "--resolutions", "32", "64", "--parts", "pipeline", "memory",
        "--cache", str(data.cache), "--index", str(data.index), "--batch-size", "2", "--memory-batch", "2",
        "--steps", "1", "--warmup", "0", "--workers", "1", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    frame = pd.read_csv(out)
    pipeline = frame[frame["part"] == "pipeline"]
    assert sorted(pipeline["resolution"].unique()) == [32, 64]
    assert set(pipeline["variant"]) == {
        "train model-only", "train end-to-end", "loading only", "infer model-only", "infer end-to-end",
    }  # fmt: skip
    assert (pipeline["img_s"] > 0).all() and pipeline["img_s"].map(math.isfinite).all()
    assert set(frame[frame["part"] == "memory"]["variant"]) == {"train", "train memory_efficient"}
    assert not frame["note"].astype(str).str.startswith(("failed", "out of")).any()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["environment"]["device"].startswith("cpu") and len(saved["records"]) == len(frame)
    assert set(saved["part_seconds"]) == {"data", "pipeline", "memory"}
    summary = out.with_suffix(".txt").read_text()
    assert "e2e/model" in summary and "memory (64 px, batch 2)" in summary
