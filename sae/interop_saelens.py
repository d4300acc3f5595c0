"""The SAELens layout (``SAE.save_model`` / ``SAE.load_from_disk``): every ``cfg.json`` field mapped, folded or
refused by name.

    DIR/cfg.json                 {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                                  "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                                  "rescale_acts_by_decoder_norm", "metadata": {"sae_lens_version", "model_name",
                                  "hook_name", ...}}
    DIR/sae_weights.safetensors  W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,)
    DIR/sparsity.safetensors     optional: "sparsity" (n,) = log10(firing frequency + 1e-10)

    encode: pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc, times |W_dec[i]| with
            rescale_acts_by_decoder_norm; then TopK_k and ReLU on the k values
    decode: sum_i z_i W_dec[i] (divided by |W_dec[i]| with rescale_acts_by_decoder_norm) + b_dec

SAELens 6 reads a config as version 6 only when ``metadata.sae_lens_version`` (or a top-level
``sae_lens_version``) says 6 or later; otherwise it takes the flat layout of SAELens 5 (``model_name``,
``hook_name``, ... at the top level, ``activation_fn: "topk"`` with ``activation_fn_kwargs.k``) and drops
``metadata``. Both are read here by the same rule, and exports say version 6 so that SAELens keeps their metadata.
``SAELENS_FIELDS`` lists what each field maps to (the README's table); any other field is refused, since it
might change what the SAE computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from artifacts import ArtifactError, read_json
from sae.config import SAEConfig
from sae.interop_files import (
    DTYPES, PARAM_NAMES, SPARSITY_FILE, ForeignSAE, at_peer_precision, check_shapes, check_tensor_names,
    clean_provenance, positive_int, read_safetensors, read_sparsity,
)
from sae.interop_saelens_norm import fold_normalisation

WEIGHTS_FILE, CONFIG_FILE = "sae_weights.safetensors", "cfg.json"
FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the config layout SAELens dispatches on (see the module docstring)."""

REFUSED_ARCHITECTURES = {
    "standard": "a ReLU SAE (every latent with a positive pre-activation fires), not top-k",
    "gated": "a gated SAE (separate gate and magnitude paths), not top-k",
    "jumprelu": "a per-latent threshold (JumpReLU; SAELens also saves trained BatchTopK SAEs this way), not top-k",
    "abstopk": "top-k by absolute value that keeps negative values, which a ReLU top-k cannot",
    "matching_pursuit": "greedy matching pursuit over residuals, not one top-k of one linear map",
    "temporal": "an SAE whose code depends on earlier positions of a sequence",
    "batchtopk": "top-k over a whole batch, so a row's code depends on the other rows",
    "matryoshka_batchtopk": "top-k over a whole batch, so a row's code depends on the other rows",
    "transcoder": "a transcoder (it maps one activation to another), not an autoencoder",
    "skip_transcoder": "a transcoder with a skip connection, not an autoencoder",
    "jumprelu_transcoder": "a JumpReLU transcoder, not an autoencoder",
    "jumprelu_skip_transcoder": "a JumpReLU transcoder with a skip connection, not an autoencoder",
}

_DESCRIPTIVE = "description of the training data only: kept in the imported SAE's config.json"
_TRAINING = "training only (loss, initialisation or storage of the codes): no effect on the function"
SAELENS_FIELDS = {
    "architecture": "'topk' imports; every other architecture is refused by name",
    "d_in": "d_in",
    "d_sae": "n_latents",
    "k": "k",
    "dtype": "the precision SAELens computes in: weights imported only when that value is exactly a float32",
    "device": "where SAELens runs it: no effect on the function",
    "apply_b_dec_to_input": "subtract_decoder_bias",
    "normalize_activations": "'none'; 'expected_average_only_in' and 'covariance_whitening' folded from the "
    "scaler files beside cfg.json (refused without them); 'constant_norm_rescale', 'layer_norm' refused",
    "reshape_activations": "'none'; 'hook_z' (attention heads) refused",
    "rescale_acts_by_decoder_norm": "folded: decoder norms moved into W_enc and b_enc, unit decoder rows",
    "metadata": "SAELens 6 description: model_name -> provenance backbone, hook_name -> output_kind, our "
    "'provenance' record as it is",
    "use_sparse_activations": _TRAINING, "aux_loss_coefficient": _TRAINING, "decoder_init_norm": _TRAINING,
    # SAELens 5 (flat layout)
    "activation_fn": "SAELens 5: 'topk' with activation_fn_kwargs.k is the topk architecture; others refused",
    "activation_fn_str": "SAELens 5 name of activation_fn", "activation_fn_kwargs": "SAELens 5: holds k",
    "finetuning_scaling_factor": "SAELens 5: the per-latent scaling_factor tensor folded into the decoder rows",
    "model_name": "SAELens 5: provenance backbone", "hook_name": "SAELens 5: provenance output_kind",
    "hook_point": "SAELens 5 name of hook_name",
    **{name: _DESCRIPTIVE for name in (
        "hook_layer", "hook_point_layer", "hook_head_index", "hook_point_head_index", "model_class_name",
        "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size",
        "seqpos_slice", "dataset_path", "dataset_trust_remote_code", "sae_lens_version", "sae_lens_training_version",
        "hook_name_out", "hook_head_index_out", "hf_hook_name", "hf_hook_name_out",
    )},
    **{name: _TRAINING for name in (
        "l1_coefficient", "lp_norm", "use_ghost_grads", "normalize_sae_decoder", "noise_scale",
        "decoder_orthogonal_init", "mse_loss_normalization", "decoder_heuristic_init",
        "init_encoder_as_decoder_transpose", "scale_sparsity_penalty_by_decoder_norm", "jumprelu_init_threshold",
        "jumprelu_bandwidth",
    )},
    # Written by earlier exports of this toolkit.
    "meta": "earlier exports of this toolkit: model_name and hook_name", "provenance": "earlier exports: provenance",
}
"""Every ``cfg.json`` field the importer knows, and what it maps to."""


