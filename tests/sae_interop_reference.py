"""SAELens's and sparsify's forward passes written out from their source (SAELens 6.54: ``TopKSAE.encode``/
``decode``, ``process_sae_in``, the activation scaler; sparsify 1.3: ``SparseCoder.encode``/``decode``), and
writers of their folders, so that the interop tests run without either library installed."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

D, N, K = 12, 40, 4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """``(b, n)`` codes from our ``(values, indices)``."""
    return torch.zeros(values.shape[0], n, dtype=values.dtype).scatter_(1, indices, values)


def saelens_forward(t: dict, cfg: dict, x: torch.Tensor, scaling_factor=None, whitening=None):
    """SAELens's top-k SAE on raw inputs ``x``: ``(codes (b, n), reconstruction (b, d))``.

    ``scaling_factor`` / ``whitening`` (``(mean, M, M^-1)``) are the normalisation the SAE was trained under
    (``normalize_activations`` ``expected_average_only_in`` / ``covariance_whitening``): inputs normalised before
    the SAE, outputs mapped back after it, as SAELens's trainer does.
    """
    dtype = DTYPES[cfg.get("dtype", "float32")]
    t = {name: v.to(dtype) for name, v in t.items()}
    x = x.to(dtype)
    if scaling_factor is not None:
        x = x * scaling_factor
    if whitening is not None:
        x = (x - whitening[0].to(dtype)) @ whitening[1].to(dtype)
    pre = (x - t["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))) @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * norms
    top = torch.topk(pre, cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    to_decode = acts / norms if cfg.get("rescale_acts_by_decoder_norm") else acts
    if "scaling_factor" in t:  # SAELens 5's finetuning scaling factor
        to_decode = to_decode * t["scaling_factor"]
    out = to_decode @ t["W_dec"] + t["b_dec"]
    if whitening is not None:
        out = out @ whitening[2].to(dtype) + whitening[0].to(dtype)
    if scaling_factor is not None:
        out = out / scaling_factor
    return acts.float(), out.float()


def sparsify_forward(t: dict, cfg: dict, x: torch.Tensor):
    """sparsify's SparseCoder: ReLU of the linear encoder of ``x - b_dec``, top-k, decode with ``W_dec``."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = torch.topk(pre, cfg.get("k", 32), dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return acts, acts @ t["W_dec"] + t["b_dec"]


def random_tensors(seed: int, d: int = D, n: int = N, unit_rows: bool = True) -> dict[str, torch.Tensor]:
    """Random SAE weights; decoder rows of norms between 0.3 and 3 unless ``unit_rows``."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    if not unit_rows:
        W_dec = W_dec * (0.3 + 2.7 * torch.rand(n, 1, generator=g))
    return {"W_enc": torch.randn(d, n, generator=g) * 0.5, "b_enc": torch.randn(n, generator=g) * 0.1,
            "W_dec": W_dec, "b_dec": torch.randn(d, generator=g) * 0.1}


def saelens_cfg(**fields) -> dict:
    """A version-6 SAELens top-k ``cfg.json``, as ``SAE.save_model`` writes it."""
    return {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {"sae_lens_version": "6.54.12", "model_name": "vit_base_patch16_clip_224.openai",
                         "hook_name": None}, **fields}


def write_saelens(path, t, cfg: dict | None = None, **fields) -> dict:
    """An SAELens folder: ``cfg.json`` (``cfg`` or ``saelens_cfg(**fields)``) and ``sae_weights.safetensors``."""
    cfg = saelens_cfg(**fields) if cfg is None else cfg
    path.mkdir()
    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def sparsify_files(t: dict) -> dict[str, torch.Tensor]:
    return {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
            "b_dec": t["b_dec"]}


def write_sparsify(path, t, **fields) -> dict:
    """A sparsify folder as ``SparseCoder.save_to_disk`` writes it."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sparsify_files(t).items()}, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **fields}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg


def x_batch(seed: int = 5, n: int = 64, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
