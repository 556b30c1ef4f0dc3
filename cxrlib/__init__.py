"""cxrlib: helpers for studying the effect of image resolution on chest X-ray classification.

The numbered notebooks in ``notebooks/`` call this package; every step is also a
command (``python -m cxrlib.<module> --help``). See docs/architecture.md for the data flow.
"""

__version__ = "0.1.0"
