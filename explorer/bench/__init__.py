"""Benchmarks: `python -m explorer.bench <name>` prints a table measured in one run."""
