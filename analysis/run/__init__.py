"""One-command runs: the content-keyed stage cache, the store-level stages, the image chain, the study stages and
the presets. Entry points: ``presets.reproduce``, ``cache.StageCache``, ``store_stages.encode_store``."""
