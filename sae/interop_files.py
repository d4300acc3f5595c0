"""What the SAELens and sparsify layouts share: weights read at the precision the peer computes with, the
latent firing frequencies (``sparsity.safetensors``), the provenance side file, and the imported SAE's record.

Precision: a peer computes in one dtype (SAELens: ``cfg.json`` "dtype"; sparsify: the dtype of the first tensor
in its file) and casts every weight to it on load. Our SAE holds float32. A weight is imported only when the
value the peer computes with is exactly a float32 (float16 and bfloat16 always are; float64 only when it was
a float32 to begin with), so the imported SAE holds the peer's very weights; otherwise the import is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from artifacts import ArtifactError
from sae.config import SAEConfig
from sae.model import TopKSAE

SPARSITY_FILE = "sparsity.safetensors"
"""SAELens's file of per-latent ``log10(frequency + 1e-10)`` (key ``"sparsity"``), beside the weights."""
SPARSITY_EPS = 1e-10
"""What SAELens's trainer adds before the log10, so that a latent that never fired stores -10."""
PROVENANCE_FILE = "provenance.json"
"""Side file holding our provenance record where the peer's config has no place for it (sparsify)."""
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class ForeignSAE:
    """An SAE read from a peer's folder in our terms: ``build()`` computes what the peer computes."""

    config: SAEConfig
    """Our architecture (always the ``topk`` variant)."""
    tensors: dict
    """``W_enc (d, n)``, ``b_enc (n,)``, ``W_dec (n, d)``, ``b_dec (d,)`` in float32, every setting folded in."""
    provenance: dict | None
    """What the SAE was trained on, from the peer's own record (or ours, when we wrote the folder)."""
    frequency: dict | None
    """``{"frequency": (n,) float64, "n_rows": int | None, "rows": str}`` when the folder has them."""
    folded: tuple
    """The peer's settings that were folded into the weights, by name, for the record."""

    def build(self) -> TopKSAE:
        """The ``TopKSAE`` holding these weights, in eval mode."""
        model = TopKSAE(self.config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.tensors[name])
        return model.eval()


def positive_int(value, key: str, cfg_path: Path) -> int:
    """A config field that must be a positive integer (JSON's ``true`` is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"{cfg_path}: {key} must be a positive integer, got {value!r}")
    return value


def check_shapes(tensors: dict[str, torch.Tensor], config: SAEConfig, weights_path: Path) -> None:
    """Refuse weights whose shapes are not the ones the peer's config implies."""
    d, n = config.d_in, config.n_latents
    for name, shape in {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(
                f"{weights_path}: {name} has shape {tuple(tensors[name].shape)} (in our layout), but cfg.json implies "
                f"{shape} (d_in={d}, {n} latents)"
            )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors of a safetensors file and its key order, with an error naming the file when it is unreadable."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            return {k: f.get_tensor(k) for k in keys}, keys
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from e


def check_tensor_names(path: Path, tensors: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse a weight file that lacks a tensor or holds one whose role we do not know."""
    missing = [n for n in required if n not in tensors]
    unknown = sorted(set(tensors) - set(required) - set(optional))
    if missing or unknown:
        raise ArtifactError(
            f"{path}: missing tensors {missing}, unknown tensors {unknown} (expected {list(required)}); "
            "an unknown tensor may change what the SAE computes, so it is not imported"
        )


def at_peer_precision(tensors: dict, compute_dtype: torch.dtype, where: str, field: str) -> dict[str, torch.Tensor]:
    """The weights cast as the peer casts them on load, then to float32, refused when float32 would round them."""
    out = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ArtifactError(f"{where}: tensor {name} has dtype {t.dtype}, not a floating-point dtype")
        peer = t.to(compute_dtype)
        ours = peer.float()
        if not torch.equal(ours.to(peer.dtype), peer):
            raise ArtifactError(
                f"{where}: {field} makes the peer compute with {compute_dtype} weights, and {name} holds values "
                "that float32 cannot hold exactly, so the imported SAE would not compute the same function. "
                "Convert the SAE to float32 in its own library first and save it again"
            )
        out[name] = ours
    return out


def fold_decoder_norms(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unit decoder rows, the norms moved into the encoder: ``(pre * |d_i|)`` selects and decodes through
    ``d_i / |d_i|`` exactly as ``pre`` scaled by ``|d_i|`` decodes through ``d_i / |d_i|``."""
    norms = t["W_dec"].double().norm(dim=1)
    if bool((norms == 0).any()):
        raise ArtifactError("a decoder row has norm 0, so the rescaling by decoder norm is not defined for it")
    return {
        "W_enc": (t["W_enc"].double() * norms).float(),
        "b_enc": (t["b_enc"].double() * norms).float(),
        "W_dec": (t["W_dec"].double() / norms[:, None]).float(),
        "b_dec": t["b_dec"],
    }


# ------------------------------------------------------------------------------------------ frequencies
def write_sparsity(path: Path, frequency: dict) -> None:
    """``sparsity.safetensors`` as SAELens writes it (float32 ``log10(frequency + 1e-10)``); the number of rows and
    what they were ride in the file's metadata, which SAELens does not read."""
    freq = torch.from_numpy(np.asarray(frequency["frequency"], dtype=np.float64))
    log = torch.log10(freq + SPARSITY_EPS).float().contiguous()
    meta = {"rows": str(frequency.get("rows") or "")}
    if frequency.get("n_rows") is not None:
        meta["n_rows"] = str(int(frequency["n_rows"]))
    save_file({"sparsity": log}, str(path), metadata=meta)


def read_sparsity(path: Path, n_latents: int) -> dict | None:
    """Firing frequencies from ``sparsity.safetensors``, or ``None`` when the folder has none.

    Inverting the log loses float32's precision (a relative 3e-6 at most); a frequency that comes back below
    1e-12 was a latent that never fired (SAELens stores log10(1e-10) for those) and reads as 0.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "sparsity" not in f.keys():
                raise ArtifactError(f"{path} has no tensor 'sparsity' (has {list(f.keys())})")
            log = f.get_tensor("sparsity")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from e
    if tuple(log.shape) != (n_latents,):
        raise ArtifactError(f"{path}: 'sparsity' has shape {tuple(log.shape)}, the SAE has {n_latents} latents")
    freq = np.power(10.0, log.double().numpy()) - SPARSITY_EPS
    freq[freq < 1e-12] = 0.0
    n_rows = meta.get("n_rows")
    return {
        "frequency": np.clip(freq, 0.0, 1.0),
        "n_rows": int(n_rows) if n_rows and n_rows.isdigit() else None,
        "rows": meta.get("rows") or f"{path.name} (log10 firing frequency)",
    }


def clean_provenance(record: dict) -> dict | None:
    """A provenance record without its unknown (``None``) fields, or ``None`` when nothing is known."""
    return {k: v for k, v in record.items() if v is not None} or None
