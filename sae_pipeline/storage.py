"""One storage root for everything the pipeline writes, and atomic writes into it.

Every path the pipeline uses is derived from a single root (default `data/`, overridable with the
`SAE_PIPELINE_ROOT` environment variable or the `storage` resource), so moving to another disk is configuration.
Files are written to a temporary name and renamed; a partition's folder is built beside the old one and swapped
in, so a run killed mid-write leaves the previous outputs intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sae_pipeline.config import validate_partition_key

DEFAULT_ROOT = "data"


def default_root() -> Path:
    """The storage root: `$SAE_PIPELINE_ROOT`, else `data/` under the current directory."""
    return Path(os.environ.get("SAE_PIPELINE_ROOT", DEFAULT_ROOT)).resolve()


@dataclass(frozen=True)
class Layout:
    """Where each asset's files live under the storage root."""

    root: Path

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus" / "corpus.parquet"

    @property
    def activations_dir(self) -> Path:
        return self.root / "activations"

    @property
    def configs_dir(self) -> Path:
        """Registered SAE configs, one `<key>.json` per partition key."""
        return self.root / "configs"

    def sae_dir(self, key: str) -> Path:
        return self.root / "sae" / validate_partition_key(key)

    def checkpoint_dir(self, key: str) -> Path:
        return self.root / "checkpoints" / validate_partition_key(key)

    def features_dir(self, key: str) -> Path:
        return self.root / "features" / validate_partition_key(key)

    def labels_dir(self, key: str) -> Path:
        return self.root / "feature_labels" / validate_partition_key(key)

    @property
    def analysis_dir(self) -> Path:
        return self.root / "sweep_analysis"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


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
    between them, so readers always find a complete folder.
    """
    recover_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a swap interrupted between its two renames, and drop stale temporary folders."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    if final.parent.exists():
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
