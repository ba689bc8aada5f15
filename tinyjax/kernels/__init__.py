"""The model's memory-critical kernels: attention implementations (attention.py) and the blockwise loss (loss.py)."""
