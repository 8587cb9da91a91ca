"""Side-by-side performance measurements; run `python -m benchmarks --help`."""
