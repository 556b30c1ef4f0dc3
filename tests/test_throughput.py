"""Table 2 on the CPU: a well-formed table from the trainer's real step, written atomically."""

import math

import pandas as pd
import pytest
from tiny_data import make_tiny_dataset

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
