"""Atomic writes leave the previous file intact when writing fails."""

import pandas as pd
import pytest

from cxrlib.fileio import atomic_write, write_csv_atomic


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "table.csv"
    write_csv_atomic(pd.DataFrame({"a": [1]}), target)
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("disk full")
    assert pd.read_csv(target)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
