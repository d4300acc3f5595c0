"""Frozen backbones: a model, its own preprocessing, and one embedding per image.

``load_backbone(name, weights, output, normalize)`` builds any timm model by name, or the digits CNN
(``name="digits-cnn"``), freezes it (``eval()``, no gradients) and pairs it with the eval transform of its
resolved timm data config, so that images are prepared exactly as the weights expect.

Weights:

- ``"hub"``: timm's ``pretrained=True``, which reads the Hugging Face cache and honours
  ``HF_HUB_OFFLINE``. When the weights can't be had, ``WeightsError`` says so and how to pass a file;
- a path to a ``.safetensors``, ``.pth``/``.pt`` or ``.bin`` state dict, or a folder holding one, loaded strictly
  (``embeddings.weights``); a checkpoint that only fits after timm's own conversion for the architecture sets
  ``info["weights_converted"]``;
- ``"random"``: explicitly random initialisation (tests, baselines), drawn from ``seed``: the same seed gives the
  same network, and ``info`` records the seed and the SHA-256 of the tensors (``weights.state_sha256``), so that
  ``embeddings.store_backbone`` can rebuild exactly the network a store was extracted with.

Reading weights files is ``embeddings.weights``; preprocessing is ``embeddings.preprocess``.

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
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from artifacts import ArtifactError, sha256_file
from embeddings.preprocess import split_transform, timm_transform
from embeddings.recipes import parse_recipe, recipe_preprocessing, recipe_record, recipe_transform
from embeddings.weights import (
    WeightsError,
    hub_hint,
    hub_source_and_sha,
    load_file_into,
    read_state_dict,
    resolve_weights_path,
    short,
    state_sha256,
    weights_info,
)

__all__ = ["DIGITS_CNN", "OUTPUT_KINDS", "Backbone", "WeightsError", "is_embedding_head", "load_backbone",
           "read_state_dict", "resolve_weights_path", "split_transform"]

OUTPUT_KINDS = ("auto", "head", "pre_logits")
DIGITS_CNN = "digits-cnn"
_EMBEDDING_MARKERS = ("clip", "siglip")
_CLASSIFIER_TAG_MARKERS = ("in1k", "in12k", "in21k", "in22k")


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
    seed: int = 0,
) -> Backbone:
    """Build the frozen backbone ``name`` with ``weights`` (``"hub"``, ``"random"`` or a file path).

    ``output`` is ``"auto"``, ``"head"`` or ``"pre_logits"``; ``normalize=None`` means on for
    image-text (embedding-head) models only. See the module docstring for the rules. The model is built under
    ``torch.manual_seed(seed)`` in a forked RNG (the caller's RNG is left as it was): random weights are a function
    of the seed, which ``info["weights_seed"]`` records with their ``state_sha256``.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"--output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, transform, preprocessing, record, embedding_head, output, normalize = _build(
            name, weights, output, normalize)
    if record["weights_source"] == "random":
        record = {**record, "weights_seed": int(seed), "weights_sha256": state_sha256(model),
                  "weights_sha256_of": "state dict tensors (no weights file)"}
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
            **record,
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


def _build(name: str, weights, output: str, normalize: bool | None):
    """The model, its transform, preprocessing record, weights record and whether its head is an embedding, with
    the output and normalisation a recipe implies."""
    recipe = parse_recipe(name)  # a named model + preprocessing choice (embeddings.recipes), e.g. the paper's CLIP
    if name == DIGITS_CNN:
        return (*_digits_cnn(weights), output, normalize)
    if recipe is None:
        return (*_timm_model(name, weights), output, normalize)
    model, _, _, record, _ = _timm_model(recipe[1], weights)
    transform, preprocessing = recipe_transform(recipe[0]), recipe_preprocessing(*recipe)
    output = recipe[0].output if output == "auto" else output
    normalize = recipe[0].normalize if normalize is None else normalize
    record = {**record, "recipe": recipe_record(*recipe)}
    return model, transform, preprocessing, record, recipe[0].output == "head", output, normalize


def _architecture(model: nn.Module, name: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or name


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
            raise WeightsError(f"timm has no pretrained weights for {name!r}; {hub_hint(name)}")
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # network, cache, offline mode, auth: all mean the weights can't be had
            raise WeightsError(
                f"could not get the pretrained weights of {name!r} from the Hugging Face hub or its local cache "
                f"({type(e).__name__}: {short(e)}); {hub_hint(name)}"
            ) from e
        source, sha = hub_source_and_sha(model.pretrained_cfg)
    else:
        path = resolve_weights_path(weights_str)
        model = _create(name, pretrained=False)
        converted = load_file_into(model, path)
        source, sha = f"file:{path.resolve()}", sha256_file(path)
    transform, preprocessing = timm_transform(model)
    embedding_head = is_embedding_head(name, getattr(model, "pretrained_cfg", None))
    return model, transform, preprocessing, weights_info(source, sha, converted), embedding_head


def _pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``), without building the model."""
    import timm.models

    arch = name.partition(".")[0]
    if not timm.models.is_model(arch):
        _create(name, pretrained=False)  # raises the unknown-model error with suggestions
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return {} if cfg is None else cfg.to_dict()


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
    return model, cnn_transform(config), cnn_preprocessing(config), weights_info(source, sha), False
