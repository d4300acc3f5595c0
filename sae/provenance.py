"""Provenance of an SAE: what its training embeddings were, and a warning when it meets embeddings made otherwise.

An SAE's latents are directions in one backbone's embedding space: the same width does not make two spaces the
same (a ResNet's 512-d pre-logits are not CLIP's 512-d projection, and un-normalised CLIP embeddings sit on
another scale than L2-normalised ones). So every SAE records, in ``config.json`` "provenance", the parent
store's backbone name, output kind, normalisation, preprocessing and width, and using it on a store whose record
differs warns. This module takes plain dicts (a store's ``meta.json``), so ``sae/`` stays free of
``embeddings/``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

PROVENANCE_KEYS = ("backbone", "output_kind", "normalize", "preprocessing", "d")
"""What a provenance record holds (any may be ``None`` when unknown)."""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PAPER_PROVENANCE: dict[str, Any] = {
    # The paper's recipe (embeddings/recipes.py, "paper-clip-vit-b16"; a test keeps the two equal): OpenAI's
    # QuickGELU CLIP, the short side resized to 256, a 224 centre crop, CLIP's mean and std.
    "backbone": "paper-clip-vit-b16",
    "description": "OpenAI CLIP ViT-B/16 (QuickGELU) image embeddings (the 512-d projection), L2-normalised",
    "output_kind": "head",
    "normalize": True,
    "preprocessing": {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "crop_pct": 224 / 256,
        "crop_mode": "center",
        "resize_short_side": 256,
        "recipe": "paper-clip-vit-b16",
        "model": "vit_base_patch16_clip_quickgelu_224.openai",
    },
    "d": 512,
    "source": "the authors' release (patrikwolf/clip-topk-sae), trained on ImageNet CLIP embeddings",
}
"""What the authors' released SAE was trained on (the paper, Sec. 4: CLIP ViT-B/16 embeddings of ImageNet)."""


class ProvenanceWarning(UserWarning):
    """An SAE is used on embeddings made differently from those it was trained on."""


def store_provenance(store_meta: dict) -> dict:
    """The provenance record of a store, from its ``meta.json`` (as written by the extraction stage)."""
    backbone = store_meta.get("backbone")
    info = store_meta.get("backbone_info") or {}
    if isinstance(backbone, dict):  # tolerate a nested record
        info, backbone = backbone, backbone.get("name")
    return {
        "backbone": backbone,
        "output_kind": store_meta.get("output_kind", info.get("output_kind")),
        "normalize": store_meta.get("normalize", info.get("normalize")),
        "preprocessing": store_meta.get("preprocessing", info.get("preprocessing")),
        "d": store_meta.get("d", info.get("d")),
    }


def provenance_differences(sae_record: dict | None, store_record: dict | None) -> list[str]:
    """What differs between the SAE's training provenance and a store's, one line per field.

    Only fields both records know are compared (an SAE trained on a plain array knows none), and numbers in
    the preprocessing compare with a relative tolerance of 1e-6 (JSON round trips of float32 means).
    """
    if not sae_record or not store_record:
        return []
    diffs = []
    for key in PROVENANCE_KEYS:
        a, b = sae_record.get(key), store_record.get(key)
        if a is None or b is None:
            continue
        if key == "preprocessing" and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) & set(b)):
                if not _same(a[sub], b[sub]):
                    diffs.append(f"preprocessing.{sub}: SAE trained on {a[sub]!r}, store has {b[sub]!r}")
        elif not _same(a, b):
            diffs.append(f"{key}: SAE trained on {a!r}, store has {b!r}")
    return diffs


def warn_if_different(sae_record: dict | None, store_record: dict | None, sae_name: str, store_name: str) -> list[str]:
    """Warn (``ProvenanceWarning``) when the SAE meets a store made differently; return the differences."""
    diffs = provenance_differences(sae_record, store_record)
    if diffs:
        warnings.warn(
            f"SAE {sae_name} was trained on embeddings made differently from store {store_name}:\n  "
            + "\n  ".join(diffs)
            + "\nIts concepts may not mean the same on these embeddings; extract the store with the SAE's "
            "backbone and settings, or train an SAE on this store (scripts/train_sae.py).",
            ProvenanceWarning,
            stacklevel=2,
        )
    return diffs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b
