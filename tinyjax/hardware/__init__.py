"""Devices and what they hold: memory (per-device bytes, fits, the analytic plan), targets (named GPUs and Cloud TPU
slices) and aot (the train step compiled for a target by its own compiler, in a child process)."""
