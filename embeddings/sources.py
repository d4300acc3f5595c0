"""Image sources: the row order, ids, labels, classes and split of every input kind, and how to read row i.

Kinds:

- ``digits``: the bundled scikit-learn digits (see ``embeddings.digits``); always has its split.
- ``imagefolder``: a directory whose sub-folders are classes (``ROOT/<class>/**/<image>``, the layout of
  ImageNet train/val). Every non-hidden sub-folder is a class, in sorted name order, so that two folders
  with the same class folders give the same labels even when one class is empty there.
- ``flat``: a directory of images without labels, searched recursively.
- ``filelist``: a ``.txt`` or ``.csv`` list of image paths with optional labels; relative paths are
  resolved against the list's own folder.
- ``idx``: MNIST-format IDX files (``embeddings.idx``), with the paper's split.
- ``imagenet``: ``train/`` and ``val/`` class folders (``embeddings.imagenet``), with the paper's split.

Rows are every regular file with an image extension (``images.IMAGE_EXTENSIONS``, any case), sorted,
whether or not it decodes: a damaged file keeps its row so that extraction records it as skipped with
the reason ``load`` gives. Regular files without an image extension are not rows; they are listed in
``ignored`` as ``{"id", "reason"}`` records (the shape of a store's ``skipped.json``). Hidden files and
folders (names starting with ``.``) are not read; each is listed in ``ignored`` too (a hidden folder once,
with a trailing ``/``), so that every entry of the input is accounted for.

Ids are the names as the file system gives them: a name that is not valid UTF-8 (bytes ``caf\\xe9.jpg``) keeps
its bytes as Python's surrogate escapes (``os.fsdecode``), which ``os.fsencode`` turns back into the exact
name, and which ``ids.json`` stores as JSON ``\\udcXX`` escapes. File lists are read the same way.

A directory is an ``imagefolder`` when it holds no images itself and at least one sub-folder holds
images; otherwise it is ``flat``. ``kind=`` overrides the guess.

Each kind lives in its own module (``folders``, ``filelists``, ``digits``, ``idx``, ``imagenet``) on the common
base ``source_base``; this module only chooses among them.
"""


from __future__ import annotations

import os
from pathlib import Path

from embeddings.digits import DigitsSource
from embeddings.filelists import file_list_source
from embeddings.folders import flat_folder_source, guess_folder_kind, image_folder_source
from embeddings.idx import IdxSource
from embeddings.imagenet import ImageNetSource
from embeddings.images import BadImage
from embeddings.source_base import SPLIT_NAMES, ImageSource, check_fractions, stratified_split

KINDS = ("digits", "imagefolder", "flat", "filelist", "idx", "imagenet")


def open_source(
    spec: str | os.PathLike,
    kind: str = "auto",
    seed: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    classes: list[str] | None = None,
    max_pixels: int | None = None,
) -> ImageSource:
    """Open an input by its spec: ``"digits"``, a folder, or a ``.txt``/``.csv`` file list.

    ``kind`` forces ``"imagefolder"``, ``"flat"`` or ``"filelist"`` instead of guessing. ``seed``,
    ``val_fraction`` and ``test_fraction`` set the stratified split: folders and lists have none unless a
    fraction is given; digits always has one (default 60/20/20). ``classes`` pins the class names of a
    labelled file list (so that a train list and a val list share their label numbers).
    ``max_pixels`` overrides the decompression-bomb limit of ``images.load_rgb``.
    """
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"--kind must be one of auto, {', '.join(KINDS)}; got {kind!r}")
    spec_str = str(spec)
    if kind == "digits" or (kind == "auto" and spec_str == "digits"):
        kwargs = {k: v for k, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)) if v is not None}
        return DigitsSource(seed=seed, **kwargs)
    if kind == "idx":  # MNIST-format files (embeddings.idx), with the paper's split
        return IdxSource(spec_str, seed=seed, val_fraction=val_fraction)
    if kind == "imagenet":  # train/ and val/ class folders (embeddings.imagenet), with the paper's split
        return ImageNetSource(spec_str, seed=seed, max_pixels=max_pixels)
    val_fraction = 0.0 if val_fraction is None else float(val_fraction)
    test_fraction = 0.0 if test_fraction is None else float(test_fraction)
    check_fractions(val_fraction, test_fraction)
    path = Path(spec_str).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input {spec_str!r} does not exist; pass 'digits', an image folder, or a .txt/.csv file list"
        )
    if path.is_dir():
        if kind == "filelist":
            raise ValueError(f"--kind filelist needs a .txt or .csv file, but {path} is a folder")
        if kind == "auto":
            kind = guess_folder_kind(path)
        if kind == "imagefolder":
            return image_folder_source(path, seed, val_fraction, test_fraction, max_pixels)
        return flat_folder_source(path, seed, val_fraction, test_fraction, max_pixels)
    if kind in ("auto", "filelist"):
        if path.suffix.lower() not in (".txt", ".csv") and kind == "auto":
            raise ValueError(f"input file {path} is not a .txt or .csv file list; pass --kind filelist to read it as one")
        return file_list_source(path, seed, val_fraction, test_fraction, classes, max_pixels)
    raise ValueError(f"--kind {kind} needs a folder, but {path} is a file")


__all__ = ["BadImage", "ImageSource", "KINDS", "SPLIT_NAMES", "guess_folder_kind", "open_source", "stratified_split"]
