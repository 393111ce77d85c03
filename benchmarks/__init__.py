"""Benchmarks: measured figures (speed, quality), kept apart from the tests."""
