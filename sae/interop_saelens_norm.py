"""SAELens's activation normalisation (``cfg.json`` "normalize_activations") folded into the weights, or refused.

SAELens trains with ``expected_average_only_in`` on inputs scaled by one factor ``s`` and with
``covariance_whitening`` on whitened inputs ``z = (x - mean) @ M``, and at the end of training folds the map into
the weights and saves ``normalize_activations: "none"``. A folder whose config still names one of them was
saved before that fold (a checkpoint during training), with the statistics beside it: ``activation_scaler.json``
(``scaling_factor``) and ``activation_whitening.safetensors`` (``mean``, ``matrix``, ``inverse_matrix``). The
fold here is the one SAELens's trainer applies, in its order, so the import computes on raw inputs what SAELens's
SAE computes once its training has ended (SAELens's own ``load_from_disk`` of such a checkpoint applies none of
these statistics). Both maps are affine, so the fold is exact:

    scale s:      W_enc <- s W_enc,  W_dec <- W_dec / s,  b_dec <- b_dec / s
    whitening M:  W_enc <- M W_enc,  W_dec <- W_dec M^-1,  b_dec <- b_dec M^-1 + mean,
                  b_enc <- b_enc - mean M W_enc  (only when b_dec is not subtracted from the input)

``constant_norm_rescale`` and ``layer_norm`` divide each input by its own norm or standard deviation, which no
fixed weights can do: they are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from artifacts import ArtifactError, read_json
from sae.interop_files import fold_decoder_norms, read_safetensors

SCALER_FILE = "activation_scaler.json"
WHITENING_FILE = "activation_whitening.safetensors"
PER_INPUT = {
    "constant_norm_rescale": "rescales each input to norm sqrt(d_in) and the output back",
    "layer_norm": "centres each input and divides it by its own standard deviation, and undoes it on the output",
}


def fold_normalisation(
    tensors: dict[str, torch.Tensor], normalisation: str, rescale: bool, apply_b_dec: bool, src_dir: Path,
    cfg_path: Path,
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """``tensors`` with ``rescale_acts_by_decoder_norm`` and the activation normalisation folded in, in SAELens's
    own order, so that the codes are the ones SAELens's folded SAE gives: its trainer folds the scale while the
    rescaling stays on (which divides the codes by ``s``), and its top-k whitening fold takes the decoder norms
    out first. Returns the tensors and the names of the settings folded."""
    if normalisation in PER_INPUT:
        raise ArtifactError(
            f"{cfg_path}: normalize_activations={normalisation!r} {PER_INPUT[normalisation]}: a per-input scale "
            "that no fixed weights can hold, so the SAE is not imported"
        )
    if normalisation not in ("none", "expected_average_only_in", "covariance_whitening"):
        raise ArtifactError(f"{cfg_path}: normalize_activations={normalisation!r} is not a value SAELens knows")
    folded = []
    if normalisation == "expected_average_only_in":
        tensors = _fold_scale(tensors, _scaling_factor(src_dir, cfg_path))
    if rescale:
        tensors = fold_decoder_norms(tensors)
        folded.append("rescale_acts_by_decoder_norm")
    if normalisation == "covariance_whitening":
        mean, matrix, inverse = _whitening(src_dir, cfg_path, tensors["b_dec"].shape[0])
        tensors = _fold_whitening(tensors, mean, matrix, inverse, apply_b_dec)
    if normalisation != "none":
        folded.append(f"normalize_activations={normalisation}")
    return tensors, tuple(folded)


def _missing(cfg_path: Path, normalisation: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{cfg_path}: normalize_activations={normalisation!r} means the weights expect normalised inputs, and "
        f"{what}, so the SAE cannot be made to compute its function on raw inputs. Copy SAELens's "
        f"{SCALER_FILE} (and {WHITENING_FILE}) of this checkpoint beside cfg.json, or save the SAE at the end of "
        "its training, when SAELens folds the normalisation into the weights"
    )


def _scaling_factor(src_dir: Path, cfg_path: Path) -> float:
    path = src_dir / SCALER_FILE
    if not path.is_file():
        raise _missing(cfg_path, "expected_average_only_in", f"{path} is missing")
    factor = read_json(path, expect=dict, hint="copy SAELens's file again").get("scaling_factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise _missing(cfg_path, "expected_average_only_in", f"{path} holds no positive scaling_factor ({factor!r})")
    return float(factor)


def _whitening(src_dir: Path, cfg_path: Path, d_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = src_dir / WHITENING_FILE
    if not path.is_file():
        raise _missing(cfg_path, "covariance_whitening", f"{path} is missing")
    stats, _ = read_safetensors(path)
    shapes = {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)}
    for name, shape in shapes.items():
        if name not in stats or tuple(stats[name].shape) != shape:
            got = tuple(stats[name].shape) if name in stats else "missing"
            raise ArtifactError(f"{path}: {name} must have shape {shape}, got {got}")
    return stats["mean"].double(), stats["matrix"].double(), stats["inverse_matrix"].double()


def _fold_scale(t: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    return {
        "W_enc": (t["W_enc"].double() * s).float(),
        "b_enc": t["b_enc"],
        "W_dec": (t["W_dec"].double() / s).float(),
        "b_dec": (t["b_dec"].double() / s).float(),
    }


def _fold_whitening(
    t: dict[str, torch.Tensor], mean: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor, apply_b_dec: bool
) -> dict[str, torch.Tensor]:
    W_enc = matrix @ t["W_enc"].double()
    b_enc = t["b_enc"].double()
    if not apply_b_dec:  # with it, the folded b_dec below already takes the mean off the input
        b_enc = b_enc - mean @ W_enc
    return {
        "W_enc": W_enc.float(),
        "b_enc": b_enc.float(),
        "W_dec": (t["W_dec"].double() @ inverse).float(),
        "b_dec": (t["b_dec"].double() @ inverse + mean).float(),
    }
