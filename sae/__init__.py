"""Top-k sparse autoencoders on any (n, d) array: model, losses, training, checkpoints and codes."""
