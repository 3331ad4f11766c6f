"""The lab: benchmarks and the quality harness, one module per benchmark (`make bench-*`, entry points
in tools/). It may import every product package; no product package imports it (tests/test_layering.py).
Results land in bench/results/ beside it."""
