"""Where an SAE named by a Hugging Face hub id (``patrikwolf/clip-topk-sae``) lives in the local hub cache.

Only the local cache is read (``huggingface_hub.snapshot_download(local_files_only=True)``, or the same layout
read directly when huggingface_hub is not installed), never the network, so ``HF_HUB_OFFLINE`` is honoured
whatever its value. The cache
is found as huggingface_hub finds it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``XDG_CACHE_HOME`` or
``~/.cache`` + ``huggingface/hub``; inside it, a repository is ``models--OWNER--NAME/`` with ``refs/main`` naming
the commit whose files are under ``snapshots/COMMIT/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from artifacts import ArtifactError

PAPER_HUB_ID = "patrikwolf/clip-topk-sae"
"""The authors' released SAE on the Hugging Face hub."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(spec: str) -> bool:
    """``OWNER/NAME`` that is not an existing path."""
    return bool(_HUB_ID.match(str(spec))) and not Path(spec).exists()


def hub_cache_dir() -> Path:
    """The local hub cache directory, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def is_cache_root(path: Path) -> bool:
    """A repository folder of the hub cache (``models--OWNER--NAME/`` with ``snapshots/``)."""
    return path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()


def snapshot_of_cache_root(root: Path) -> Path:
    """The snapshot folder a cache root's ``refs/main`` names (or its only snapshot)."""
    snapshots = root / "snapshots"
    ref = root / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise ArtifactError(f"{ref} names commit {commit}, but {snapshots / commit} is missing: the cache is incomplete")
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise ArtifactError(
        f"{root} has no refs/main and {len(found)} snapshots {[p.name for p in found]}; pass the snapshot folder "
        "you mean (…/snapshots/COMMIT) instead"
    )


def resolve_hub_snapshot(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot folder of hub repository ``repo_id``; ``ArtifactError`` saying how to get it if absent."""
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    root = cache / ("models--" + repo_id.replace("/", "--"))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # not installed: read the same cache layout directly
        snapshot_download = None
    if snapshot_download is not None:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache)))
        except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError: not cached
            pass
    elif is_cache_root(root):
        return snapshot_of_cache_root(root)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    raise ArtifactError(
        f"{repo_id} is not in the local Hugging Face cache ({root} does not exist"
        f"{'; HF_HUB_OFFLINE is set' if offline else ''}). On a machine with network, download it with "
        f"`huggingface-cli download {repo_id}` (or huggingface_hub.snapshot_download('{repo_id}')) and copy "
        f"{root.name}/ into {cache} here (or point HF_HUB_CACHE at a cache holding it), or pass the downloaded "
        "snapshot folder or the authors' .pt file to --checkpoint"
    )


def resolve_sae_source(spec: str | os.PathLike) -> Path:
    """A file or snapshot folder from what a user passed: a path, a cache root ``models--…/``, or a hub id."""
    path = Path(spec)
    if is_cache_root(path):
        return snapshot_of_cache_root(path)
    if path.exists():
        return path
    if looks_like_hub_id(str(spec)):
        return resolve_hub_snapshot(str(spec))
    raise ArtifactError(
        f"{spec} does not exist, and it is not a hub id either (OWNER/NAME such as {PAPER_HUB_ID})"
    )
