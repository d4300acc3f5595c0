"""Frozen-backbone feature extraction: data sources, backbones and the on-disk EmbeddingStore."""
