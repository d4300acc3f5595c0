"""Self-describing artifact directories shared by every stage.

Every stage writes a directory with ``config.json`` (the settings that produced it) and ``meta.json``
(schema version, package version, parent hashes, metrics, timings). Directories are built in a
partial sibling and renamed into place when complete, so a half-written artifact never carries the
final name. This package imports nothing else of the project.
"""

from artifacts.io import (
    SCHEMA_VERSION,
    ArtifactError,
    atomic_file,
    begin_dir,
    commit_dir,
    package_version,
    partial_dir,
    read_json,
    sha256_file,
    write_json,
    write_npy,
)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactError",
    "atomic_file",
    "begin_dir",
    "commit_dir",
    "package_version",
    "partial_dir",
    "read_json",
    "sha256_file",
    "write_json",
    "write_npy",
]
