"""Builders of tiny random models saved in the real on-disk formats (tests, benchmarks, smoke demos)."""
