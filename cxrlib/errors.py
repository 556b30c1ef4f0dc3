"""The one error type of bad input data: a message of one line naming the file, column and line.

Every reader of the project's input files (the dataset readers of :mod:`cxrlib.readers` and
:mod:`cxrlib.nih`, :func:`cxrlib.index.read_index`, :func:`cxrlib.splits.read_folds`) raises
:class:`DataError` (a ``ValueError``) for a file it cannot use, and :class:`DataFileNotFound`
(also a ``FileNotFoundError``) for a file that is not there; the command lines print it as one
line. Anything else escaping a reader is a bug.
"""

from __future__ import annotations


class DataError(ValueError):
    """An input file that cannot be used; the message is one line naming the file (and the column
    and CSV line where there is one)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class DataFileNotFound(DataError, FileNotFoundError):
    """A file an input names, or the input itself, is not there."""


def location(source: object, column: str | None = None, line: int | None = None) -> str:
    """``file, column 'c', line 7``: where a problem is, for the start of a message."""
    parts = [str(source)]
    if column is not None:
        parts.append(f"column {column!r}")
    if line is not None:
        parts.append(f"line {line}")
    return ", ".join(parts)
