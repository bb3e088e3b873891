# The training engine: trainer, parallelism, optimizer, checkpoints, metrics.
"""olavlm.train: the step loop and what it needs (see docs/train.md)."""
