"""Frozen backbones: a model, its own preprocessing, and one embedding per image.

``load_backbone(name, weights, output, normalize)`` builds any timm model by name, or the digits CNN
(``name="digits-cnn"``), freezes it (``eval()``, no gradients) and pairs it with the eval transform of its
resolved timm data config, so that images are prepared exactly as the weights expect.

Weights:

- ``"hub"``: timm's ``pretrained=True``, which reads the Hugging Face cache and honours
  ``HF_HUB_OFFLINE``. When the weights can't be had, ``WeightsError`` says so and how to pass a file;
- a path to a ``.safetensors``, ``.pth``/``.pt`` or ``.bin`` state dict (optionally wrapped in a dict under
  ``"state_dict"`` or ``"model"``, optionally with DDP's ``module.`` prefix), or a folder holding
  ``model.safetensors`` (or ``pytorch_model.bin`` ...), loaded strictly. A checkpoint in a model's original
  (non-timm) layout, or at another input size, is accepted when timm's own conversion for that architecture
  (``checkpoint_filter_fn``, as timm applies to hub weights) makes it load strictly; ``info["weights_converted"]``
  then says so;
- ``"random"``: explicitly random initialisation (tests, baselines).

Output (``output="auto"`` picks one, ``"head"`` or ``"pre_logits"`` forces it):

- ``"pre_logits"``: the pooled features before the classifier (``forward_features`` then
  ``forward_head(..., pre_logits=True)``), for classifiers such as ``resnet50`` or ``convnext_tiny``;
- ``"head"``: the head's output, chosen automatically when the head is an embedding projection rather
  than a classifier: image-text models (names with ``clip`` or ``siglip``, e.g.
  ``vit_base_patch16_clip_224.openai`` whose head is CLIP's 512-d image projection), unless their
  pretrained tag says they were fine-tuned on classes (``ft``, ``in1k``, ``in12k``, ``in21k``, ``in22k``).

``normalize=None`` L2-normalises the embeddings of image-text models (as the paper does for CLIP) and
leaves the others as they are.

Preprocessing comes in two equal forms. ``transform`` is the model's eval transform as timm (or the digits
CNN) defines it: PIL image -> normalised float tensor, the plain reference. ``image_transform`` and
``normalize_batch`` split it for throughput, as FFCV and DALI do: the per-image part (resize, crop) ends in an
8-bit tensor, and the float conversion and normalisation run once per stacked batch, on the forward device.
Per image this saves ToTensor and Normalize (about 0.7 of the 2.5 ms of CPU that a 256px JPEG took to become a
224px input), and it moves 4x fewer bytes from workers and to a GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from artifacts import ArtifactError, sha256_file
from embeddings.recipes import parse_recipe, recipe_preprocessing, recipe_record, recipe_transform

OUTPUT_KINDS = ("auto", "head", "pre_logits")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHT_FILE_NAMES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                     "open_clip_pytorch_model.bin")
"""Weights files looked for, in this order, when ``weights`` is a folder."""
DIGITS_CNN = "digits-cnn"
_EMBEDDING_MARKERS = ("clip", "siglip")
_CLASSIFIER_TAG_MARKERS = ("in1k", "in12k", "in21k", "in22k")


class WeightsError(ArtifactError):
    """Backbone weights can't be had or don't fit the model."""


@dataclass
class Backbone:
    """A frozen model, the transform its weights expect, and a JSON-able description for store metadata."""

    model: nn.Module
    """The frozen model (``eval()``, ``requires_grad_(False)``)."""
    transform: Callable[[Image.Image], torch.Tensor]
    """PIL RGB image -> ``(C, H, W)`` float tensor: the model's eval preprocessing."""
    info: dict = field(default_factory=dict)
    """name, weights_source, weights_sha256, preprocessing, output_kind, normalize, d (and a few more)."""
    image_transform: Callable[[Image.Image], torch.Tensor] = field(init=False, repr=False)
    """PIL RGB image -> ``(C, H, W)`` uint8 tensor: ``transform`` without its final ToTensor and Normalize, which
    ``normalize_batch`` applies to a stacked batch. Derived from ``transform`` (``split_transform``); when that
    does not end in exactly (ToTensor, Normalize), it is ``transform`` itself and ``normalize_batch`` does
    nothing."""

    def __post_init__(self):
        self.image_transform, self._scale, self._shift = split_transform(self.transform)
        self._scale_shift_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch ``(b, C, H, W)`` of stacked ``image_transform`` outputs -> the float32 batch ``transform``
        would have given, on the batch's device, in the batch's memory format (channels-last stays so).

        ToTensor's division by 255 and Normalize's ``(x - mean) / std`` are fused into one pass,
        ``x * 1/(255 std) + (-mean/std)``; the result equals the reference up to float32 rounding (~1e-6).
        """
        if self._scale is None:
            return batch  # image_transform is the whole transform
        if batch.dtype != torch.uint8:
            raise ValueError(f"normalize_batch takes stacked image_transform outputs (uint8), got {batch.dtype}")
        if batch.device not in self._scale_shift_on:  # a small copy per device, not one per batch
            self._scale_shift_on[batch.device] = (self._scale.to(batch.device), self._shift.to(batch.device))
        scale, shift = self._scale_shift_on[batch.device]
        # uint8 * float32 promotes to float32 within the same kernel: no separate conversion pass.
        return torch.addcmul(shift, batch, scale)

    @property
    def d(self) -> int:
        """Embedding width."""
        return int(self.info["d"])

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(b, d)`` float32 of a batch ``(b, C, H, W)`` of transformed images.

        L2-normalised when ``info["normalize"]``. Gradient mode and autocast are left to the caller.
        """
        z = self.model.forward_features(batch)
        z = self.model.forward_head(z, pre_logits=self.info["output_kind"] == "pre_logits")
        z = z.flatten(1).float()
        if self.info["normalize"]:
            z = F.normalize(z, dim=1)
        return z


