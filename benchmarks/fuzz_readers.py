"""Fuzz every reader with a few thousand malformed files and print the counts per reader.

The cases are those of ``tests/test_fuzz_readers.py`` (``tests/fuzz_inputs.py``), drawn afresh
(not derandomized) ``--examples`` times per reader. Each must end in a valid index or in one
``DataError`` naming the file; anything else stops the run with hypothesis's smallest example.

Usage::

    python benchmarks/fuzz_readers.py --examples 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_inputs import OUTCOMES, READERS, case, run_case, shared_images  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def fuzz(name: str, shared: Path, examples: int) -> None:
    """Run ``examples`` cases of one reader, counting the outcomes in ``OUTCOMES[name]``."""
    reader = READERS[name]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data):
        files = data.draw(case(reader, shared))
        OUTCOMES[name][run_case(reader, files, shared, data.draw(st.sampled_from(["multi", "columns"])))] += 1

    check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="cases per reader (default 1000)")
    parser.add_argument("--readers", nargs="*", default=sorted(READERS), choices=sorted(READERS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        shared = shared_images(Path(folder))
        print(f"{'reader':10s} {'cases':>6s} {'valid index':>12s} {'one-line error':>15s} {'seconds':>8s}")
        for name in args.readers:
            start = time.perf_counter()
            fuzz(name, shared, args.examples)
            counts = OUTCOMES[name]
            print(
                f"{name:10s} {sum(counts.values()):6d} {counts['index']:12d} {counts['error']:15d} "
                f"{time.perf_counter() - start:8.1f}",
                flush=True,
            )
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    print(f"all {total} cases ended in a valid index or a one-line DataError")
    return 0


if __name__ == "__main__":
    sys.exit(main())