def write_saelens(work: Path, model_tensors: dict, config: SAEConfig, provenance: dict | None) -> dict:
    """Write the weights of an SAELens export (float32, nothing to fold) and return its ``cfg.json``."""
    save_file({k: v.contiguous() for k, v in model_tensors.items()}, str(work / WEIGHTS_FILE))
    prov = provenance or {}
    return {
        "architecture": "topk", "d_in": config.d_in, "d_sae": config.n_latents, "k": config.k, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": config.subtract_decoder_bias, "normalize_activations": "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        # SAELens keeps every metadata key through its own load and save: our record travels inside it.
        "metadata": {
            "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": prov.get("backbone"), "hook_name": prov.get("output_kind"), "provenance": provenance,
        },
    }


def is_version_6(cfg: dict) -> bool:
    """SAELens's own rule: the config is in the version-6 layout when a recorded SAELens version is 6 or later."""
    version = cfg.get("sae_lens_version")
    if not version and isinstance(cfg.get("metadata"), dict):
        version = cfg["metadata"].get("sae_lens_version")
    try:
        return int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def read_saelens(src_dir: Path) -> ForeignSAE:
    """The SAE of an SAELens folder in our terms, every setting honoured or refused (``ArtifactError``)."""
    cfg_path = src_dir / CONFIG_FILE
    cfg = read_json(cfg_path, expect=dict, hint="it is not an SAELens config")
    v6 = is_version_6(cfg)
    k = _topk_k(cfg, cfg_path, v6)  # first: another architecture is named as such, whatever its fields
    unknown = sorted(set(cfg) - set(SAELENS_FIELDS))
    if unknown:
        raise ArtifactError(
            f"{cfg_path}: field(s) {unknown} are not SAELens fields this importer knows; each might change what "
            "the SAE computes, so the SAE is not imported (the README's SAELens table lists the known fields)"
        )
    d_in, d_sae = (positive_int(cfg.get(key), key, cfg_path) for key in ("d_in", "d_sae"))
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise ArtifactError(f"{cfg_path}: dtype {cfg.get('dtype')!r} is not one of SAELens's {sorted(DTYPES)}")
    metadata = _metadata(cfg, v6)
    _check_reshape(cfg, cfg_path, metadata, v6)

    weights_path = src_dir / WEIGHTS_FILE
    raw, _ = read_safetensors(weights_path)
    check_tensor_names(weights_path, raw, PARAM_NAMES, () if v6 else ("scaling_factor", "finetuning_scaling_factor"))
    tensors = at_peer_precision(raw, DTYPES[dtype_name], str(weights_path), f"dtype {dtype_name!r}")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    config = _our_config(d_in, d_sae, k, apply_b_dec, cfg_path)
    check_shapes(tensors, config, weights_path)
    folded = ("finetuning_scaling_factor",) if _fold_finetuning_scale(tensors, cfg, cfg_path) else ()
    tensors, more = fold_normalisation(
        tensors, _normalisation(cfg, v6), bool(cfg.get("rescale_acts_by_decoder_norm", False)), apply_b_dec,
        src_dir, cfg_path,
    )
    return ForeignSAE(
        config=config, tensors=tensors, provenance=_provenance(cfg, metadata),
        frequency=read_sparsity(src_dir / SPARSITY_FILE, d_sae), folded=folded + more,
    )


