"""Phantom generators for the demo, the tests and the benchmarks: lumbar-spine CT (``spine``)."""
