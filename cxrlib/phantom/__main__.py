"""``python -m cxrlib.phantom``: write a phantom dataset (see :func:`cxrlib.phantom.writer.main`)."""

from .writer import main

if __name__ == "__main__":
    raise SystemExit(main())
