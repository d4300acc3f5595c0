"""Decoding one image file into 8-bit RGB, or a ``BadImage`` that says why it can't be read.

Every input kind reads its files through ``load_rgb`` so that the same file gives the same pixels
everywhere, and so that extraction can skip a bad file and record one short reason for it.

Conversions (decisions where formats leave a choice):

- greyscale (``1``, ``L``), ``CMYK``, ``YCbCr`` and palette images without transparency: Pillow's own
  conversion to ``RGB``;
- transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour): composited on
  white. Dropping the alpha channel instead would expose whatever colour the encoder left under
  transparent pixels (often black, sometimes noise), which is not what anyone sees;
- 16-bit and 32-bit integer greyscale (``I;16*``, ``I``): the 0..65535 range is scaled to 0..255
  (rounded), values outside it are clipped. Pillow's own ``convert`` would clip at 255 instead,
  turning most 16-bit images white;
- 32-bit float greyscale (``F``): treated as 0..1 when its maximum is at most 1, else as 0..255;
- EXIF orientation is not applied, like torchvision's and timm's loaders, so that embeddings match
  those of the usual pipelines; multi-frame files give their first frame.

Decompression bombs: Pillow refuses images larger than ``2 * Image.MAX_IMAGE_PIXELS`` and warns above
``Image.MAX_IMAGE_PIXELS``; here the header's size is checked before decoding, so the limit is
``Image.MAX_IMAGE_PIXELS`` (Pillow's default, about 89 million pixels) or the ``max_pixels`` argument.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
     ".pnm", ".tga", ".ico"}
)
"""File name endings (lower case) that mark a file as an image for the folder and list sources."""

_WHITE = (255, 255, 255)


class BadImage(Exception):
    """A file that can't be decoded into an image; ``reason`` is a short human string for the record."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether a file name has one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _pixel_limit(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _bomb(img_size: tuple[int, int]) -> BadImage:
    return BadImage(f"decompression bomb ({img_size[0] * img_size[1]} pixels)")


def load_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read ``path`` fully and return an 8-bit ``RGB`` image.

    ``max_pixels`` overrides the decompression-bomb limit (default ``Image.MAX_IMAGE_PIXELS``; a
    non-positive value disables it). Raises ``BadImage`` for anything that can't be read: a missing
    or empty file, a file that is not an image, a truncated or corrupt one, or a bomb.
    """
    try:
        return _load_rgb(path, max_pixels)
    except BadImage as e:
        raise BadImage(e.reason, path) from e.__cause__


def _load_rgb(path: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as e:
        raise BadImage(f"cannot stat file ({e.strerror or e})") from e
    if not path.is_file():
        raise BadImage("not a regular file")
    if st.st_size == 0:
        raise BadImage("zero bytes")
    limit = _pixel_limit(max_pixels)
    size = None
    try:
        with open(path, "rb") as f:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the size check below makes it fatal.
            # (Not by turning the warning into an error: warning filters are process-wide, and images are
            # decoded on several threads at once.)
            img = Image.open(f)
            size = img.size
            if limit is not None and limit > 0 and size[0] * size[1] > limit:
                raise _bomb(size)
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow raises inside Image.open, before the size is known here; its message carries the count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        n_pixels = found.group(1) if found else "too many"
        raise BadImage(f"decompression bomb ({n_pixels} pixels)") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image") from e
    except PermissionError as e:
        raise BadImage("permission denied") from e
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise BadImage("truncated file") from e
        raise BadImage(f"corrupt image ({msg or type(e).__name__})") from e
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # Pillow's decoders signal damaged headers and streams with these, not only OSError.
        msg = str(e) or type(e).__name__
        if isinstance(e, EOFError) or "truncated" in msg.lower():
            raise BadImage("truncated file") from e
        raise BadImage(f"corrupt image ({msg})") from e
    try:
        return to_rgb(img)
    except BadImage:
        raise
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot convert mode {img.mode} to RGB ({e})") from e


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit ``RGB`` (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _on_white(img)
        return img.convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I"):
        a = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(np.clip(a, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise BadImage(f"unsupported colour mode {mode}") from e
