"""Store-level stages: the glue between an EmbeddingStore and the store-agnostic ``sae`` package.

``sae/`` trains on and encodes any ``(n, d)`` array; these functions open a store, choose its rows and
record its hash in the child artifact, so that scripts and pipelines share one path.
"""

from __future__ import annotations

import os
from pathlib import Path

from embeddings.store import EmbeddingStore
from sae.batches import choose_rows
from sae.checkpoint import check_compatible, load_sae, read_provenance, sae_hash
from sae.codes import CodeStore, encode_array
from sae.config import SAEConfig
from sae.provenance import store_provenance, warn_if_different
from sae.train import RunConfig, TrainConfig, TrainResult, default_shape, train_sae


def sae_config_for_store(
    d: int,
    n_rows: int | None = None,
    *,
    n_latents: int | None = None,
    expansion: int | None = None,
    k: int | None = None,
    variant: str = "topk",
) -> SAEConfig:
    """The SAE shape for ``n_rows`` training embeddings of width ``d``: explicit values win, else
    ``default_shape`` (the paper's 4096 latents, k=16 for 512-d CLIP; narrower on small data)."""
    if n_latents is not None and expansion is not None:
        raise ValueError("pass --n-latents or --expansion, not both")
    default_latents, default_k = default_shape(d, n_rows)
    if expansion is not None:
        if expansion < 1:
            raise ValueError(f"--expansion must be >= 1, got {expansion}")
        n_latents = expansion * d
    n_latents = default_latents if n_latents is None else n_latents
    k = min(default_k, n_latents) if k is None else k
    if variant == "paper":
        return SAEConfig.paper(d_in=d, n_latents=n_latents, k=k)
    if variant != "topk":
        raise ValueError(f"--variant must be topk or paper, got {variant!r}")
    return SAEConfig(d_in=d, n_latents=n_latents, k=k)


def train_sae_on_store(
    store: EmbeddingStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    sae_config: SAEConfig | None = None,
    config: TrainConfig = TrainConfig(),
    run: RunConfig = RunConfig(),
    *,
    split: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verify_store: bool = True,
) -> tuple[TrainResult, str]:
    """Train an SAE on a store's training split (held-out metrics on val, else test, else a seeded slice).

    ``store`` is an open store or its directory. Returns the training result and the name of the held-out rows.
    ``verify_store``: first check the store's files against the content hash the SAE records as its parent
    (``EmbeddingStore.verify``; reads every byte once, so huge stores may skip it).
    """
    if not isinstance(store, EmbeddingStore):
        store = EmbeddingStore.open(store)
    if verify_store:
        store.verify()
    train_rows, heldout_rows, heldout_name = choose_rows(store.n, store.split, split, seed=config.seed)
    sae_config = sae_config_for_store(store.d, train_rows.size) if sae_config is None else sae_config
    check_compatible(sae_config, store.d, f"store {store.store_dir}")
    result = train_sae(
        store.x,
        out_dir,
        sae_config,
        config,
        run,
        train_rows=train_rows,
        heldout_rows=heldout_rows,
        parent_store_hash=store.content_hash,
        provenance=store_provenance(store.meta),
        resume=resume,
        overwrite=overwrite,
    )
    return result, heldout_name


def encode_store(
    store_dir: str | os.PathLike,
    sae_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 4096,
    device: str = "cpu",
    overwrite: bool = False,
    verify_store: bool = True,
) -> CodeStore:
    """Encode every row of a store with a trained SAE into a CodeStore that records both parents' hashes
    (``verify_store``: after checking the store's files against its recorded hash, as ``train_sae_on_store``)."""
    store = EmbeddingStore.open(store_dir, verify=verify_store)
    model = load_sae(sae_dir, device=device)
    warn_if_different(read_provenance(sae_dir), store_provenance(store.meta), str(sae_dir), str(store_dir))
    parents = {
        "sae_dir": str(Path(sae_dir)),
        "sae_hash": sae_hash(sae_dir),
        "store_dir": str(Path(store_dir)),
        "store_hash": store.content_hash,
    }
    return encode_array(model, store.x, out_dir, batch_size=batch_size, parents=parents, overwrite=overwrite)
