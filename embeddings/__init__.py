"""Frozen-backbone feature extraction: data sources, backbones and the on-disk EmbeddingStore."""

import artifacts.threads  # noqa: E402,F401  (sleeping OpenMP threads, before torch loads)
