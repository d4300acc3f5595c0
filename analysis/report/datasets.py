"""Which data a run used, recognised by content, and whether it is the paper's.

The paper's numbers are set beside a run only when the run's data is the paper's. The mnist preset reads any
four IDX files, so the files are recognised by their published MD5 hashes (those torchvision checks its
downloads against, ``torchvision.datasets.MNIST.resources`` and its Fashion-MNIST and KMNIST twins): MNIST is
the paper's Section 4 data; Fashion-MNIST and KMNIST are named, with their class names, and not compared; any
other IDX data is "not the paper's data". The hashes are of the ``.gz`` files as published, so a folder that
holds only decompressed files (torchvision's ``raw/`` keeps both) can't be recognised, and the report says so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from artifacts import sha256_file

KNOWN_IDX = {
    "MNIST": {
        "md5": {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
                "test_images": "9fb629c4189551a2d022fa330f9573f3", "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
        "classes": [str(i) for i in range(10)], "paper": True,
    },
    "Fashion-MNIST": {
        "md5": {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                "test_images": "bef4ecab320f06d8554ea6380940ec79", "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"], "paper": False,
    },
    "KMNIST": {
        "md5": {"train_images": "bdb82020997e1d708af4cf47b453dcf7", "train_labels": "e144d726b3acfaa3e44228e80efcd344",
                "test_images": "5c965bf0a639b31b8f53240b1b52f4d7", "test_labels": "7320c461ea6c1c855c0b718fb2a4b134"},
        "classes": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"], "paper": False,
    },
}
"""Well-known IDX data sets: the MD5 of each published ``.gz`` file, the class names, whether it is the paper's."""
NOT_PAPER = "not the paper's data: not compared"
"""The verdict on a number of a run whose data is not the paper's."""


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _published_file(path: Path) -> Path | None:
    """The ``.gz`` whose published hash can be checked: the file itself, or the archive beside it."""
    if path.name.endswith(".gz"):
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def identify_idx(data: dict) -> dict:
    """``{"name", "classes", "paper_data", "evidence"}`` of the IDX data a run's ``data`` setting names
    (``{"kind": "idx", "dir", "sha256": {part: hash}}``), recognised by the files' content."""
    from embeddings.idx import IdxError, find_idx_files

    unknown = {"name": None, "classes": None, "paper_data": False}
    try:
        files = find_idx_files(data["dir"])
    except (IdxError, OSError, KeyError) as e:
        return {**unknown, "evidence": f"the IDX files can't be read any more ({e})"}
    recorded = data.get("sha256") or {}
    changed = [part for part, path in files.items() if recorded.get(part) not in (None, sha256_file(path))]
    if changed:
        return {**unknown, "evidence": f"the IDX files in {data['dir']} changed since this run ({', '.join(changed)})"}
    published = {part: _published_file(path) for part, path in files.items()}
    if any(p is None for p in published.values()):
        return {**unknown, "evidence": "only decompressed IDX files: the published hashes are those of the .gz "
                                       "files, so the data can't be recognised (keep the .gz files beside them)"}
    md5 = {part: _md5(p) for part, p in published.items()}
    for name, known in KNOWN_IDX.items():
        if md5 == known["md5"]:
            return {"name": name, "classes": known["classes"], "paper_data": known["paper"],
                    "evidence": f"the MD5 of the four .gz files match the published {name} files"}
    return {**unknown, "evidence": "the MD5 of the four .gz files match no published IDX data set"}


def describe_data(preset: str, results: dict, n_classes: int | None = None) -> dict:
    """``{"name", "classes", "paper_data", "evidence"}``: what the run's data is, and whether the paper's numbers
    may be set beside it. ``results``: the run's finished stages; ``n_classes``: the store's class count."""
    if preset == "theory":
        return {"name": "the paper's Section 2 model (simulated)", "classes": None, "paper_data": True,
                "evidence": "a simulation of the model the claims are made about"}
    data = _data_setting(results)
    if preset == "digits" or (data or {}).get("kind") == "digits":
        return {"name": "scikit-learn handwritten digits (8×8)", "classes": None, "paper_data": False,
                "evidence": "the paper has no run on these digits"}
    if (data or {}).get("kind") == "idx":
        found = identify_idx(data)
        return {**found, "name": found["name"] or "IDX data set (not recognised)"}
    if preset == "imagenet-clip":
        if n_classes == 1000:
            return {"name": "ImageNet-1k (class folders)", "classes": None, "paper_data": True,
                    "evidence": "1000 classes in ImageNet's layout; the images themselves are not checked"}
        return {"name": "an image-folder data set", "classes": None, "paper_data": False,
                "evidence": f"{n_classes} classes: not ImageNet-1k's 1000"}
    return {"name": "unknown", "classes": None, "paper_data": False, "evidence": "no data setting in this run"}


def _data_setting(results: dict) -> dict | None:
    for name in ("backbone", "width"):
        stage = results.get(name)
        data = stage.settings.get("data") if stage is not None else None
        if isinstance(data, dict):
            return data
    return None
