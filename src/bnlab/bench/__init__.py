"""Benchmarks: speed measured as ratios inside one run, never as absolute numbers in tests."""
