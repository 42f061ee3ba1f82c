"""One storage root for everything the pipeline writes, and atomic writes into it.

Every path the pipeline uses is derived from a single root (default `data/`, overridable with the
`SAE_PIPELINE_ROOT` environment variable or the `storage` resource), so moving to another disk is configuration.
The root may be a local folder or an fsspec URL (`s3://bucket/prefix`, `gs://...`): then the assets work in a
local cache and `Layout.pull`/`Layout.publish` move whole folders to and from the object store
(`sae_pipeline.remote`), so each step, on any machine, reads only what earlier steps committed there.

Locally, files are written to a temporary name and renamed; a partition's folder is built beside the old one
and swapped in, so a run killed mid-write leaves the previous outputs intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from upath import UPath

from sae_pipeline import remote
from sae_pipeline.config import ConfigError, validate_partition_key

DEFAULT_ROOT = "data"
CORPUS_FILE = "corpus.parquet"


def is_remote(root: str) -> bool:
    """An fsspec URL other than file:// (which is a local folder)."""
    return "://" in root and not root.startswith("file://")


def local_root(root: str) -> Path:
    """A local root (a folder or a file:// URL) as an absolute path."""
    return Path(root.removeprefix("file://")).resolve()


def default_root() -> str:
    """The storage root: `$SAE_PIPELINE_ROOT` (a folder or an fsspec URL), else `data/` under the current
    directory; a local one is made absolute."""
    root = os.environ.get("SAE_PIPELINE_ROOT", DEFAULT_ROOT)
    return root if is_remote(root) else str(local_root(root))


