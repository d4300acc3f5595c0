"""SAEs in and out of the layouts of SAELens and EleutherAI sparsify (the libraries themselves are not needed).

SAELens (``SAE.save_model`` / ``SAE.load_from_disk``, architecture ``"topk"``)::

    DIR/cfg.json                 {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                                  "apply_b_dec_to_input", "normalize_activations": "none",
                                  "reshape_activations": "none", "meta": {"model_name", ...}}
    DIR/sae_weights.safetensors  W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,)

    encode: TopK_k(x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc), then ReLU on the k values

EleutherAI sparsify (``SparseCoder.save_to_disk`` / ``load_from_disk``)::

    DIR/cfg.json          {"activation": "topk", "k", "num_latents", "expansion_factor", "normalize_decoder",
                           "multi_topk", "skip_connection", "transcode", "d_in"}
    DIR/sae.safetensors   encoder.weight (n, d), encoder.bias (n,), W_dec (n, d), b_dec (d,)

    encode: TopK_k(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias))

Both compute what our ``topk`` variant computes (a ReLU before or after top-k selects the same non-zero
values), so a ``topk`` SAE goes out and comes back unchanged. The ``paper`` variant (the authors' model: no
ReLU, decoder rows normalised inside forward, ``x`` not centred by ``b_dec``) is expressible only while its
top-k values are non-negative: its normalised decoder is written as plain unit rows; for sparsify, which
always subtracts ``b_dec``, the encoder bias absorbs ``b_dec @ W_enc``; but both formats apply a ReLU that
zeroes the negative values the paper model keeps. Exporting it therefore warns, and with a data sample
(``x_check``) refuses when any top-k value on it is negative, unless ``allow_negative``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from artifacts import ArtifactError, building, read_json, write_json
from sae.checkpoint import save_sae
from sae.config import SAEConfig
from sae.model import TopKSAE

FORMATS = ("saelens", "sparsify")
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, FOREIGN_CONFIG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"


class NegativeCodesWarning(UserWarning):
    """A ``paper`` SAE was exported to a format that applies a ReLU its top-k values may need to pass."""


# ------------------------------------------------------------------------------------------------ export
def export_sae(
    model: TopKSAE,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    provenance: dict | None = None,
    x_check: np.ndarray | torch.Tensor | None = None,
    allow_negative: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``out_dir`` in the layout of ``fmt`` (``"saelens"`` or ``"sparsify"``), atomically.

    ``provenance`` (what the SAE was trained on) is recorded in ``cfg.json`` (SAELens: ``meta.model_name`` is
    the backbone). For a ``paper`` SAE see the module docstring: ``x_check`` rows are encoded and any negative
    top-k value refuses the export (``ValueError``) unless ``allow_negative``, which warns instead.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if model.is_paper:
        _check_paper_expressible(model, x_check, allow_negative)
    W_enc, b_enc, b_dec = (t.detach().float().cpu() for t in (model.W_enc, model.b_enc, model.b_dec))
    W_dec = model.decoder_weight().detach().float().cpu()  # the rows actually used (normalised for ``paper``)
    cfg = model.config
    with building(out_dir, overwrite) as work:  # committed at the end; deleted and unlocked on an error
        if fmt == "saelens":
            tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / SAELENS_WEIGHTS))
            meta = {"model_name": (provenance or {}).get("backbone"), "hook_name": (provenance or {}).get("output_kind")}
            config = {
                "architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.n_latents, "k": cfg.k, "dtype": "float32",
                "device": "cpu", "apply_b_dec_to_input": cfg.subtract_decoder_bias, "normalize_activations": "none",
                "reshape_activations": "none", "meta": meta,
            }
        else:
            if not cfg.subtract_decoder_bias:
                # sparsify always encodes x - b_dec: (x - b_dec) @ W + (b + b_dec @ W) = x @ W + b.
                b_enc = b_enc + b_dec @ W_enc
            tensors = {"encoder.weight": W_enc.t(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / SPARSIFY_WEIGHTS))
            config = {
                "activation": "topk", "expansion_factor": max(1, cfg.n_latents // cfg.d_in), "normalize_decoder": True,
                "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False, "skip_connection": False,
                "transcode": False, "d_in": cfg.d_in,
            }
        # Extra top-level keys are dropped by both libraries' config loaders.
        config["provenance"] = provenance
        write_json(work / FOREIGN_CONFIG, config)
    return Path(out_dir)


def _check_paper_expressible(model: TopKSAE, x_check, allow_negative: bool) -> None:
    condition = (
        "the 'paper' variant has no ReLU, and SAELens and sparsify apply one: the exported SAE equals it only "
        "while its top-k values are non-negative"
    )
    if x_check is None:
        warnings.warn(f"{condition}; pass a data sample to check that they are", NegativeCodesWarning, stacklevel=3)
        return
    x = torch.from_numpy(np.array(x_check, dtype=np.float32))  # a writable copy
    with torch.no_grad():
        values, _ = model.encode(x.to(model.W_enc.device))
    neg_rows = int((values < 0).any(dim=1).sum())
    if neg_rows == 0:
        return
    message = (
        f"{condition}, and {neg_rows} of {x.shape[0]} checked rows have a negative top-k value "
        f"(smallest {float(values.min()):.4g})"
    )
    if not allow_negative:
        raise ValueError(f"{message}; refusing to export. Pass --allow-negative to export anyway (those values "
                         "will be zeroed by the other library)")
    warnings.warn(message, NegativeCodesWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------ import
def detect_format(src_dir: str | os.PathLike) -> str:
    """``"saelens"`` or ``"sparsify"`` from the weight file a directory holds."""
    src_dir = Path(src_dir)
    if (src_dir / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (src_dir / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    raise ArtifactError(
        f"{src_dir} holds neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify) with a {FOREIGN_CONFIG}"
    )


def read_foreign_sae(src_dir: str | os.PathLike, fmt: str | None = None) -> tuple[TopKSAE, dict | None]:
    """Build our ``topk`` model from an SAELens or sparsify directory; also return its recorded provenance."""
    src_dir = Path(src_dir)
    fmt = detect_format(src_dir) if fmt is None else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    config = read_json(src_dir / FOREIGN_CONFIG)
    if fmt == "saelens":
        sae_config, tensors = _saelens_parts(src_dir, config)
    else:
        sae_config, tensors = _sparsify_parts(src_dir, config)
    model = TopKSAE(sae_config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{src_dir}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name].float())
    provenance = config.get("provenance")
    if provenance is None and fmt == "saelens":
        meta = config.get("meta") or {}
        name = meta.get("model_name", config.get("model_name"))
        provenance = {"backbone": name} if name else None
    return model.eval(), provenance


def import_foreign_sae(
    src_dir: str | os.PathLike, sae_dir: str | os.PathLike, fmt: str | None = None, *, overwrite: bool = False
) -> Path:
    """Convert an SAELens or sparsify directory into an SAE directory of ours (``topk`` variant)."""
    fmt = detect_format(src_dir) if fmt is None else fmt
    model, provenance = read_foreign_sae(src_dir, fmt)
    source = {"source": f"{fmt} directory", "source_dir": str(Path(src_dir)), "cfg": read_json(Path(src_dir) / FOREIGN_CONFIG)}
    return save_sae(model, sae_dir, train_config=source, provenance=provenance, overwrite=overwrite)


def _load_tensors(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from e
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    return tensors


def _saelens_parts(src_dir: Path, config: dict) -> tuple[SAEConfig, dict]:
    arch = config.get("architecture", "standard")
    if arch != "topk":
        raise ArtifactError(f"{src_dir}: SAELens architecture {arch!r} is not a top-k SAE; only 'topk' can be imported")
    for key, plain in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if config.get(key, plain) not in (plain, None):
            raise ArtifactError(f"{src_dir}: {key}={config[key]!r} is not supported (only {plain!r})")
    for key in ("d_in", "d_sae", "k"):
        if key not in config:
            raise ArtifactError(f"{src_dir / FOREIGN_CONFIG} has no {key!r}; not an SAELens top-k config")
    t = _load_tensors(src_dir / SAELENS_WEIGHTS, ("W_enc", "b_enc", "W_dec", "b_dec"))
    sae_config = SAEConfig(
        d_in=int(config["d_in"]), n_latents=int(config["d_sae"]), k=int(config["k"]),
        subtract_decoder_bias=bool(config.get("apply_b_dec_to_input", True)),
    )
    return sae_config, {name: t[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _sparsify_parts(src_dir: Path, config: dict) -> tuple[SAEConfig, dict]:
    if config.get("activation", "topk") != "topk":
        raise ArtifactError(f"{src_dir}: sparsify activation {config['activation']!r} is not supported (only 'topk')")
    for key in ("skip_connection", "transcode"):  # (multi_topk only changes the training loss)
        if config.get(key):
            raise ArtifactError(f"{src_dir}: sparsify {key}=true is not a plain SAE; it cannot be imported")
    if "d_in" not in config or "k" not in config:
        raise ArtifactError(f"{src_dir / FOREIGN_CONFIG} has no 'd_in' or 'k'; not a sparsify config")
    d = int(config["d_in"])
    n = int(config.get("num_latents") or 0) or d * int(config.get("expansion_factor", 32))
    t = _load_tensors(src_dir / SPARSIFY_WEIGHTS, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    W_dec = t["W_dec"].float()
    if not config.get("normalize_decoder", True):
        warnings.warn(f"{src_dir}: normalize_decoder=false; the decoder rows are used as they are", stacklevel=3)
    sae_config = SAEConfig(d_in=d, n_latents=n, k=int(config["k"]))
    return sae_config, {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": W_dec, "b_dec": t["b_dec"]}
