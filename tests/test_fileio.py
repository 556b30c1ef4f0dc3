"""Atomic writes leave the previous file intact when writing fails."""

import pandas as pd
import pytest

from cxrlib.fileio import DataError, atomic_write, read_header, write_csv_atomic


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "table.csv"
    write_csv_atomic(pd.DataFrame({"a": [1]}), target)
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("disk full")
    assert pd.read_csv(target)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


@pytest.mark.parametrize(("text", "message"), [("a,b,a\n", "column 'a' appears twice"), (",\n", "no header")])
def test_a_header_with_a_repeated_or_no_column_name_is_one_line_naming_the_file(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=f"t.csv: line 1: .*{message}"):
        read_header(tmp_path / "t.csv")
