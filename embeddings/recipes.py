"""Named backbone recipes: a model and the preprocessing its authors used, as one choice recorded in a store.

``paper-clip-vit-b16`` is what the paper ran (its Section 3; the authors embed with OpenAI's
``clip.load("ViT-B/16")``):

- the model is timm's ``vit_base_patch16_clip_quickgelu_224.openai``. OpenAI's CLIP uses QuickGELU
  activations; timm's plain ``vit_base_patch16_clip_224.openai`` loads the same weights into GELU blocks, and
  timm's own note on it says to use the QuickGELU variant for the original results;
- the preprocessing is a bicubic resize of the short side to 256, a 224 center crop and CLIP's mean/std (the
  authors' ImageNet copy was already resized to 256). timm's default transform for this model resizes to 248
  (crop_pct 0.9), which is not what the paper saw;
- the output is the 512-d image projection (the head), L2-normalised.

``RECIPE=MODEL`` (e.g. ``paper-clip-vit-b16=vit_tiny_patch16_224``) keeps the recipe's preprocessing and output
with another timm model standing in, for tests; the store's meta then records both names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Recipe:
    """A backbone and its preprocessing, chosen together."""

    name: str
    """The recipe's name, as passed for ``--backbone``."""
    model: str
    """The timm model name."""
    resize: int
    """Short side after the resize."""
    crop: int
    """Side of the center crop."""
    interpolation: str
    """Resize interpolation (``bicubic``, as CLIP's own transform)."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling to 0..1."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided by."""
    output: str
    """``head`` (the embedding projection) or ``pre_logits``."""
    normalize: bool
    """Whether embeddings are L2-normalised."""
    description: str
    """One line for reports."""


PAPER_CLIP = "paper-clip-vit-b16"
RECIPES = {
    PAPER_CLIP: Recipe(
        name=PAPER_CLIP, model="vit_base_patch16_clip_quickgelu_224.openai", resize=256, crop=224,
        interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD, output="head", normalize=True,
        description="OpenAI CLIP ViT-B/16 (QuickGELU), resize 256 + center crop 224, CLIP mean/std, "
                    "512-d projection, L2-normalised (the paper's Section 3)",
    ),
}


def parse_recipe(name: str) -> tuple[Recipe, str] | None:
    """``(recipe, timm model)`` for ``RECIPE`` or ``RECIPE=MODEL``; ``None`` when ``name`` names no recipe."""
    base, _, stand_in = name.partition("=")
    recipe = RECIPES.get(base)
    if recipe is None:
        return None
    return recipe, (stand_in or recipe.model)


def recipe_transform(recipe: Recipe) -> transforms.Compose:
    """PIL RGB image -> normalised ``(3, crop, crop)`` float tensor, as the recipe's authors prepared images."""
    mode = transforms.InterpolationMode(recipe.interpolation)
    return transforms.Compose([
        transforms.Resize(recipe.resize, interpolation=mode),
        transforms.CenterCrop(recipe.crop),
        transforms.ToTensor(),
        transforms.Normalize(recipe.mean, recipe.std),
    ])


def recipe_preprocessing(recipe: Recipe, model: str) -> dict:
    """The recipe's preprocessing in the shape of timm's resolved data config, plus the recipe's name."""
    return {
        "input_size": [3, recipe.crop, recipe.crop],
        "interpolation": recipe.interpolation,
        "mean": list(recipe.mean),
        "std": list(recipe.std),
        "crop_pct": recipe.crop / recipe.resize,
        "crop_mode": "center",
        "resize_short_side": recipe.resize,
        "recipe": recipe.name,
        "model": model,
    }


def recipe_record(recipe: Recipe, model: str) -> dict:
    """The JSON record of a recipe as used (the stand-in model, if any, included)."""
    return {**asdict(recipe), "model_used": model, "stand_in": model != recipe.model}