def load_backbone(
    name: str,
    weights: str | os.PathLike = "hub",
    output: str = "auto",
    normalize: bool | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build the frozen backbone ``name`` with ``weights`` (``"hub"``, ``"random"`` or a file path).

    ``output`` is ``"auto"``, ``"head"`` or ``"pre_logits"``; ``normalize=None`` means on for
    image-text (embedding-head) models only. See the module docstring for the rules.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"--output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
    recipe = parse_recipe(name)  # a named model + preprocessing choice (embeddings.recipes), e.g. the paper's CLIP
    if name == DIGITS_CNN:
        model, transform, preprocessing, weights_info, embedding_head = _digits_cnn(weights)
    elif recipe is not None:
        model, _, _, weights_info, _ = _timm_model(recipe[1], weights)
        transform, preprocessing = recipe_transform(recipe[0]), recipe_preprocessing(*recipe)
        embedding_head = recipe[0].output == "head"
        output = recipe[0].output if output == "auto" else output
        normalize = recipe[0].normalize if normalize is None else normalize
        weights_info = {**weights_info, "recipe": recipe_record(*recipe)}
    else:
        model, transform, preprocessing, weights_info, embedding_head = _timm_model(name, weights)
    has_head = getattr(model, "num_classes", 0) > 0
    if output == "auto":
        output_kind = "head" if embedding_head and has_head else "pre_logits"
    else:
        output_kind = output
    if normalize is None:
        normalize = embedding_head
    model = model.to(device).eval().requires_grad_(False)
    backbone = Backbone(
        model=model,
        transform=transform,
        info={
            "name": name,
            "architecture": _architecture(model, name),
            **weights_info,
            "preprocessing": preprocessing,
            "output_kind": output_kind,
            "normalize": bool(normalize),
            "embedding_head": bool(embedding_head),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "d": None,
        },
    )
    backbone.info["d"] = _probe_width(backbone, preprocessing["input_size"], device)
    return backbone


def _architecture(model: nn.Module, name: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or name


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


@torch.no_grad()
def _probe_width(backbone: Backbone, input_size, device) -> int:
    # One forward of a blank image: the only width that is right for every model's head variants.
    x = torch.zeros((1, *input_size), device=device)
    return int(backbone.features(x).shape[1])


# ---------------------------------------------------------------------------------------------------------
# timm models


def is_embedding_head(name: str, pretrained_cfg: dict | None = None) -> bool:
    """Whether a timm model's head is an embedding projection (image-text models) rather than a classifier."""
    cfg = pretrained_cfg or {}
    arch, _, tag = name.partition(".")
    arch = (cfg.get("architecture") or arch).lower()
    tag = (cfg.get("tag") or tag).lower()
    if not any(m in arch or m in tag for m in _EMBEDDING_MARKERS):
        return False
    words = tag.replace("-", "_").split("_")
    return not ("ft" in words or any(m in tag for m in _CLASSIFIER_TAG_MARKERS))


def _timm_transform(model: nn.Module):
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


def _create(name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "unknown model" in str(e).lower():
            arch = name.partition(".")[0]
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise ValueError(
                f"timm has no model {name!r}" + (f"; similar names: {', '.join(close)}" if close else "")
            ) from e
        raise


def _hub_hint(name: str) -> str:
    return (
        f"pass a local weights file instead, e.g. `--weights /path/to/model.safetensors` (or a .pth/.bin state "
        f"dict) in Python `load_backbone({name!r}, weights='/path/to/model.safetensors')`, or fill the Hugging Face "
        f"cache (HF_HOME) on a machine with network access; `--weights random` gives random weights"
    )


def _weights_info(source: str, sha256: str | None, converted: bool = False) -> dict:
    """The weights entries of ``Backbone.info``: where they came from, their file's hash, whether timm's
    checkpoint conversion was needed to load them."""
    return {"weights_source": source, "weights_sha256": sha256, "weights_converted": converted}


def _timm_model(name: str, weights):
    import timm

    weights_str = str(weights)
    converted = False
    if weights_str == "random":
        model = _create(name, pretrained=False)
        source, sha = "random", None
    elif weights_str == "hub":
        pretrained_cfg = _pretrained_cfg(name)
        if not (pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url") or pretrained_cfg.get("file")):
            raise WeightsError(f"timm has no pretrained weights for {name!r}; {_hub_hint(name)}")
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # network, cache, offline mode, auth: all mean the weights can't be had
            raise WeightsError(
                f"could not get the pretrained weights of {name!r} from the Hugging Face hub or its local cache "
                f"({type(e).__name__}: {_short(e)}); {_hub_hint(name)}"
            ) from e
        source, sha = _hub_source_and_sha(model.pretrained_cfg)
    else:
        path = resolve_weights_path(weights_str)
        model = _create(name, pretrained=False)
        converted = _load_file_into(model, path)
        source, sha = f"file:{path.resolve()}", sha256_file(path)
    transform, preprocessing = _timm_transform(model)
    embedding_head = is_embedding_head(name, getattr(model, "pretrained_cfg", None))
    return model, transform, preprocessing, _weights_info(source, sha, converted), embedding_head


def _pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``), without building the model."""
    import timm.models

    arch = name.partition(".")[0]
    if not timm.models.is_model(arch):
        _create(name, pretrained=False)  # raises the unknown-model error with suggestions
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return {} if cfg is None else cfg.to_dict()


def _short(e: Exception, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _hub_source_and_sha(cfg: dict) -> tuple[str, str | None]:
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
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path} ({type(e).__name__}: {_short(e)})") from e
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


def _load_file_into(model: nn.Module, path: Path) -> bool:
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
            f"weights file {path} does not fit model {_architecture(model, type(model).__name__)!r}: "
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


# ---------------------------------------------------------------------------------------------------------
# the digits CNN


def _digits_cnn(weights):
    from embeddings.cnn import CNNConfig, DigitsCNN, cnn_preprocessing, cnn_transform, cnn_weights_path, load_cnn

    weights_str = str(weights)
    if weights_str == "hub":
        raise WeightsError(
            f"{DIGITS_CNN} has no hub weights: train one with `python scripts/train_backbone.py --out CNN_DIR` "
            f"and pass `--weights CNN_DIR` (or `--weights random`)"
        )
    if weights_str == "random":
        model = DigitsCNN(CNNConfig())
        source, sha = "random", None
    else:
        try:
            model = load_cnn(weights_str)
        except ArtifactError as e:
            raise WeightsError(str(e)) from e
        path = cnn_weights_path(weights_str)
        source, sha = f"file:{path.resolve()}", sha256_file(path)
    config = model.config
    return model, cnn_transform(config), cnn_preprocessing(config), _weights_info(source, sha), False