def _topk_k(cfg: dict, cfg_path: Path, v6: bool) -> int:
    """``k`` of a top-k SAE; any other architecture refused by name."""
    arch = cfg.get("architecture")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not v6 and activation == "topk" and kwargs.get("k") is not None:
        arch, k = "topk", kwargs["k"]  # SAELens 5 stored top-k as an activation of the standard architecture
    else:
        k = cfg.get("k")
    if arch is None and v6:
        raise ArtifactError(f"{cfg_path} has no 'architecture'; SAELens 6 cannot load it either")
    arch = arch or "standard"
    if arch != "topk":
        reason = REFUSED_ARCHITECTURES.get(arch, "not an architecture this importer knows")
        raise ArtifactError(f"{cfg_path}: architecture {arch!r} is {reason}; only SAELens 'topk' SAEs import")
    return positive_int(k, "k", cfg_path)


def _metadata(cfg: dict, v6: bool) -> dict:
    """The description SAELens itself would read: ``metadata`` (6) or the flat top-level keys (5)."""
    if v6:
        return dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), dict) else {}
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "hook_point_layer": "hook_layer"}
    flat = {renamed.get(key, key): value for key, value in cfg.items() if SAELENS_FIELDS[key] == _DESCRIPTIVE
            or key in ("model_name", "hook_name", "hook_point")}
    old_meta = cfg.get("meta") if isinstance(cfg.get("meta"), dict) else {}  # earlier exports of ours
    return {**old_meta, **{k: v for k, v in flat.items() if v is not None}}


def _check_reshape(cfg: dict, cfg_path: Path, metadata: dict, v6: bool) -> None:
    # SAELens 5 had no field: it reshaped whenever the hook name was an attention z hook.
    default = "hook_z" if not v6 and "hook_z" in str(metadata.get("hook_name") or "") else "none"
    reshape = cfg.get("reshape_activations", default)
    if reshape != "none":
        raise ArtifactError(
            f"{cfg_path}: reshape_activations={reshape!r} makes SAELens take per-head (n_heads, d_head) activations "
            "and give them back per head; our SAE takes one flat vector per row, so it is not imported"
        )


def _normalisation(cfg: dict, v6: bool) -> str:
    value = cfg.get("normalize_activations", "none")
    if not v6 and isinstance(value, bool):  # SAELens 5's boolean meant the expected-norm scaling
        return "expected_average_only_in" if value else "none"
    return "none" if value is None else str(value)


def _fold_finetuning_scale(tensors: dict, cfg: dict, cfg_path: Path) -> bool:
    """SAELens 5 multiplies the codes by a per-latent ``scaling_factor`` before decoding: fold it into ``W_dec``.

    As in SAELens, a factor of ones (which it once saved with every SAE) is dropped, and without the tensor
    there is nothing to apply whatever the config's flag says."""
    scale = tensors.pop("finetuning_scaling_factor", None)
    scale = tensors.pop("scaling_factor", scale)
    if scale is None or bool(torch.all(scale == 1)):
        return False
    if tuple(scale.shape) != (tensors["W_dec"].shape[0],):
        raise ArtifactError(f"{cfg_path}: scaling_factor has shape {tuple(scale.shape)}, the SAE has "
                            f"{tensors['W_dec'].shape[0]} latents")
    if not cfg.get("finetuning_scaling_factor"):
        raise ArtifactError(f"{cfg_path}: the weights hold a scaling_factor but finetuning_scaling_factor is false; "
                            "SAELens refuses this SAE too")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ArtifactError(f"{cfg_path}: finetuning_scaling_factor with rescale_acts_by_decoder_norm: no SAELens "
                            "version computes both")
    tensors["W_dec"] = (tensors["W_dec"].double() * scale.double()[:, None]).float()
    return True


def _our_config(d_in: int, d_sae: int, k: int, apply_b_dec: bool, cfg_path: Path) -> SAEConfig:
    try:
        return SAEConfig(d_in=d_in, n_latents=d_sae, k=k, subtract_decoder_bias=apply_b_dec)
    except ValueError as e:
        raise ArtifactError(f"{cfg_path}: d_in={d_in}, d_sae={d_sae}, k={k} is not a valid top-k SAE ({e})") from e


def _provenance(cfg: dict, metadata: dict) -> dict | None:
    """Our record when we wrote it (inside metadata, or at the top level in earlier exports), else SAELens's."""
    for record in (metadata.get("provenance"), cfg.get("provenance")):
        if isinstance(record, dict):
            return record
    return clean_provenance({
        "backbone": metadata.get("model_name"), "output_kind": metadata.get("hook_name"),
        "dataset": metadata.get("dataset_path"), "hook_head_index": metadata.get("hook_head_index"),
    })
