"""SAE checkpoint directories: save, strict load, compatibility checks, import of the authors' format.

Layout (schema ``artifacts.SCHEMA_VERSION``)::

    SAE_DIR/
      sae.safetensors   W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,)
      config.json       d_in, n_latents, k, variant, the SAEConfig ("sae"), the training config ("train"),
                        the parent store's content hash and provenance (backbone, output kind,
                        normalisation, preprocessing: ``sae.provenance``), final metrics
      latent_frequency.npy  (n_latents,) float64 firing frequency of each latent (value > 0) on the rows
                        named in config.json "latent_frequency" (held-out rows when there were any)
      meta.json         schema and package version, SHA-256 of sae.safetensors, parent store hash, and how it
                        was trained ("precision": the choice of ``sae/precision.py`` and its measurement)
      *.json            optional extra records written with it (e.g. the training history)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from artifacts import (
    SCHEMA_VERSION,
    ArtifactError,
    building,
    package_version,
    read_json,
    sha256_file,
    check_npy,
    torch_load_refusal,
    write_json,
    write_npy,
)
from sae.config import SAEConfig
from sae.hub import resolve_sae_source
from sae.model import TopKSAE
from sae.provenance import PAPER_PROVENANCE

WEIGHTS_FILE = "sae.safetensors"
FREQUENCY_FILE = "latent_frequency.npy"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_sae(
    model: TopKSAE,
    sae_dir: str | os.PathLike,
    *,
    train_config: dict | None = None,
    parent_store_hash: str | None = None,
    metrics: dict | None = None,
    extra_json: dict[str, Any] | None = None,
    provenance: dict | None = None,
    latent_frequency: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``sae_dir`` atomically; an existing directory is replaced only with ``overwrite``.

    ``extra_json`` maps file names (e.g. ``"history.json"``) to JSON-able objects written beside the weights.
    ``provenance``: what the training data was (``sae.provenance``). ``latent_frequency``: ``{"frequency":
    (n_latents,) array, "n_rows": int or None, "rows": str}``, written as ``latent_frequency.npy``. ``meta``:
    further JSON-able records of how the SAE was made (the training precision), added to ``meta.json``.
    """
    with building(sae_dir, overwrite) as work:  # committed at the end; deleted and unlocked on an error
        tensors = {name: getattr(model, name).detach().to("cpu").contiguous() for name in PARAM_NAMES}
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = model.config
        frequency_record = None
        if latent_frequency is not None:
            freq = np.asarray(latent_frequency["frequency"], dtype=np.float64)
            if freq.shape != (cfg.n_latents,):
                raise ValueError(f"latent_frequency must have shape ({cfg.n_latents},), got {freq.shape}")
            write_npy(work / FREQUENCY_FILE, freq)
            frequency_record = {
                "file": FREQUENCY_FILE, "rows": latent_frequency.get("rows"),
                # None when the source does not say (SAELens's sparsity.safetensors).
                "n_rows": None if latent_frequency.get("n_rows") is None else int(latent_frequency["n_rows"]),
            }
        write_json(
            work / "config.json",
            {
                "d_in": cfg.d_in,
                "n_latents": cfg.n_latents,
                "k": cfg.k,
                "variant": cfg.variant,
                "sae": cfg.to_dict(),
                "train": train_config,
                "parent_store_hash": parent_store_hash,
                "provenance": provenance,
                "latent_frequency": frequency_record,
                "metrics": metrics,
            },
        )
        for name, obj in (extra_json or {}).items():
            if Path(name).name != name or not name.endswith(".json") or name in ("config.json", "meta.json"):
                raise ValueError(f"extra_json names must be plain '*.json' file names other than config/meta, got {name!r}")
            write_json(work / name, obj)
        write_json(
            work / "meta.json",
            {
                "kind": "sae",
                "schema_version": SCHEMA_VERSION,
                "package_version": package_version(),
                "weights_sha256": sha256_file(work / WEIGHTS_FILE),
                "parent_store_hash": parent_store_hash,
                **(meta or {}),
            },
        )
    return Path(sae_dir)


