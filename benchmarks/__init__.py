"""Benchmarks: hand-written baselines and timing scripts."""
