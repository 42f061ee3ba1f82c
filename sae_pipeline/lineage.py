"""Lineage of the activation store: the corpus (by content), model and layer it was extracted from.

`activations` records `lineage.json` beside its shards; every asset that reads the store together with the
corpus compares it with the corpus on disk before it starts, so a `prepare_activations` stopped between its two
steps (a new corpus.parquet beside the old activations) fails at once with what to rerun, not later in
`features` with "activation location ... is not in the corpus".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sae_pipeline.storage import CORPUS_FILE, read_json, write_json_atomic

LINEAGE_FILE = "lineage.json"
RERUN = "rerun `prepare_activations` (corpus + activations; `sae-pipeline run-sweep` does it when needed)"


class LineageError(RuntimeError):
    """The activation store was not made from the corpus, model or layer now in use."""


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_fingerprint(corpus_dir: Path) -> str:
    """The corpus's identity: sha256 of its corpus.parquet."""
    path = corpus_dir / CORPUS_FILE
    if not path.exists():
        raise LineageError(f"{path}: missing; {RERUN}")
    return file_fingerprint(path)


def lineage_record(corpus_sha256: str, model: str, hooks: list[str]) -> dict[str, str | list[str]]:
    return {"corpus_sha256": corpus_sha256, "model": model, "hooks": hooks}


def write_lineage(folder: Path, record: dict[str, str | list[str]]) -> None:
    write_json_atomic(folder / LINEAGE_FILE, record)


def read_lineage(activations_dir: Path) -> dict | None:
    """The store's lineage, or None for a store written before lineage was recorded."""
    path = activations_dir / LINEAGE_FILE
    return read_json(path) if path.exists() else None


def lineage_mismatch(activations_dir: Path, corpus_dir: Path, model: str | None = None) -> str | None:
    """Why the store does not belong to the current corpus (and `model`, when given); None when it does or when
    the store predates lineage records."""
    record = read_lineage(activations_dir)
    if record is None:
        return None
    current = corpus_fingerprint(corpus_dir)
    if record["corpus_sha256"] != current:
        return (f"the activations in {activations_dir} were extracted from corpus sha256 "
                f"{record['corpus_sha256'][:12]}, but {corpus_dir / CORPUS_FILE} is now {current[:12]} (was "
                f"`corpus` materialised alone, or `prepare_activations` stopped after it?); {RERUN}")
    if model is not None and record["model"] != model:
        return (f"the activations in {activations_dir} were extracted from model {record['model']!r}, but the "
                f"model resource is {model!r}; {RERUN} with that model, or set the model resource back")
    return None
