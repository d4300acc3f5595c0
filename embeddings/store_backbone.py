"""The backbone a store was extracted with, rebuilt from the store's own record, to embed new images like its rows.

A store records the backbone's name, output kind and normalisation (``meta.json``), its weights (``config.json``
"weights": ``hub``, ``random`` or a file) and their SHA-256 (of the file, or of the tensors when there is none).
Random weights are drawn from the seed the store records (``meta.json`` "weights_seed"; stores written before it
was recorded drew them from ``config.json`` "seed"), so the rebuilt network is the one that made the store, and
its SHA-256 is checked against the record before it is used.
"""

from __future__ import annotations

import torch

from artifacts import ArtifactError
from embeddings.backbone import Backbone, WeightsError, load_backbone
from embeddings.store import EmbeddingStore
from embeddings.weights import state_sha256


def weights_seed(store: EmbeddingStore) -> int:
    """The seed the store's random weights were drawn from (0 for stores that record none)."""
    for record in (store.meta, store.meta.get("backbone_info"), store.config):
        key = "seed" if record is store.config else "weights_seed"
        value = record.get(key) if isinstance(record, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def load_store_backbone(store: EmbeddingStore, device: str | torch.device = "cpu") -> Backbone:
    """The frozen backbone, weights and preprocessing ``store`` was extracted with.

    Refuses, naming the store, a store that does not record them, weights that can't be loaded here, and rebuilt
    weights whose SHA-256 differs from the recorded one (a weights file changed since, or a record edited).
    """
    meta, config = store.meta, store.config
    name, weights = meta.get("backbone"), config.get("weights")
    if not isinstance(name, str) or not isinstance(weights, str):
        raise ArtifactError(
            f"store {store.store_dir} does not record its backbone and weights (meta.json 'backbone', config.json "
            f"'weights'); it was not made by scripts/extract.py, so new images cannot be embedded like its rows"
        )
    try:
        backbone = load_backbone(name, weights, output=meta.get("output_kind", "auto"),
                                 normalize=meta.get("normalize"), device=device, seed=weights_seed(store))
    except WeightsError as e:
        raise ArtifactError(f"the backbone weights of store {store.store_dir} cannot be loaded: {e}") from e
    recorded = meta.get("weights_sha256")
    rebuilt = backbone.info.get("weights_sha256") or state_sha256(backbone.model)
    if recorded and rebuilt != recorded:
        raise ArtifactError(
            f"the backbone rebuilt from {store.store_dir / 'meta.json'} ({name}, weights {weights}) is not the one "
            f"the store was extracted with: its weights hash to {rebuilt[:16]}..., the store records "
            f"{str(recorded)[:16]}...; use the weights the store was made with, or extract the store again"
        )
    return backbone