def default_cache(root: str) -> Path:
    """Local cache of a remote root: `$SAE_PIPELINE_CACHE`, else `~/.cache/sae_pipeline/<hash of the root>`."""
    if os.environ.get("SAE_PIPELINE_CACHE"):
        return Path(os.environ["SAE_PIPELINE_CACHE"]).resolve()
    return Path.home() / ".cache" / "sae_pipeline" / hashlib.sha256(root.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Where each asset's files live under the storage root.

    `root` is a local folder: the storage root itself, or, when `remote` is set, the local cache of that
    object-store root. Folders are read through `pull` and written through `publish`; both are plain local
    operations when `remote` is None.
    """

    root: Path
    remote: UPath | None = None

    @classmethod
    def at(cls, root: str, cache: str | None = None) -> Layout:
        """The layout of a storage root given as a folder or a URL (`cache`: local cache of a remote root)."""
        if not is_remote(root):
            return cls(local_root(root))
        return cls(Path(cache).resolve() if cache else default_cache(root), UPath(root))

    def check_writable(self) -> None:
        """ConfigError before any compute when the local root (the cache of a remote one) cannot take a file:
        read-only, full, or not a folder. A 64 KiB probe is written, synced and removed."""
        probe = self.root / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 65536)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise ConfigError(f"storage root {self.root}: not writable ({error.strerror or error}); set "
                              "SAE_PIPELINE_ROOT to a writable folder with free space") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def activations_dir(self) -> Path:
        return self.root / "activations"

    @property
    def extraction_dir(self) -> Path:
        """Shards of an unfinished `activations` run (with its manifest), for the next run to resume from."""
        return self.root / "extraction"

    @property
    def configs_dir(self) -> Path:
        """Registered SAE configs, one `<key>.json` per partition key (read with `read_bytes`/`names`)."""
        return self.root / "configs"

    def sae_dir(self, key: str) -> Path:
        return self.root / "sae" / validate_partition_key(key)

    def checkpoint_dir(self, key: str) -> Path:
        return self.root / "checkpoints" / validate_partition_key(key)

    def features_dir(self, key: str) -> Path:
        return self.root / "features" / validate_partition_key(key)

    def labels_dir(self, key: str) -> Path:
        return self.root / "feature_labels" / validate_partition_key(key)

    def labels_progress_dir(self, key: str) -> Path:
        """Labels an interrupted `feature_labels` run obtained, for the next run to resume from."""
        return self.root / "labels_progress" / validate_partition_key(key)

    @property
    def analysis_dir(self) -> Path:
        return self.root / "sweep_analysis"

    @property
    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    @property
    def synthetic_dir(self) -> Path:
        """The ground-truth benchmark's table, plot and report (`synthetic_benchmark`)."""
        return self.root / "synthetic_benchmark"

    # --- whole folders: each asset's output is one folder, committed at once -------------------------------

    def _remote_of(self, path: Path) -> UPath:
        assert self.remote is not None
        return self.remote / path.relative_to(self.root).as_posix()

    def _versions_of(self, folder: Path) -> Path:
        return self.root / ".versions" / folder.relative_to(self.root)

    def pull(self, folder: Path, *names: str) -> Path:
        """A local folder with `folder`'s committed contents (only `names` of it when given).

        Locally that is `folder` itself. On object storage it is the cached copy of the current commit; a
        folder never committed gives a path that does not exist, so readers see it missing as they would
        on a disk.
        """
        if self.remote is None:
            return folder
        local = remote.pull(self._remote_of(folder), self._versions_of(folder), names)
        return local if local is not None else self._versions_of(folder) / "never-committed"

    @contextlib.contextmanager
    def publish(self, folder: Path) -> Iterator[Path]:
        """Yield an empty local folder; when the block succeeds it becomes `folder`'s contents at once.

        Locally the folder is swapped in by renames (`atomic_dir`). On object storage it is committed as a
        new version and kept as that version's cached copy; on error nothing is committed.
        """
        if self.remote is None:
            with atomic_dir(folder) as fresh:
                yield fresh
            return
        versions = self._versions_of(folder)
        versions.mkdir(parents=True, exist_ok=True)
        fresh = versions / f".publish-{uuid.uuid4().hex[:8]}"
        fresh.mkdir()
        try:
            yield fresh
            version = remote.commit(fresh, self._remote_of(folder))
            os.replace(fresh, versions / version)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    def push(self, folder: Path) -> None:
        """Commit a local working folder (a training checkpoint) as it is now; nothing to do locally."""
        if self.remote is not None:
            remote.commit(folder, self._remote_of(folder))

    def restore(self, folder: Path) -> None:
        """Fill an empty local working folder from its last commit (a run resuming on another machine)."""
        if self.remote is None or (folder.exists() and any(folder.iterdir())):
            return
        committed = self.pull(folder)
        if committed.exists():
            shutil.copytree(committed, folder, dirs_exist_ok=True)

    def remove(self, folder: Path) -> None:
        """Delete a folder here and, on object storage, its commit and versions."""
        shutil.rmtree(folder, ignore_errors=True)
        if self.remote is not None:
            remote.delete(self._remote_of(folder))
            shutil.rmtree(self._versions_of(folder), ignore_errors=True)

    def location(self, folder: Path, name: str = "") -> str:
        """Where a folder's committed file is, for metadata and messages: a local path or the object's URL."""
        if self.remote is None:
            return str(folder / name) if name else str(folder)
        record = remote.read_commit(self._remote_of(folder))
        base = self._remote_of(folder) / record["version"] if record else self._remote_of(folder)
        return str(base / name) if name else str(base)

    # --- single small files (registered configs, sweep specs): each written whole ---------------------------

    def read_bytes(self, path: Path) -> bytes | None:
        """A file's bytes, or None when there is none."""
        try:
            return (path if self.remote is None else self._remote_of(path)).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Locally temp + rename; on object storage one PUT, which a store applies whole or not at all."""
        if self.remote is None:
            write_bytes_atomic(path, data)
        else:
            self._remote_of(path).write_bytes(data)

    def names(self, folder: Path, suffix: str) -> list[str]:
        """Sorted names of the files in `folder` ending in `suffix`."""
        if self.remote is None:
            names = [p.name for p in folder.iterdir()] if folder.exists() else []
        else:
            names = remote.list_names(self._remote_of(folder))
        return sorted(name for name in names if name.endswith(suffix) and not name.startswith("."))

    def mirror(self, folder: Path, suffix: str) -> Path:
        """`folder` with a local copy of each of its `suffix` files (object storage: refreshed, extra local
        files dropped); for readers that take a local folder."""
        if self.remote is None:
            return folder
        wanted = self.names(folder, suffix)
        for name in wanted:
            data = self.read_bytes(folder / name)
            if data is not None and (not (folder / name).exists() or (folder / name).read_bytes() != data):
                write_bytes_atomic(folder / name, data)
        for stale in folder.glob(f"*{suffix}") if folder.exists() else []:
            if stale.name not in wanted:
                stale.unlink()
        return folder


def _temp_sibling(path: Path) -> Path:
    """`.<name>.tmp-<pid>-<random>`: the writer's pid tells `recover_dir` whether the writer is still alive."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in a temp sibling's name still runs (names without a pid count as dead)."""
    match = re.search(r"\.tmp-(\d+)-[0-9a-f]+$", temp.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Exclusive lock among processes on this machine, blocking until it is free: flock on `path`, a folder
    (nothing is left behind) or a lock file (created if needed). Two locks on one path in one process
    block each other, so each path has one purpose."""
    descriptor = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Parquet written to a temporary sibling, then renamed over `path`: readers never see half a file."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `final`, on error it is removed.

    The swap is two renames (old aside, new in); `recover_dir` puts the old folder back if a kill lands
    between them, so readers always find a complete folder. Recovery and swap hold a lock on the parent
    folder, so concurrent writers of the same folder (two `run-sweep`s) neither interleave their renames nor
    remove each other's temporary folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent):
        recover_dir(final)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    with exclusive(final.parent):
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a swap interrupted between its two renames, and drop temporary siblings whose writer is gone
    (a live writer's are kept). Call it under `exclusive(final.parent)`."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    if final.parent.exists():
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            if not _writer_alive(stale):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