def read_sae_config(sae_dir: str | os.PathLike) -> SAEConfig:
    """The ``SAEConfig`` of a checkpoint directory, without loading its weights."""
    sae_dir = Path(sae_dir)
    if not sae_dir.is_dir():
        raise ArtifactError(f"SAE directory {sae_dir} does not exist; train one with scripts/train_sae.py")
    config = read_json(sae_dir / "config.json", expect=dict)
    try:
        return SAEConfig.from_dict(config["sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{sae_dir / 'config.json'} does not hold a valid SAE config ({e})") from e


def read_latent_frequency(sae_dir: str | os.PathLike) -> np.ndarray | None:
    """The per-latent firing frequency ``(n_latents,)`` saved with an SAE, or ``None`` when it has none."""
    path = Path(sae_dir) / FREQUENCY_FILE
    if not path.is_file():
        return None
    hint = "retrain the SAE or import it again"
    shape, _ = check_npy(path, hint, kinds="f", ndim=1)
    frequency = np.load(path, allow_pickle=False)
    if not (np.isfinite(frequency).all() and (frequency >= 0).all() and (frequency <= 1).all()):
        raise ArtifactError(f"{path} holds values outside [0, 1]: not firing frequencies; {hint}")
    return frequency


def read_provenance(sae_dir: str | os.PathLike) -> dict | None:
    """What the SAE was trained on (``config.json`` "provenance"), or ``None`` when it does not say."""
    return read_json(Path(sae_dir) / "config.json").get("provenance")


def sae_hash(sae_dir: str | os.PathLike) -> str:
    """The SHA-256 of a checkpoint's weights, from its ``meta.json`` (identifies it for child artifacts)."""
    sae_dir = Path(sae_dir)
    meta = read_json(sae_dir / "meta.json", expect=dict)
    if "weights_sha256" not in meta:
        raise ArtifactError(f"{sae_dir / 'meta.json'} has no weights_sha256; re-save the SAE")
    return meta["weights_sha256"]


def load_sae(sae_dir: str | os.PathLike, device: str | torch.device = "cpu", verify_hash: bool = True) -> TopKSAE:
    """Rebuild the SAE from ``config.json`` and load ``sae.safetensors`` strictly; returned in eval mode."""
    sae_dir = Path(sae_dir)
    config = read_sae_config(sae_dir)
    weights_path = sae_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} is missing; the SAE directory is incomplete, retrain or re-import it")
    if verify_hash and (sae_dir / "meta.json").is_file():
        expected = read_json(sae_dir / "meta.json", expect=dict).get("weights_sha256")
        if expected is not None and sha256_file(weights_path) != expected:
            raise ArtifactError(f"{weights_path} does not match the SHA-256 in {sae_dir / 'meta.json'}: the file is "
                                f"corrupt or the record was edited; retrain the SAE or import it again")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights_path} is not a readable safetensors file ({e}): it is corrupt") from e
    _check_weights(config, tensors, weights_path)
    model = TopKSAE(config)
    _load_strict(model, tensors, str(weights_path))
    model.source_dir = sae_dir
    return model.to(device).eval()


