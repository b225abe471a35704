"""Phantom generators for the demo, the tests and the benchmarks: lumbar-spine CT (``spine``) and
longitudinal carotid vessel-wall MR with plaque truth (``carotid``)."""
