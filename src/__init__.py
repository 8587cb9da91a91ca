"""Ivy: the data-acquisition supervisor of one sensor station."""

import os

# tum-esm-utils imports all of its submodules (asyncio, plotting helpers, ...)
# unless told not to; Ivy imports the two it uses by name. Measured with
# `python -m benchmarks footprint`: about 1 MiB less per station.
os.environ.setdefault("TUM_ESM_UTILS_EXPLICIT_IMPORTS", "1")
