"""Concept analysis on SAE codes: neighbours, sharing statistics, local test-time training, reports."""
