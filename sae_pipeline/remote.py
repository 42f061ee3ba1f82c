"""Folders on object storage (s3://, gs://, memory://, ... through fsspec/UPath), committed without renames.

Object stores have no atomic rename, so a folder is published as a new version: every file is uploaded under
`<folder>/<version>/`, then `<folder>/_commit.json` (one object, which a store writes whole or not at all) is
replaced to name that version and its files. Readers resolve the commit first, so they see the previous
folder or the new one, never a mix, and a writer killed mid-upload leaves the previous commit in place.

Readers get a local copy: each version is downloaded into `<cache>/<version>/`, which never changes once
written (a new commit is a new version), so the safetensors shards are memory-mapped from there and several
processes on one machine can share the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from upath import UPath

COMMIT_FILE = "_commit.json"
KEEP_LOCAL_VERSIONS = 2
"""Cached versions kept per folder: the current one and the one before (a reader may still hold it)."""


class RemoteIntegrityError(RuntimeError):
    """A downloaded file does not have the size its commit recorded."""


def new_version() -> str:
    """A version name that sorts by commit time (UTC, microseconds) and is unique across writers."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def read_commit(folder: UPath) -> dict[str, Any] | None:
    """The folder's current commit (`version`, `files`: relative path -> size), or None if never committed.

    Read as an object, not through a listing, so a long-lived process (the sensor daemon) never sees a
    stale commit from the filesystem's listing cache.
    """
    try:
        return json.loads((folder / COMMIT_FILE).read_text())
    except FileNotFoundError:
        return None


def list_names(folder: UPath) -> list[str]:
    """Names directly under `folder`, listed afresh (fsspec caches listings; other machines write here)."""
    folder.fs.invalidate_cache(folder.path)
    try:
        return sorted(entry.name for entry in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def published_files(local: Path) -> dict[str, Path]:
    """The files a commit of `local` holds: every file, except hidden ones (temporaries, cache markers)."""
    files = {}
    for path in sorted(local.rglob("*")):
        relative = path.relative_to(local)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    return files


def commit(local: Path, folder: UPath) -> str:
    """Upload `local`'s files as a new version of `folder`, then point the commit at it; returns the version.

    Versions older than the previous commit are deleted afterwards; the previous one stays for readers that
    resolved it before this commit.
    """
    previous = read_commit(folder)
    version = new_version()
    files = published_files(local)
    if files:  # one call: async filesystems (s3fs, gcsfs) upload the files concurrently
        folder.fs.put([str(path) for path in files.values()], [(folder / version / name).path for name in files])
    record = {"version": version, "files": {name: path.stat().st_size for name, path in files.items()},
              "committed_at": datetime.now(UTC).isoformat()}
    (folder / COMMIT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _prune_remote(folder, keep_from=previous["version"] if previous else version)
    return version


def _prune_remote(folder: UPath, keep_from: str) -> None:
    """Delete the versions that sort before `keep_from` (never a newer one another writer may be uploading)."""
    for name in list_names(folder):
        if name != COMMIT_FILE and name < keep_from:
            folder.fs.rm((folder / name).path, recursive=True)


def pull(folder: UPath, cache: Path, names: Sequence[str] = ()) -> Path | None:
    """A local folder with the committed version of `folder` (only `names` of it when given), downloaded
    into `cache/<version>/` where not already there; None when the folder was never committed.

    A name the commit does not hold is skipped: the reader finds it missing, as it would on a local disk.
    """
    record = read_commit(folder)
    if record is None:
        return None
    version, sizes = record["version"], record["files"]
    local = cache / version
    todo = [name for name in names or list(sizes) if name in sizes and not (local / name).exists()]
    partials = {name: local / f"{name}.part-{uuid.uuid4().hex[:8]}" for name in todo}
    for partial in partials.values():
        partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        if todo:  # one call: async filesystems download the files concurrently
            folder.fs.get([(folder / version / name).path for name in todo], [str(partials[name]) for name in todo])
        for name in todo:
            if partials[name].stat().st_size != sizes[name]:
                raise RemoteIntegrityError(f"{folder / version / name}: {sizes[name]} bytes committed, "
                                           f"{partials[name].stat().st_size} downloaded")
            os.replace(partials[name], local / name)
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    local.mkdir(parents=True, exist_ok=True)
    _prune_local(cache, local)
    return local


def _prune_local(cache: Path, current: Path) -> None:
    versions = sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    for stale in versions[:-KEEP_LOCAL_VERSIONS]:
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)


def delete(folder: UPath) -> None:
    """Remove the commit first (readers then see no folder), then every version."""
    with contextlib.suppress(FileNotFoundError):
        (folder / COMMIT_FILE).unlink()
    with contextlib.suppress(FileNotFoundError):
        folder.fs.rm(folder.path, recursive=True)
