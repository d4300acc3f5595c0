"""SAEs in and out of the layouts of SAELens and EleutherAI sparsify (the libraries themselves are not needed).

Each layout lives in its own module, with the table of what every field of its ``cfg.json`` maps to:
``sae.interop_saelens`` (and ``sae.interop_saelens_norm`` for its activation normalisation) and
``sae.interop_sparsify``; ``sae.interop_files`` holds what they share. An import computes what the peer
computes: each setting is mapped, folded into the weights where that is exact, or refused by name.

Both peers compute what our ``topk`` variant computes (a ReLU before or after top-k selects the same non-zero
values), so a ``topk`` SAE goes out and comes back unchanged, with its provenance (SAELens: in ``metadata``;
sparsify: in ``provenance.json`` beside its files, since sparsify drops unknown config keys) and its firing
frequencies (``sparsity.safetensors``, as SAELens writes them). The ``paper`` variant (the authors' model: no
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

from artifacts import ArtifactError, building, is_artifact_dir, read_json, write_json
from sae.checkpoint import WEIGHTS_FILE, load_sae, read_latent_frequency, read_provenance, save_sae
from sae.interop_files import SPARSITY_FILE, ForeignSAE, write_sparsity
from sae.interop_saelens import WEIGHTS_FILE as SAELENS_WEIGHTS
from sae.interop_saelens import read_saelens, write_saelens
from sae.interop_sparsify import WEIGHTS_FILE as SPARSIFY_WEIGHTS
from sae.interop_sparsify import hookpoint_folders, read_sparsify, write_sparsify
from sae.model import TopKSAE

FORMATS = ("saelens", "sparsify")
FOREIGN_CONFIG = "cfg.json"


class NegativeCodesWarning(UserWarning):
    """A ``paper`` SAE was exported to a format that applies a ReLU its top-k values may need to pass."""


# ------------------------------------------------------------------------------------------------ export
def export_sae(
    model: TopKSAE,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    provenance: dict | None = None,
    latent_frequency: dict | None = None,
    x_check: np.ndarray | torch.Tensor | None = None,
    allow_negative: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``out_dir`` in the layout of ``fmt`` (``"saelens"`` or ``"sparsify"``), atomically.

    ``provenance`` (what the SAE was trained on) goes where the peer keeps such a record (see the module
    docstring); ``latent_frequency`` (``{"frequency": (n_latents,), "n_rows", "rows"}``) becomes
    ``sparsity.safetensors``. For a ``paper`` SAE, ``x_check`` rows are encoded and any negative top-k value
    refuses the export (``ValueError``) unless ``allow_negative``, which warns instead.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if model.is_paper:
        _check_paper_expressible(model, x_check, allow_negative)
    tensors = {name: getattr(model, name).detach().float().cpu() for name in ("W_enc", "b_enc", "b_dec")}
    tensors["W_dec"] = model.decoder_weight().detach().float().cpu()  # the rows used (normalised for ``paper``)
    if latent_frequency is not None:
        shape = np.asarray(latent_frequency["frequency"]).shape
        if shape != (model.config.n_latents,):
            raise ValueError(f"latent_frequency must have shape ({model.config.n_latents},), got {shape}")
    write = write_saelens if fmt == "saelens" else write_sparsify
    with building(out_dir, overwrite) as work:  # committed at the end; deleted and unlocked on an error
        write_json(work / FOREIGN_CONFIG, write(work, tensors, model.config, provenance))
        if latent_frequency is not None:
            write_sparsity(work / SPARSITY_FILE, latent_frequency)
    return Path(out_dir)


def export_sae_dir(sae_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str, **options) -> Path:
    """Export one of our SAE directories with the provenance and firing frequencies it records; ``options`` are
    ``export_sae``'s (``x_check``, ``allow_negative``, ``overwrite``)."""
    frequency = read_latent_frequency(sae_dir)
    record = None
    if frequency is not None:
        saved = read_json(Path(sae_dir) / "config.json").get("latent_frequency") or {}
        record = {"frequency": frequency, "n_rows": saved.get("n_rows"), "rows": saved.get("rows")}
    return export_sae(
        load_sae(sae_dir), out_dir, fmt, provenance=read_provenance(sae_dir), latent_frequency=record, **options
    )


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
def _is_our_sae_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / WEIGHTS_FILE).is_file() and is_artifact_dir(path)


def detect_format(src_dir: str | os.PathLike) -> str:
    """``"saelens"`` or ``"sparsify"`` from the files a directory holds; an error that says what it is otherwise."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ArtifactError(f"{src_dir} is not a directory; pass the folder holding {FOREIGN_CONFIG} and the weights")
    if _is_our_sae_dir(src_dir):
        # Checked first: our weight file has sparsify's name.
        raise ArtifactError(
            f"{src_dir} is already an SAE directory of this toolkit (config.json, {WEIGHTS_FILE}, meta.json): it "
            f"needs no import; pass it as --sae, or write it for another library with scripts/export_sae.py"
        )
    for fmt, weights in (("saelens", SAELENS_WEIGHTS), ("sparsify", SPARSIFY_WEIGHTS)):
        if (src_dir / weights).is_file():
            if not (src_dir / FOREIGN_CONFIG).is_file():
                raise ArtifactError(f"{src_dir} has {weights} ({fmt}) but its {FOREIGN_CONFIG} is missing")
            return fmt
    hookpoints = hookpoint_folders(src_dir)
    if hookpoints:
        raise ArtifactError(
            f"{src_dir} is a sparsify training run holding one SAE per hookpoint {hookpoints}; pass one of those "
            f"folders, e.g. --from {src_dir / hookpoints[0]}"
        )
    raise ArtifactError(
        f"{src_dir} holds neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify) with a {FOREIGN_CONFIG}"
    )


def read_foreign_sae(src_dir: str | os.PathLike, fmt: str | None = None) -> ForeignSAE:
    """An SAELens or sparsify directory in our terms (``ForeignSAE.build()`` gives the ``topk`` model)."""
    src_dir = Path(src_dir)
    detected = detect_format(src_dir)  # also refuses our own directories and sparsify run folders
    fmt = detected if fmt is None else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    return read_saelens(src_dir) if fmt == "saelens" else read_sparsify(src_dir)


def import_foreign_sae(
    src_dir: str | os.PathLike, sae_dir: str | os.PathLike, fmt: str | None = None, *, overwrite: bool = False
) -> Path:
    """Convert an SAELens or sparsify directory into an SAE directory of ours (``topk`` variant).

    The peer's ``cfg.json`` and the settings folded into the weights are recorded in ``config.json`` "train"; its
    provenance and firing frequencies become ours (``latent_frequency.npy``).
    """
    src_dir = Path(src_dir)
    fmt = detect_format(src_dir) if fmt is None else fmt
    foreign = read_foreign_sae(src_dir, fmt)
    source = {
        "source": f"{fmt} directory", "source_dir": str(src_dir), "cfg": read_json(src_dir / FOREIGN_CONFIG),
        "folded": list(foreign.folded),
    }
    return save_sae(
        foreign.build(), sae_dir, train_config=source, provenance=foreign.provenance,
        latent_frequency=foreign.frequency, overwrite=overwrite,
    )
