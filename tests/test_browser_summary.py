"""Without Chromium, the test summary says in one line that the browser tests were skipped and how to
install Chromium (tests/conftest.py), instead of counting them among the skips silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a pytest run of its own (about 30 s on 2 cores)
def test_the_summary_says_the_browser_tests_need_chromium(tmp_path):
    missing = tmp_path / "no-chromium"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py"],
        cwd=ROOT,
        env={**os.environ, "CXR_CHROMIUM": str(missing)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "browser tests skipped" in line]
    assert lines == [
        f"4 browser tests skipped: no Chromium at {missing}; install it (Debian: apt-get install chromium) "
        "or set CXR_CHROMIUM to its path"
    ], result.stdout
