"""Self-describing artifact directories shared by every stage.

Every stage writes a directory with ``config.json`` (the settings that produced it) and ``meta.json``
(schema version, package version, parent hashes, metrics, timings). Directories are built in a
partial sibling and renamed into place when complete, so a half-written artifact never carries the
final name; while one is built, an advisory lock keeps a second run out (``artifacts.lock``). Only an
artifact of this toolkit is ever replaced. ``artifacts.settings`` refuses to reuse an artifact made with
other settings; ``artifacts.cli`` turns a user's mistake into one ``error:`` line in every script. This
package imports nothing else of the project.
"""

import artifacts.threads  # noqa: F401  (sleeping OpenMP threads, before anything loads torch)

from artifacts.errors import ArtifactError, DiskFullError, torch_load_refusal
from artifacts.io import (
    SCHEMA_VERSION,
    abandon_dir,
    atomic_file,
    begin_dir,
    building,
    check_replaceable,
    commit_dir,
    is_artifact_dir,
    package_version,
    partial_dir,
    read_json,
    sha256_file,
    write_json,
    write_npy,
)
from artifacts.lock import LockHeld, dir_lock, lock_path
from artifacts.npy import check_npy, create_npy, write_npy_rows
from artifacts.settings import check_settings, settings_differences

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactError",
    "DiskFullError",
    "LockHeld",
    "abandon_dir",
    "atomic_file",
    "begin_dir",
    "building",
    "check_npy",
    "check_replaceable",
    "check_settings",
    "commit_dir",
    "create_npy",
    "dir_lock",
    "is_artifact_dir",
    "lock_path",
    "package_version",
    "partial_dir",
    "read_json",
    "settings_differences",
    "sha256_file",
    "torch_load_refusal",
    "write_json",
    "write_npy",
    "write_npy_rows",
]
