"""Fingerprints: what an extraction's output depends on, and what an image folder holds.

``extraction_fingerprint`` is everything a chunk's bytes depend on (settings, the source's listing, the backbone's
weights and preprocessing, the chunk layout, the device type); a partial extraction resumes only under the same
one, and a finished store records its digest.

``folder_fingerprint`` keys a store built from a folder by the folder's content instead of its path: images added,
removed or replaced in the folder change it, so a cache keyed by it never returns a store of the old images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from artifacts import SCHEMA_VERSION, ArtifactError, read_json, sha256_file
from embeddings.folders import walk_files

FOLDER_HASH_LIMIT = 256 << 20
"""A folder holding at most this many bytes is fingerprinted by the SHA-256 of every file; a larger one (an ImageNet:
reading 140 GB on every run would take longer than the run) by each file's size and modification time."""


def name_bytes(name: str) -> bytes:
    """The bytes of a file or folder name: a name that is not valid UTF-8 carries its bytes as surrogate escapes
    (``os.fsdecode``), which go back to exactly those bytes here instead of failing to encode."""
    return name.encode("utf-8", "surrogateescape")


def listing_sha256(source) -> str:
    """Hash of what a source lists (ids, labels, classes, split): a changed folder must not resume."""
    h = hashlib.sha256()
    for i in source.ids:
        h.update(name_bytes(str(i)))
        h.update(b"\0")
    h.update(np.ascontiguousarray(np.asarray(source.labels, dtype=np.int64)).tobytes())
    h.update(name_bytes("\0".join(source.classes)))
    for name in sorted(source.split or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(np.asarray(source.split[name], dtype=np.int64)).tobytes())
    return h.hexdigest()


def extraction_fingerprint(config, run, source, info: dict, device) -> dict:
    """Everything a chunk's bytes depend on: the ``ExtractConfig``, the source's listing and the content of its
    files (``source_content``: an image replaced under the same name must not resume, nor leave a finished store
    standing), the backbone (``info``), the run's chunk size and bf16, the device type. World size and worker
    count are deliberately absent."""
    content = source_content(source)
    return {
        **({"source_content": content} if content is not None else {}),
        "schema_version": SCHEMA_VERSION,
        "config": dataclasses.asdict(config),
        "source_n": len(source),
        "source_listing_sha256": listing_sha256(source),
        "backbone": {k: info.get(k) for k in ("name", "weights_sha256", "preprocessing", "output_kind", "normalize",
                                              "d")},
        "chunk_size": run.chunk_size,
        "bf16": run.bf16,
        "device_type": device.type,
    }


def existing_store_fingerprint(out_dir: Path) -> str | None:
    """The fingerprint digest a finished store records, or ``None`` when there is no readable one."""
    try:
        return read_json(out_dir / "meta.json", expect=dict).get("fingerprint")
    except ArtifactError:
        return None


def files_digest(files: list[tuple[str, Path]], hash_limit_bytes: int = FOLDER_HASH_LIMIT,
                 extra_names: list[str] = ()) -> dict:
    """What the files ``(name, path)`` hold, in their given order: each name with its size and SHA-256 when they
    hold at most ``hash_limit_bytes`` in all, else its size and modification time (nanoseconds); a file that is
    missing counts as such; ``extra_names`` count by name only. Returns ``{"n_files", "n_bytes", "by_content",
    "sha256"}``."""
    stats = [(name, path, _stat(path)) for name, path in files]
    n_bytes = sum(st.st_size for _, _, st in stats if st is not None)
    by_content = n_bytes <= hash_limit_bytes
    h = hashlib.sha256()
    for name, path, st in stats:
        if st is None:
            stamp = "missing"
        else:
            stamp = f"{st.st_size}\0" + (sha256_file(path) if by_content else str(st.st_mtime_ns))
        h.update(name_bytes(name) + b"\0" + stamp.encode() + b"\n")
    for name in extra_names:
        h.update(b"name\0" + name_bytes(name) + b"\n")
    return {"n_files": len(stats), "n_bytes": int(n_bytes), "by_content": by_content, "sha256": h.hexdigest()}


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # missing or unreadable: extraction records it as skipped; the digest records it as missing
        return None


def source_content(source) -> dict | None:
    """``files_digest`` of the files a source reads its rows from, or ``None`` when it reads none (bundled data)."""
    files = source.files()
    return files_digest(files) if files else None


def folder_fingerprint(folder: str | os.PathLike, hash_limit_bytes: int = FOLDER_HASH_LIMIT) -> dict:
    """What ``folder`` holds, as the folder sources read it: a key that changes when an image is added, removed,
    renamed or replaced.

    Every regular file under ``folder`` (links to folders followed, never in a loop), by its path relative to
    ``folder`` in sorted order, through ``files_digest``: by content (SHA-256) when the folder holds at most
    ``hash_limit_bytes``, else by size and modification time. Hidden files and folders, which the sources never
    read but record in ``skipped.json``, count by name. Returns ``{"kind", "n_files", "n_bytes", "by_content",
    "sha256"}``; the order in which files were created does not matter.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; a folder fingerprint needs the folder of images")
    files, hidden = walk_files(folder)
    entries = sorted((_rel(p, folder), p) for p in files)
    digest = files_digest(entries, hash_limit_bytes, sorted(_rel(p, folder) for p in hidden))
    return {"kind": "folder", **digest}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
