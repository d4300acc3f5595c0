"""The default end-to-end run on the bundled digits: backbone → store → SAE → codes → summary.

Every stage writes its own artifact directory under ``out_dir`` and is skipped when that artifact is
already complete, so an interrupted run continues where it stopped when the same command runs again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from artifacts import read_json, write_json
from analysis.stages import encode_store, sae_config_for_store, train_sae_on_store
from embeddings.cnn import CNNConfig, CNNTrainConfig, save_cnn, train_cnn
from embeddings.extract import ExtractConfig, ExtractRun, extract
from sae.codes import CodeStore
from sae.train import RunConfig, TrainConfig


@dataclass(frozen=True)
class DigitsRunConfig:
    """Algorithm settings of the default digits run."""

    cnn_width: int = 8
    """Channels of the digits CNN; its embedding width is 25 × this (--cnn-width)."""
    cnn_epochs: int = 20
    """Global training epochs of the digits CNN (--cnn-epochs)."""
    sae_n_latents: int | None = None
    """SAE width; ``None``: the default for the width and the number of training rows (--sae-n-latents)."""
    sae_k: int | None = None
    """Active latents per image; ``None``: the default for the width (--sae-k)."""
    sae_epochs: float = 200.0
    """SAE training epochs over the ~1,080 training digits (--sae-epochs)."""
    seed: int = 0
    """Seed of the split, the CNN and the SAE (--seed)."""

    def __post_init__(self):
        if self.cnn_width < 1:
            raise ValueError(f"--cnn-width must be >= 1, got {self.cnn_width}")
        if self.cnn_epochs < 1:
            raise ValueError(f"--cnn-epochs must be >= 1, got {self.cnn_epochs}")
        if self.sae_n_latents is not None and self.sae_n_latents < 1:
            raise ValueError(f"--sae-n-latents must be >= 1, got {self.sae_n_latents}")
        if self.sae_k is not None and self.sae_k < 1:
            raise ValueError(f"--sae-k must be >= 1, got {self.sae_k}")
        if not self.sae_epochs > 0:
            raise ValueError(f"--sae-epochs must be > 0, got {self.sae_epochs}")


def _log(message: str) -> None:
    print(f"[digits] {message}", flush=True)


def run_digits(out_dir: str | Path, config: DigitsRunConfig = DigitsRunConfig(), device: str = "cpu") -> dict:
    """Run (or finish) the default pipeline into ``out_dir`` and return the summary it writes to
    ``out_dir/summary.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cnn_dir, store_dir = out_dir / "backbone", out_dir / "store"
    sae_dir, codes_dir = out_dir / "sae", out_dir / "codes"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if cnn_dir.is_dir():
        _log(f"backbone: reusing {cnn_dir}")
    else:
        _log(f"backbone: training the digits CNN (width {config.cnn_width})")
        train = CNNTrainConfig(epochs=config.cnn_epochs)
        model, metrics = train_cnn(CNNConfig(width=config.cnn_width), train, seed=config.seed, device=device)
        save_cnn(model, cnn_dir, train=train, seed=config.seed, metrics=metrics)
    cnn_metrics = read_json(cnn_dir / "meta.json")["metrics"]
    timings["backbone_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"store: extracting the digits' embeddings into {store_dir}")
    store = extract(
        ExtractConfig(source="digits", backbone="digits-cnn", weights=str(cnn_dir), seed=config.seed),
        ExtractRun(out_dir=store_dir, device=device, num_workers=0, progress=False),
    )
    timings["store_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if sae_dir.is_dir():
        _log(f"sae: reusing {sae_dir}")
    else:
        n_train = len(store.split["train"])
        sae_config = sae_config_for_store(store.d, n_train, n_latents=config.sae_n_latents, k=config.sae_k)
        _log(f"sae: training {sae_config.n_latents} latents, k={sae_config.k} on {store.d}-d embeddings")
        train_sae_on_store(
            store,
            sae_dir,
            sae_config,
            TrainConfig(n_epochs=config.sae_epochs, seed=config.seed),
            RunConfig(device=device, checkpoint_every=200, progress=False),
            resume=True,
        )
    sae_summary = read_json(sae_dir / "config.json")
    timings["sae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if codes_dir.is_dir():
        _log(f"codes: reusing {codes_dir}")
        codes = CodeStore.open(codes_dir)
    else:
        _log(f"codes: encoding {store.n} embeddings")
        codes = encode_store(store_dir, sae_dir, codes_dir, device=device)
    timings["codes_s"] = time.perf_counter() - t

    summary = {
        "config": asdict(config),
        "backbone": {
            "dir": str(cnn_dir),
            "n_features": store.d,
            **{k: cnn_metrics[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy") if k in cnn_metrics},
        },
        "store": {"dir": str(store_dir), "n": store.n, "d": store.d, "content_hash": store.content_hash,
                  "split": {name: int(len(rows)) for name, rows in store.split.items()}},
        "sae": {"dir": str(sae_dir), "n_latents": sae_summary["sae"]["n_latents"], "k": sae_summary["sae"]["k"],
                "heldout": sae_summary.get("metrics", {}).get("heldout", {})},
        "codes": {"dir": str(codes_dir), "n": codes.n, "firing": codes.meta.get("firing", {})},
        "timings": timings,
    }
    write_json(out_dir / "summary.json", summary)
    return summary
