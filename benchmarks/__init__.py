"""Benchmarks and experiment helpers for autoalign (model zoo, training scripts)."""
