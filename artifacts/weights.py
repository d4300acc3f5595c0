"""Weights read so that a damaged or crafted file is refused by name before anything is allocated for it.

``load_checked(build, weights_path, config_path, hint)`` builds the module from its config on torch's ``meta``
device (no memory), compares the tensors the file's header lists (names, shapes) with the module's, reads them,
refuses NaN or Inf, and only then builds the module for real and loads the tensors strictly. A config that cannot
build the module (a wrong type, an unknown field) names the config file; a file safetensors cannot parse, or one
whose tensors are not the module's, names the weights file; each message ends with ``hint``, what to run to fix it.
Safetensors never unpickles: these files cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from artifacts.errors import ArtifactError

BUILD_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError)
READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError)


def _header_shapes(weights_path: Path, hint: str) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except READ_ERRORS as e:
        raise ArtifactError(f"{weights_path} is not a readable safetensors file ({e}); {hint}") from None


def load_checked(build: Callable[[], nn.Module], weights_path: Path, config_path: Path, hint: str) -> nn.Module:
    """The module ``build()`` makes, with the weights of ``weights_path`` (module docstring)."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except BUILD_ERRORS as e:
        raise ArtifactError(f"{config_path} does not describe a model this toolkit can build ({e}); {hint}") from None
    found = _header_shapes(weights_path, hint)
    if found != shapes:
        missing, extra = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
        wrong = sorted(k for k in set(found) & set(shapes) if found[k] != shapes[k])
        raise ArtifactError(f"{weights_path} does not match {config_path}: missing {missing}, unexpected {extra}, "
                            f"other shapes {wrong}; {hint}")
    try:
        tensors = load_file(str(weights_path))
    except READ_ERRORS as e:
        raise ArtifactError(f"{weights_path} cannot be read ({e}); {hint}") from None
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ArtifactError(f"{weights_path} holds NaN or Inf in {', '.join(bad)}: a diverged or damaged model; {hint}")
    model = build()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # a dtype the module cannot take
        raise ArtifactError(f"{weights_path} does not fit {config_path} ({e}); {hint}") from None
    return model
