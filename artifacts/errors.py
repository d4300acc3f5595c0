"""The one exception type of artifacts on disk, shared by every stage and by the scripts' error handling."""

from __future__ import annotations


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, incomplete or does not match what was asked for."""