def _check_weights(config: SAEConfig, tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Before the model is built: the file's tensors are the four of ``config``'s shapes (a crafted config cannot
    make the model allocate more than the file holds), and finite (an SAE that diverged is refused on load)."""
    d, n = config.d_in, config.n_latents
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d, n, config.k)):
        raise ArtifactError(f"{weights_path.parent / 'config.json'}: d_in, n_latents and k must be integers")
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)} but config.json "
                                f"implies {shape}")
    for name in PARAM_NAMES:
        n_bad = int((~torch.isfinite(tensors[name])).sum())
        if n_bad:
            raise ArtifactError(
                f"{weights_path}: {name} holds {n_bad} NaN or Inf values: the SAE diverged in training or the file "
                f"was damaged; retrain it (scripts/train_sae.py --store STORE_DIR --out {weights_path.parent} "
                f"--overwrite, with a lower --lr if it diverged)"
            )


def _load_strict(model: TopKSAE, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {shape}"
            )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name].to(p.dtype))


def check_compatible(model_or_config: TopKSAE | SAEConfig, d: int, what: str) -> None:
    """Refuse an SAE whose ``d_in`` differs from the width ``d`` of the data described by ``what``."""
    config = model_or_config.config if isinstance(model_or_config, TopKSAE) else model_or_config
    if config.d_in == d:
        return
    source = getattr(model_or_config, "source_dir", None)
    sae_name = f"SAE {source}" if source is not None else "the SAE"
    raise ArtifactError(
        f"{sae_name} takes inputs of width d_in={config.d_in}, but {what} has d={d}. Train an SAE on that "
        f"data (scripts/train_sae.py --store STORE_DIR --out SAE_DIR) or use the store the SAE was trained on."
    )


# --------------------------------------------------------------------------------------------------- import
def import_paper_checkpoint(
    path: str | os.PathLike, sae_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Convert the authors' released SAE to our format with the ``paper`` variant.

    Accepts their torch file (``clip_sae_checkpoint.pt``: a dict with ``config`` and ``model_state_dict``
    holding ``W_enc (d, n)``, ``b_enc``, ``W_dec (n, d)``, ``b_dec``), read with ``weights_only=True``
    only, or a Hugging Face hub snapshot directory (``config.json`` + ``model.safetensors``, as written by
    their ``PyTorchModelHubMixin``), or a hub id (``patrikwolf/clip-topk-sae``) or cache root
    (``models--patrikwolf--clip-topk-sae/``) resolved in the local Hugging Face cache (``sae.hub``). The SAE
    records the authors' training data as its provenance (OpenAI CLIP ViT-B/16, 512-d, L2-normalised) and,
    when their file has ``feature_counts``, the per-latent firing frequency of their training.
    """
    path = resolve_sae_source(path)
    if path.is_dir():
        config, state = _read_hub_snapshot(path)
    else:
        config, state = _read_torch_checkpoint(path)

    for name in ("W_enc", "b_enc", "W_dec"):
        if name not in state or not isinstance(state[name], torch.Tensor):
            raise ArtifactError(f"{path}: the model state has no tensor {name!r}; not an authors' top-k SAE")
    W_enc = state["W_enc"].float()
    if W_enc.ndim != 2:
        raise ArtifactError(f"{path}: W_enc must be 2-D (d, n), got shape {tuple(W_enc.shape)}")
    d, n = W_enc.shape
    d_cfg = config.get("feature_dim", config.get("input_dim"))
    n_cfg = config.get("hidden_dim")
    if n_cfg is None and d_cfg is not None and "expansion_factor" in config:
        n_cfg = int(d_cfg) * int(config["expansion_factor"])
    if (d_cfg is not None and int(d_cfg) != d) or (n_cfg is not None and int(n_cfg) != n):
        raise ArtifactError(f"{path}: config says d={d_cfg}, n_latents={n_cfg} but W_enc has shape {(d, n)}")
    if "k" not in config:
        raise ArtifactError(f"{path}: the config has no 'k'")
    if not config.get("normalize_decoder", True):
        raise ArtifactError(f"{path}: normalize_decoder=False is not supported by the 'paper' variant")
    b_dec = state.get("b_dec")
    if b_dec is None:  # their decoder_bias=False; a zero bias is the same model
        b_dec = torch.zeros(d)
    sae_config = SAEConfig.paper(d_in=d, n_latents=n, k=int(config["k"]), ghost_coef=float(config.get("ghost_weight", 1e6)))
    model = TopKSAE(sae_config)
    _load_strict(
        model,
        {"W_enc": W_enc, "b_enc": state["b_enc"].float(), "W_dec": state["W_dec"].float(), "b_dec": b_dec.float()},
        str(path),
    )
    metrics = frequency = None
    if isinstance(state.get("feature_counts"), torch.Tensor) and state["feature_counts"].numel() == n:
        counts = state["feature_counts"].double()
        total = float(state["total_samples"]) if "total_samples" in state else 0.0
        metrics = {
            "authors_total_samples": total,
            "authors_never_fired_fraction": float((counts == 0).double().mean()),
        }
        if total > 0:
            frequency = {"frequency": (counts / total).numpy(), "n_rows": int(total), "rows": "authors' training"}
    train_config = {"source": "authors' release", "source_file": path.name, "authors_config": _plain(config)}
    return save_sae(
        model, sae_dir, train_config=train_config, metrics=metrics, provenance=dict(PAPER_PROVENANCE),
        latent_frequency=frequency, overwrite=overwrite,
    )


def _read_torch_checkpoint(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, ValueError) as e:
        raise ArtifactError(
            f"{path} cannot be read with torch.load(weights_only=True): it holds objects other than tensors and "
            f"plain Python types, or it is corrupt ({torch_load_refusal(e)}). "
            "Refusing to unpickle arbitrary objects; re-save it as a dict of plain types and tensors."
        ) from e
    if not isinstance(blob, dict) or "model_state_dict" not in blob or "config" not in blob:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ArtifactError(f"{path} is not the authors' format: expected keys 'config' and 'model_state_dict', got {keys}")
    if not isinstance(blob["config"], dict) or not isinstance(blob["model_state_dict"], dict):
        raise ArtifactError(f"{path}: 'config' and 'model_state_dict' must be dicts")
    return blob["config"], blob["model_state_dict"]


def _read_hub_snapshot(path: Path) -> tuple[dict, dict]:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{path} has no model.safetensors; not a Hugging Face snapshot of the authors' SAE")
    config = read_json(path / "config.json")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is not a readable safetensors file ({e})") from e
    return config, state


def _plain(obj: Any) -> Any:
    """A JSON-able copy of the authors' config (tensors and other values become numbers or strings)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)
    return str(obj)
