"""Table 2 on the CPU: a well-formed table from the trainer's real step, written atomically."""

import math
import warnings

import pandas as pd
import pytest
import torch
from tiny_data import make_tiny_dataset

from cxrlib import throughput
from cxrlib.throughput import COLUMNS, measure_throughput, write_table2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_cpu_table_is_well_formed_and_says_it_is_small(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    table = measure_throughput([32, 64], steps=2, cache_dir=data.cache, index=data.frame, load_images=16)
    assert list(table.columns) == list(COLUMNS)
    assert table["resolution"].tolist() == [32, 64]
    assert (table["batch"] == 4).all() and table["device"].str.startswith("cpu").all()
    for column in ("train_img_s", "infer_img_s", "load_img_s"):
        assert (table[column] > 0).all() and table[column].map(math.isfinite).all(), column
    assert table["peak_mem_gib"].isna().all()  # no GPU memory to report on a CPU
    assert table["note"].str.contains("CPU: batch 4, 2 timed steps").all()
    path = write_table2(table, tmp_path / "tables" / "table2_throughput.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path, keep_default_na=True), table, check_dtype=False)
    with pytest.raises(ValueError, match="lacks column"):
        write_table2(table.drop(columns="infer_img_s"), path)


def test_loading_rate_is_nan_without_a_cache():
    table = measure_throughput([32], steps=1, warmup=0, batch_sizes=[2])
    assert table.loc[0, "batch"] == 2 and math.isnan(table.loc[0, "load_img_s"])


def test_loading_is_timed_on_the_trainers_warm_pinned_persistent_loader_over_4_batches_per_worker(
    tmp_path, monkeypatch
):
    data = make_tiny_dataset(tmp_path / "data", resolutions=(32,), subjects=6)
    made, real = [], throughput.make_loader
    monkeypatch.setattr(
        throughput, "make_loader", lambda *args, **kw: made.append(real(*args, **kw)) or made[-1]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a machine without a GPU has nothing to pin for
        rate = throughput.measure_loading(data.frame, data.cache, 32, 4, 2, torch.device("cuda"), images=6)
    (loader,) = made  # the trainer's loader: pinned for the GPU, its workers kept between passes
    assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2
    assert len(loader) == 4 * 2 and loader.batch_size == 4 and rate > 0  # 32 images, repeated


def test_the_model_is_measured_with_the_trainers_cudnn_autotuning_and_layout(monkeypatch):
    seen = []

    def measure_model(*settings):
        seen.append((torch.backends.cudnn.benchmark, settings[-1]))
        return {"train_img_s": 1.0, "infer_img_s": 1.0, "peak_mem_gib": math.nan}

    monkeypatch.setattr(throughput, "measure_model", measure_model)
    before = torch.backends.cudnn.benchmark
    measure_throughput([32], "cpu", cudnn_benchmark=True, channels_last="on")
    measure_throughput([32], "cpu", cudnn_benchmark=False)
    assert seen == [(True, True), (False, False)] and torch.backends.cudnn.benchmark == before
