"""Whether an SAE and its codes belong to a store: refused by name when they do not, so that no study pairs rows
with another store's concepts; and the codes of a store encoded in memory when no CodeStore was written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from analysis.sae_record import as_record
from analysis.spaces import codes_from_arrays
from artifacts import ArtifactError, read_json
from embeddings.store import EmbeddingStore
from sae.codes import CodeStore

if TYPE_CHECKING:  # the checks read the SAE's record (analysis.sae_record): torch loads only to encode
    from sae.model import TopKSAE


def codes_in_memory(store: EmbeddingStore, sae: TopKSAE, batch_size: int = 4096) -> CodeStore:
    """Encode every row of ``store`` into an in-memory CodeStore (no directory): ``--codes`` left out."""
    import torch

    as_record(sae).check_width(store.d, f"store {store.store_dir}")
    values = np.empty((store.n, sae.config.k), dtype=np.float32)
    indices = np.empty((store.n, sae.config.k), dtype=np.int32)
    with torch.no_grad():
        for start in range(0, store.n, batch_size):
            v, i = sae.encode(torch.from_numpy(np.array(store.x[start : start + batch_size], np.float32)))
            values[start : start + len(v)], indices[start : start + len(v)] = v.numpy(), i.numpy()
    return codes_from_arrays(values, indices, sae.config.n_latents, meta={"store_hash": store.content_hash})


def check_parents(store: EmbeddingStore, sae, codes: CodeStore | None) -> list[str]:
    """Refuse an SAE (a ``TopKSAE`` or its ``SAERecord``) or codes that do not belong to ``store``; returns notes
    on what is merely different."""
    as_record(sae).check_width(store.d, f"store {store.store_dir}")
    notes = []
    source = as_record(sae).source_dir
    if source is not None:
        config = read_json(Path(source) / "config.json")
        provenance = config.get("provenance") or {}
        backbone = provenance.get("backbone")
        if backbone and store.meta.get("backbone") and backbone != store.meta["backbone"]:
            raise ArtifactError(f"SAE {source} was trained on {backbone!r} embeddings, but store {store.store_dir} "
                                f"holds {store.meta['backbone']!r} embeddings; use an SAE trained on this backbone")
        if config.get("parent_store_hash") not in (None, store.content_hash):
            notes.append(f"the SAE was trained on another store ({config['parent_store_hash'][:12]}...) of width "
                         f"{store.d}")
    if codes is not None:
        check_codes(store, sae, codes)
    return notes


def check_codes(store: EmbeddingStore, sae, codes: CodeStore) -> None:
    """Refuse codes encoded from another store or with another SAE (a ``TopKSAE`` or its ``SAERecord``): they
    would pair rows with other concepts."""
    source = as_record(sae).source_dir
    if codes.meta.get("store_hash") not in (None, store.content_hash):
        raise ArtifactError(f"codes {codes.codes_dir} were encoded from another store, not {store.store_dir}; "
                            f"re-encode: scripts/encode.py --store {store.store_dir} --sae SAE_DIR --out CODES_DIR")
    if source is not None and codes.meta.get("sae_hash") not in (None, as_record(sae).weights_hash()):
        raise ArtifactError(f"codes {codes.codes_dir} were encoded with another SAE, not {source}; re-encode them")
    if codes.n != store.n:
        raise ArtifactError(f"codes {codes.codes_dir} have {codes.n} rows, store {store.store_dir} {store.n}")


def inputs_hash(store: EmbeddingStore, sae: TopKSAE | None, codes: CodeStore | None) -> str:
    """One SHA-256 of everything a study on ``store`` (and an SAE and its codes) reads: the store's content hash,
    the SAE's weights hash (from its directory, or of its tensors when it has none) and the codes' parents. A
    cached head or chunk keyed by it is never reused with other inputs of the same shape."""
    from sae.checkpoint import sae_hash

    parts = {"store": store.content_hash, "sae": None, "codes": None}
    if sae is not None:
        source = getattr(sae, "source_dir", None)
        if source is not None:
            parts["sae"] = sae_hash(source)
        else:
            digest = hashlib.sha256()
            for name, tensor in sorted(sae.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            parts["sae"] = digest.hexdigest()
    if codes is not None:
        parts["codes"] = {k: codes.meta.get(k) for k in ("sae_hash", "store_hash", "n", "k", "n_latents")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
