"""Benchmarks runnable as `python -m big_transfer.benchmarks.NAME`."""
