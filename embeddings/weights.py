"""Backbone weights: state-dict files read safely and loaded strictly, the hub cache's files, and their hashes.

A weights file is a ``.safetensors``, ``.pth``/``.pt`` or ``.bin`` state dict (optionally wrapped in a dict under
``"state_dict"`` or ``"model"``, optionally with DDP's ``module.`` prefix), or a folder holding ``model.safetensors``
(or ``pytorch_model.bin`` ...). Torch files are read with ``torch.load(weights_only=True)`` only, and a refusal
never advises unpickling. A checkpoint in a model's original (non-timm) layout, or at another input size, loads
when timm's own conversion for that architecture (``checkpoint_filter_fn``) makes it fit strictly.

Random weights have no file: ``state_sha256`` hashes the tensors themselves, so that a rebuilt network can be
compared with the one a store was extracted with.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from artifacts import ArtifactError, sha256_file, torch_load_refusal

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHT_FILE_NAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                     "open_clip_pytorch_model.bin")
"""Weights files looked for, in this order, when ``weights`` is a folder."""


class WeightsError(ArtifactError):
    """Backbone weights can't be had or don't fit the model."""


def hub_hint(name: str) -> str:
    """How to get weights when the hub's can't be had."""
    return (
        f"pass a local weights file instead, e.g. `--weights /path/to/model.safetensors` (or a .pth/.bin state "
        f"dict) in Python `load_backbone({name!r}, weights='/path/to/model.safetensors')`, or fill the Hugging Face "
        f"cache (HF_HOME) on a machine with network access; `--weights random` gives random weights"
    )


def weights_info(source: str, sha256: str | None, converted: bool = False) -> dict:
    """The weights entries of ``Backbone.info``: where they came from, their file's hash, whether timm's
    checkpoint conversion was needed to load them."""
    return {"weights_source": source, "weights_sha256": sha256, "weights_converted": converted}


def short(e: Exception, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def hub_source_and_sha(cfg: dict) -> tuple[str, str | None]:
    """``hub:<id>`` and the SHA-256 of the cached weights file when it can be found."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo_id, _, revision = hub_id.partition("@")
        names = [cfg.get("hf_hub_filename"), "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in [n for n in names if n]:
                found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return f"hub:{hub_id}", sha256_file(found)
        except Exception:
            pass
        return f"hub:{hub_id}", None
    url = cfg.get("url") or cfg.get("file") or ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return f"hub:{url}", (sha256_file(cached) if url and cached.is_file() else None)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``/``.pth``/``.pt``/``.bin`` file, unwrapped and without ``module.`` prefixes.

    ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: never unpickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass --weights hub, random, or an existing file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {path} has suffix {suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch signal damaged files with many types
        detail = short(e) if suffix == ".safetensors" else torch_load_refusal(e)
        raise WeightsError(
            f"cannot read weights file {path} ({type(e).__name__}: {detail}); pass a file of tensors only: a "
            f".safetensors file, or a state dict saved with torch.save(model.state_dict(), PATH)"
        ) from e
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not torch.is_tensor(state.get(key)):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict of tensors")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    return missing, unexpected, shapes


def _listing(keys: list[str], n: int = 8) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def load_file_into(model: nn.Module, path: Path) -> bool:
    """Load a state dict file strictly; a mismatch names the file and the missing/unexpected keys.

    Returns whether timm's conversion for the architecture was needed to make the file fit.
    """
    state = read_state_dict(path)
    missing, unexpected, shapes = _mismatch(model, state)
    converted = False
    if missing or unexpected or shapes:
        candidate = _timm_converted(model, state)
        if candidate is not None and not any(_mismatch(model, candidate)):
            state, missing, unexpected, shapes, converted = candidate, [], [], [], True
    if missing or unexpected or shapes:
        parts = [f"missing keys {_listing(missing)}" if missing else "",
                 f"unexpected keys {_listing(unexpected)}" if unexpected else "",
                 f"shape mismatches {_listing(shapes, 4)}" if shapes else ""]
        raise WeightsError(
            f"weights file {path} does not fit model {_architecture_name(model)!r}: "
            + "; ".join(p for p in parts if p)
            + ". Check the model name (and its num_classes) against the checkpoint."
        )
    model.load_state_dict(state, strict=True)
    return converted


def resolve_weights_path(weights: str | os.PathLike) -> Path:
    """A weights file, or the weights file inside a folder (a Hugging Face snapshot, an export directory)."""
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(
            f"weights folder {path} holds none of {', '.join(WEIGHT_FILE_NAMES)}; pass the weights file itself"
        )
    return path


def _timm_converted(model: nn.Module, state: dict) -> dict | None:
    """The state dict after timm's own conversion for this architecture, when it has one and it works."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return None
    try:
        out = fn(dict(state), model)
    except Exception:
        return None
    return out if isinstance(out, dict) else None




def _architecture_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, bytes), for weights that have no file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
