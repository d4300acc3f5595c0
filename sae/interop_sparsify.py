"""The EleutherAI sparsify layout (``SparseCoder.save_to_disk`` / ``load_from_disk``, sparsify 1.x): every
``cfg.json`` field mapped or refused by name.

    DIR/cfg.json          {"activation": "topk", "expansion_factor", "normalize_decoder", "num_latents", "k",
                           "multi_topk", "skip_connection", "transcode", "d_in"}
    DIR/sae.safetensors   encoder.weight (n, d), encoder.bias (n,), W_dec (n, d), b_dec (d,)
    DIR/provenance.json   ours, optional: sparsify drops (and prints) any cfg.json key it does not know
    DIR/sparsity.safetensors  ours, optional: firing frequencies as SAELens writes them

    encode: TopK_k(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias))
    decode: sum_i z_i W_dec[i] + b_dec

sparsify fills a missing field with its default (``SPARSIFY_DEFAULTS``), so the same defaults are read here. Its
trainer saves one such folder per hookpoint under a run folder whose ``config.json`` names the model and data
set: that becomes the provenance when the folder has no ``provenance.json`` of ours.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from artifacts import ArtifactError, read_json, write_json
from sae.config import SAEConfig
from sae.interop_files import (
    PROVENANCE_FILE, SPARSITY_FILE, ForeignSAE, at_peer_precision, check_shapes, check_tensor_names,
    clean_provenance, positive_int, read_safetensors, read_sparsity,
)

WEIGHTS_FILE, CONFIG_FILE = "sae.safetensors", "cfg.json"
RUN_CONFIG_FILE = "config.json"
"""What sparsify's trainer writes in the run folder above the hookpoint folders."""
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
SPARSIFY_DEFAULTS = {
    "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0, "k": 32,
    "multi_topk": False, "skip_connection": False, "transcode": False,
}
"""``SparseCoderConfig``'s defaults, which sparsify uses for a field missing from ``cfg.json``."""

SPARSIFY_FIELDS = {
    "activation": "'topk' imports; 'groupmax' (the largest latent of each of k groups) is refused",
    "d_in": "d_in",
    "num_latents": "n_latents (when 0: d_in * expansion_factor, as sparsify does)",
    "expansion_factor": "n_latents = d_in * expansion_factor when num_latents is 0",
    "k": "k",
    "normalize_decoder": "training only (sparsify renormalises the decoder rows after each step; it decodes with "
    "the rows as stored, and so does the import)",
    "multi_topk": "training only (an extra loss on the top 4k latents): no effect on the function",
    "skip_connection": "refused when true: a learned linear map x @ W_skip is added to the output",
    "transcode": "refused when true: a transcoder predicts another module's output and does not subtract b_dec",
    "provenance": "earlier exports of this toolkit: provenance",
}
"""Every ``cfg.json`` field the importer knows, and what it maps to. The weights' dtype is the precision sparsify
computes in (it takes the first tensor's dtype for all): imported only when that value is exactly a float32."""


def write_sparsify(work: Path, tensors: dict, config: SAEConfig, provenance: dict | None) -> dict:
    """Write the weights and provenance side file of a sparsify export; return its ``cfg.json``."""
    W_enc, b_enc, W_dec, b_dec = (tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not config.subtract_decoder_bias:
        # sparsify always encodes x - b_dec: (x - b_dec) @ W + (b + b_dec @ W) = x @ W + b.
        b_enc = b_enc + b_dec @ W_enc
    files = {"encoder.weight": W_enc.t(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    save_file({k: v.contiguous() for k, v in files.items()}, str(work / WEIGHTS_FILE))
    if provenance is not None:
        write_json(work / PROVENANCE_FILE, provenance)
    return {
        "activation": "topk", "expansion_factor": max(1, config.n_latents // config.d_in), "normalize_decoder": True,
        "num_latents": config.n_latents, "k": config.k, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": config.d_in,
    }


def read_sparsify(src_dir: Path) -> ForeignSAE:
    """The SAE of a sparsify folder in our terms, every setting honoured or refused (``ArtifactError``)."""
    cfg_path = src_dir / CONFIG_FILE
    raw_cfg = read_json(cfg_path, expect=dict, hint="it is not a sparsify config")
    unknown = sorted(set(raw_cfg) - set(SPARSIFY_FIELDS))
    if unknown:
        raise ArtifactError(
            f"{cfg_path}: field(s) {unknown} are not sparsify fields this importer knows; each might change what "
            "the SAE computes, so the SAE is not imported (the README's sparsify table lists the known fields)"
        )
    cfg = {**SPARSIFY_DEFAULTS, **raw_cfg}
    if cfg["activation"] != "topk":
        raise ArtifactError(
            f"{cfg_path}: activation {cfg['activation']!r} is not top-k (groupmax keeps the largest latent of each of "
            "k groups); only 'topk' SAEs import"
        )
    for key, why in (("skip_connection", "adds a learned x @ W_skip to the output, which our SAE has no place for"),
                     ("transcode", "makes it a transcoder, which maps one activation to another")):
        if cfg[key]:
            raise ArtifactError(f"{cfg_path}: {key}=true {why}; it is not imported")
    d_in = positive_int(cfg.get("d_in"), "d_in", cfg_path)
    k = positive_int(cfg["k"], "k", cfg_path)
    if cfg["num_latents"] in (0, None):  # sparsify's rule: 0 means d_in * expansion_factor
        n = d_in * positive_int(cfg["expansion_factor"], "expansion_factor", cfg_path)
    else:
        n = positive_int(cfg["num_latents"], "num_latents", cfg_path)
    weights_path = src_dir / WEIGHTS_FILE
    raw, order = read_safetensors(weights_path)
    check_tensor_names(weights_path, raw, TENSORS)
    # sparsify builds the module in the dtype of the file's first tensor and casts every weight to it.
    t = at_peer_precision(raw, raw[order[0]].dtype, str(weights_path), f"the first tensor's dtype ({order[0]})")
    try:
        config = SAEConfig(d_in=d_in, n_latents=n, k=k)
    except ValueError as e:
        raise ArtifactError(f"{cfg_path}: d_in={d_in}, {n} latents, k={k} is not a valid top-k SAE ({e})") from e
    tensors = {"W_enc": t["encoder.weight"].t().contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    check_shapes(tensors, config, weights_path)
    return ForeignSAE(
        config=config, tensors=tensors, provenance=_provenance(src_dir, raw_cfg),
        frequency=read_sparsity(src_dir / SPARSITY_FILE, n), folded=(),
    )


def _run_config(run_dir: Path) -> dict | None:
    """sparsify's run record in ``run_dir`` (a ``config.json`` with an ``sae`` record), or ``None``."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ArtifactError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sae"), dict) else None


def hookpoint_folders(path: Path) -> list[str]:
    """The hookpoint folders of a sparsify run folder, or ``[]`` when ``path`` is not one."""
    if _run_config(path) is None:
        return []
    return sorted(p.name for p in path.iterdir() if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def _provenance(src_dir: Path, cfg: dict) -> dict | None:
    """Our side file (or our earlier exports' cfg.json key); else the model and data set of sparsify's run."""
    side = src_dir / PROVENANCE_FILE
    if side.is_file():
        return read_json(side, expect=dict, hint="delete it or export the SAE again")
    if isinstance(cfg.get("provenance"), dict):
        return cfg["provenance"]
    run = _run_config(src_dir.parent)
    if run is None:
        return None
    return clean_provenance({"backbone": run.get("model"), "output_kind": src_dir.name, "dataset": run.get("dataset")})
