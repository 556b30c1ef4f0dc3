"""Property-based fuzzing of every reader (MIMIC, CheXpert, NIH, CSV, index, folds): each malformed
file ends in a valid index or in one clear ``DataError`` naming the file; never a traceback from
inside pandas, never a half-written output.

``CXRLIB_FUZZ_EXAMPLES`` sets the cases per reader (default 40, a few seconds each);
``benchmarks/fuzz_readers.py`` runs a few thousand and prints the counts per reader.
"""

from __future__ import annotations

import os

import pytest
from fuzz_inputs import OUTCOMES, READERS, case, run_case, shared_images, to_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrlib.datasets import main

EXAMPLES = int(os.environ.get("CXRLIB_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_images(tmp_path_factory.mktemp("fuzz_images"))


@pytest.mark.parametrize("name", sorted(READERS))
def test_malformed_files_end_in_an_index_or_one_line_error(name, shared):
    reader = READERS[name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data):
        files = data.draw(case(reader, shared))
        mode = data.draw(st.sampled_from(["multi", "columns"]))
        OUTCOMES[name][run_case(reader, files, shared, mode)] += 1

    check()
    counts = OUTCOMES[name]
    print(f"{name}: {sum(counts.values())} cases, {counts['index']} valid indexes, {counts['error']} errors")
    assert counts["error"] > 0  # the mutations do reach the checks


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_base_is_a_valid_input(name, shared):
    reader = READERS[name]
    files = {file: to_bytes(table) for file, table in reader.base(shared).items()}
    for mode in ("multi", "columns"):
        assert run_case(reader, files, shared, mode) == "index"


@pytest.mark.parametrize("dataset", ["mimic", "chexpert", "nih"])
def test_command_line_error_leaves_no_output(dataset, shared, tmp_path, capsys):
    reader = READERS[dataset]
    for link in reader.links:
        os.symlink(shared / link, tmp_path / link)
    for file, table in reader.base(shared).items():
        (tmp_path / file).write_bytes(to_bytes(table)[:-20] + b'\xff"')  # cut, a stray quote, not UTF-8
    out = tmp_path / "out" / "index.csv"
    assert main(["--dataset", dataset, "--data-root", str(tmp_path), "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and str(tmp_path) in error
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
