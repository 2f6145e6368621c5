"""Benchmarks of rst_optax; run each from the repository root as
``python -m benchmarks.<name>``."""
