"""Timing and memory benchmarks: each measures the app beside what a user would pick instead,
in one run (``python -m benchmarks.NAME``; benchmarks/README.md)."""
