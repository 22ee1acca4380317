"""Benchmarks: ``python -m bench.solver`` and ``python -m bench.pipeline``."""
