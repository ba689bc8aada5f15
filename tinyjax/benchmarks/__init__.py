"""Benchmarks run by hand (not tests): python -m tinyjax.benchmarks.NAME."""
