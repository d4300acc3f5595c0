"""The stages of an image study as cache entries: backbone → store → SAE → codes → studies.

Each ``*_stage`` function returns an ``analysis.run.cache.Stage``: its settings (everything that decides its
output, so part of its key), its parents and the function that builds its directory. The presets
(``analysis.run.presets``) chain them; the studies of other modules (concepts, TTT, theory) are called through
``analysis.run.study_stages``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from analysis.run.cache import Stage, StageResult
from analysis.run.store_stages import encode_store, sae_config_for_store, train_sae_on_store
from artifacts import read_json, sha256_file
from embeddings.extract import ExtractConfig, ExtractRun, extract
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae, sae_hash
from sae.codes import CodeStore
from sae.train import RunConfig, TrainConfig


def data_images(data: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Grey images ``(n, s, s)`` uint8, labels and the split of a CNN data set: the digits or an IDX folder."""
    if data["kind"] == "digits":
        from embeddings.digits import digits_split, load_digits_images

        images, labels = load_digits_images()
        return images, labels, digits_split(labels, seed=data["seed"])
    if data["kind"] == "idx":
        from embeddings.idx import IdxSource

        source = IdxSource(data["dir"], seed=data["seed"])
        return source.images, source.labels, source.split
    raise ValueError(f"no CNN data set of kind {data['kind']!r}")


def cnn_stage(data: dict, width: int, epochs: int, seed: int, device: str) -> Stage:
    """Train the digits CNN family member of ``width`` globally on the data's train split (the paper's MNIST CNN)."""

    def run(out_dir: Path, parents: dict) -> dict:
        from embeddings.cnn import CNNConfig, CNNTrainConfig, save_cnn, train_cnn

        images, labels, split = data_images(data)
        config = CNNConfig(width=width, image_size=int(images.shape[1]), n_classes=int(labels.max()) + 1)
        train = CNNTrainConfig(epochs=epochs)
        model, metrics = train_cnn(config, train, images=images, labels=labels, split=split, seed=seed, device=device)
        save_cnn(model, out_dir, train=train, seed=seed, metrics=metrics)
        return {"n_features": config.n_features, "test_accuracy": metrics.get("test_accuracy"),
                "n_parameters": metrics.get("n_parameters")}

    return Stage("backbone", {"data": data, "width": width, "epochs": epochs, "seed": seed}, run)


def store_stage(source: str, kind: str, seed: int, device: str, backbone: str = "digits-cnn",
                weights: str | None = None, parents: tuple[str, ...] = ("backbone",), batch_size: int = 64,
                progress: bool = False, source_key: dict | None = None) -> Stage:
    """Extract the embeddings of ``source`` with ``backbone``; the weights are the ``backbone`` stage's CNN when
    ``weights`` is None (and the stage's key then follows the CNN's). ``source_key``: what the source holds (a
    folder's fingerprint), so that new contents at the same path change the key."""
    settings = {"source": source, "kind": kind, "seed": seed, "backbone": backbone, "batch_size": batch_size,
                "weights": weights, "weights_sha256": _file_sha(weights), "source_contents": source_key}

    def run(out_dir: Path, done: dict) -> dict:
        w = str(done["backbone"].dir) if weights is None else weights
        config = ExtractConfig(source=source, kind=kind, backbone=backbone, weights=w, seed=seed, batch_size=batch_size)
        store = extract(config, ExtractRun(out_dir=out_dir, device=device, num_workers=0, progress=progress,
                                           chunk_size=max(1024, batch_size * 16)))
        return {"n": store.n, "d": store.d, "content_hash": store.content_hash,
                "split": {k: int(len(v)) for k, v in store.split.items()}}

    return Stage("store", settings, run, parents=parents)


def _file_sha(path: str | None) -> str | None:
    if path is None or path in ("hub", "random") or not Path(path).is_file():
        return None
    return sha256_file(path)


