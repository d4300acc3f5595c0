"""Preprocessing: a model's eval transform as timm resolves it, and that transform split for throughput.

``split_transform`` cuts a transform into the per-image part, which ends in an 8-bit tensor, and a per-channel
scale and shift that ``Backbone.normalize_batch`` applies once per stacked batch on the forward device (as FFCV
and DALI do): per image this saves ToTensor and Normalize, and 4x fewer bytes move from workers and to a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import transforms


def timm_transform(model: nn.Module):
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    preprocessing = {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg.get("interpolation"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    return transform, preprocessing


def split_transform(transform) -> tuple[Callable, torch.Tensor | None, torch.Tensor | None]:
    """``transform`` as ``(image_transform, scale, shift)``: a per-image part ending in a uint8 tensor, and the
    per-channel ``(1, C, 1, 1)`` float32 scale and shift that finish it (see ``Backbone.normalize_batch``).

    Only a ``Compose`` whose last two steps are exactly ToTensor (or timm's MaybeToTensor) and Normalize is
    split; the steps before them (resize, crop, greyscale) stay as they are. Anything else (another final step,
    a subclass that might behave differently, a zero std that Normalize itself refuses) gives
    ``(transform, None, None)``: the full float transform per image and no batch step, slower but the same.
    """
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else []
    if len(steps) < 2 or type(steps[-2]) not in _to_tensor_types() or type(steps[-1]) is not transforms.Normalize:
        return transform, None, None
    mean = torch.as_tensor(steps[-1].mean, dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(steps[-1].std, dtype=torch.float64).reshape(-1)
    if (std.float() == 0).any():
        return transform, None, None
    # Computed in float64 and rounded once, so the fused step stays within float32 rounding of the reference.
    scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1)
    shift = (-mean / std).float().view(1, -1, 1, 1)
    # PILToTensor returns a view of the pixels in Pillow's (H, W, C) order: ``extract`` stacks such views
    # straight into a channels-last batch without transposing them.
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), scale, shift


def _to_tensor_types() -> tuple[type, ...]:
    try:
        from timm.data.transforms import MaybeToTensor
    except ImportError:  # older timm: plain ToTensor only
        return (transforms.ToTensor,)
    return (transforms.ToTensor, MaybeToTensor)


