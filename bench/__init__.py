"""Benchmark scripts (run them as ``python bench/<name>.py``; see BENCHMARKS.md)."""