def sae_stage(n_latents: int | None, k: int | None, epochs: float, seed: int, device: str,
              progress: bool = False) -> Stage:
    """Train a top-k SAE on the store's train split (resumes its own checkpoint after a kill)."""

    def run(out_dir: Path, done: dict) -> dict:
        store = EmbeddingStore.open(done["store"].dir)
        config = sae_config_for_store(store.d, len(store.split["train"]), n_latents=n_latents, k=k)
        train_sae_on_store(store, out_dir, config, TrainConfig(n_epochs=epochs, seed=seed),
                           RunConfig(device=device, checkpoint_every=200, progress=progress), resume=True)
        cfg = read_json(out_dir / "config.json")
        return {"n_latents": config.n_latents, "k": config.k, "sae_hash": sae_hash(out_dir),
                "heldout": (cfg.get("metrics") or {}).get("heldout", {})}

    return Stage("sae", {"n_latents": n_latents, "k": k, "epochs": epochs, "seed": seed}, run, parents=("store",))


def imported_sae_stage(sae_dir: str) -> Stage:
    """Use an existing SAE directory (trained elsewhere, or the authors' imported one): copied into the run."""
    settings = {"imported": str(Path(sae_dir).resolve()), "sae_hash": sae_hash(sae_dir)}

    def run(out_dir: Path, done: dict) -> dict:
        shutil.copytree(sae_dir, out_dir)
        model = load_sae(out_dir)
        return {"n_latents": model.config.n_latents, "k": model.config.k, "sae_hash": sae_hash(out_dir),
                "imported_from": settings["imported"]}

    return Stage("sae", settings, run, parents=("store",))


def codes_stage(device: str) -> Stage:
    """Encode every row of the store with the SAE."""

    def run(out_dir: Path, done: dict) -> dict:
        codes = encode_store(done["store"].dir, done["sae"].dir, out_dir, device=device)
        store = EmbeddingStore.open(done["store"].dir)
        quality = sae_quality(store, load_sae(done["sae"].dir, device=device), codes)
        return {"n": codes.n, "k": codes.k, "n_latents": codes.n_latents, "metrics": {"sae": quality}}

    return Stage("codes", {}, run, parents=("store", "sae"))


def open_chain(done: dict[str, StageResult], device: str = "cpu"):
    """The store, the SAE and the codes of finished stages."""
    store = EmbeddingStore.open(done["store"].dir)
    sae = load_sae(done["sae"].dir, device=device)
    codes = CodeStore.open(done["codes"].dir)
    return store, sae, codes


def sae_quality(store: EmbeddingStore, sae, codes: CodeStore, batch_size: int = 4096) -> dict:
    """``fvu``: the SAE's fraction of variance unexplained on the test split (else all rows), as the mean of per-row
    shares ``||x - x̂||² / mean_j ||x_j - x̄||²`` (their mean is the FVU; their SE its uncertainty over rows);
    ``dead_fraction``: the share of latents that fire on no row of the store, with its binomial SE over latents."""
    import torch

    from analysis.stats import accuracy, measure

    rows = np.asarray(store.split.get("test", []))
    rows = rows if rows.size else np.arange(store.n)
    x = np.asarray(store.x[rows], dtype=np.float32)
    total = float(((x - x.mean(0)) ** 2).sum(1).mean())
    residual = []
    device = next(sae.parameters()).device
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size]).to(device)
            recon = sae.decode(*sae.encode(xb))
            residual.append(((xb - recon) ** 2).sum(1).cpu().numpy())
    shares = np.concatenate(residual) / max(total, 1e-30)
    fired = codes.counts() > 0
    where = f"SAE on {'the test split' if store.split.get('test') is not None else 'all rows'} of the store"
    return {"fvu": measure(shares, provenance=where),
            "dead_fraction": accuracy(~fired, provenance=f"latents firing on no row of the {codes.n} encoded rows")}
