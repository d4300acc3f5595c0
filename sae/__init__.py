"""Top-k sparse autoencoders on any (n, d) array: model, losses, training, checkpoints and codes."""

import artifacts.threads  # noqa: E402,F401  (sleeping OpenMP threads, before torch loads)
