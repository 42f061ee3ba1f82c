"""Extraction: the corpus through the model up to a hook point, written as an activation store (store.py
describes the folder), with the eval split, norm statistics and outlier exclusion."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from torch import nn

from sae_pipeline.config import ActivationSpec, ConfigError
from sae_pipeline.model import HookPoint, capture_hooks, check_layer, pad_batch
from sae_pipeline.progress import progress_counter
from sae_pipeline.storage import write_json_atomic
from sae_pipeline.store import META_FILE, STORAGE_DTYPES, ShardWriter, hook_store_dir, read_norms, save_atomic

KEPT_SUFFIX = "-kept"
"""Shards rewritten without norm outliers are named `<shard>-kept.safetensors`: the originals stay until meta.json
lists the rewritten ones, so a rerun after a kill computes the same limit from the same shards."""


def _exclude_outliers(folder: Path, shards: list[dict], limit: float) -> tuple[list[dict], int]:
    """Write each shard again without the tokens whose norm exceeds `limit`; returns the new shard list and the
    count dropped. Shards left empty are not written (meta.json lists only what exists)."""
    kept, dropped = [], 0
    for shard in shards:
        with safe_open(str(folder / shard["file"]), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in ("activations", "locations", "norms")}
        keep = ~(tensors["norms"] > limit)
        dropped += int((~keep).sum())
        if keep.any():
            name = shard["file"].replace(".safetensors", f"{KEPT_SUFFIX}.safetensors")
            save_atomic({key: value[keep].contiguous() for key, value in tensors.items()}, folder / name)
            kept.append({"file": name, "n_tokens": int(keep.sum())})
    return kept, dropped


def hook_activations(model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor, mask: torch.Tensor
                     ) -> dict[HookPoint, torch.Tensor]:
    """The activations at each hook, [batch, seq, d_model] float32 on the CPU, from one forward pass (the one
    place extraction reads the model): under `inference_mode`, and in bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return capture_hooks(model, hooks, input_ids, mask)


def split_sequences(n_sequences: int, eval_fraction: float, seed: int) -> set[int]:
    """Sequence ids held out for evaluation (at least one, never all)."""
    n_eval = min(max(1, round(n_sequences * eval_fraction)), n_sequences - 1)
    if n_eval < 1:
        raise ConfigError(f"corpus: {n_sequences} sequence(s); need at least 2 to hold one out for evaluation")
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed))
    return set(order[:n_eval].tolist())


def norm_statistics(norms: torch.Tensor, d_model: int) -> dict[str, float]:
    """Norm summary of the train tokens and the dataset-wide factor that scales the mean norm to sqrt(d)."""
    finite = norms[torch.isfinite(norms)].double()
    if finite.numel() == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "scaling_factor": 1.0}
    mean = finite.mean().item()
    return {
        "mean": mean,
        "median": finite.median().item(),
        "std": finite.std().item() if finite.numel() > 1 else 0.0,
        "min": finite.min().item(),
        "max": finite.max().item(),
        "scaling_factor": math.sqrt(d_model) / max(mean, 1e-12),
    }


MANIFEST_FILE = "extraction.json"
"""In a folder being extracted into: the key of the corpus and settings, every hook's shards committed so far
and the splits finished; what a rerun resumes from (meta.json is written from the shards once both are)."""


def extraction_key(spec: ActivationSpec, model_name: str, corpus_key: str, device: torch.device) -> str:
    """What an extraction's bytes depend on: the corpus (its fingerprint), the settings, the model, the device
    type. A folder whose manifest has another key is started again."""
    identity = {"corpus": corpus_key, "spec": spec.model_dump(mode="json"), "model": model_name,
                "device": device.type}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    """The folder's extraction manifest, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _resumable(folder: Path, key: str, first: str) -> dict:
    """The manifest to resume from: the folder's when its key matches and its shards are there (`first`: the
    first hook, whose store is the folder itself); otherwise a fresh one, after emptying a folder that holds
    another extraction."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("key") == key and _shards_present(folder, manifest, first):
        return manifest
    if manifest is not None:
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return {"key": key, "stores": {}, "splits_done": []}


def _shards_present(folder: Path, manifest: dict, first: str) -> bool:
    """Whether every shard the manifest lists is still in the folder."""
    return all((hook_store_dir(folder, hook, first) / shard["file"]).exists()
               for hook, splits in manifest["stores"].items() for shards in splits.values() for shard in shards)


def link_store(extracted: Path, folder: Path) -> None:
    """Put a finished extraction's stores in `folder` (every file but the manifest), as hard links where the
    file system allows: the extraction stays whole until the store it became is published."""
    for path in sorted(extracted.rglob("*")):
        if path.is_dir() or path.name == MANIFEST_FILE or path.name.startswith("."):  # a kill's temp files
            continue
        target = folder / path.relative_to(extracted)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # no hard links here (another file system): a copy
            shutil.copy2(path, target)


def _commit(folder: Path, manifest: dict) -> None:
    write_json_atomic(folder / MANIFEST_FILE, manifest)


@dataclass
class _HookStore:
    """One hook's store being written: its folder and its shard writers."""

    hook: HookPoint
    folder: Path
    writers: dict[str, ShardWriter]

    @classmethod
    def open(cls, hook: HookPoint, folder: Path, spec: ActivationSpec, committed: dict[str, list[dict]]
             ) -> _HookStore:
        """The store's writers, each resuming after the shards `committed` lists for its split."""
        folder.mkdir(parents=True, exist_ok=True)
        dtype = STORAGE_DTYPES[spec.dtype]
        return cls(hook, folder, {split: ShardWriter(folder, split, spec.shard_tokens, dtype,
                                                     list(committed.get(split, [])))
                                  for split in ("train", "eval")})

    def committed(self) -> dict[str, list[dict]]:
        return {split: writer.shards for split, writer in self.writers.items()}

    def finish(self, spec: ActivationSpec, model_name: str, d_model: int, eval_ids: set[int],
               hook_names: list[str]) -> dict:
        """Drop norm outliers if configured, write meta.json from the shards written; returns it."""
        shards = self.committed()
        norms = {split: [read_norms(self.folder, shard) for shard in shards[split]] for split in shards}
        train_norm = torch.cat([torch.empty(0), *norms["train"]])
        n_nonfinite = sum(int((~torch.isfinite(part)).sum()) for parts in norms.values() for part in parts)
        n_excluded = 0
        if spec.exclude_norm_outliers is not None and train_norm.numel():
            finite = train_norm[torch.isfinite(train_norm)]
            limit = spec.exclude_norm_outliers * (finite.median().item() if finite.numel() else math.inf)
            for split in shards:
                shards[split], dropped = _exclude_outliers(self.folder, shards[split], limit)
                n_excluded += dropped
            train_norm = train_norm[~(train_norm > limit)]
        if not shards["train"] or not shards["eval"]:
            raise ConfigError("corpus: no tokens left after excluding padding/special tokens in the train or eval "
                              "slice")
        meta = {
            "model": model_name,
            "layer": self.hook.layer,
            "hook_name": self.hook.name,
            "hook": self.hook.description,
            "hooks": hook_names,
            "dtype": spec.dtype,
            "d_model": d_model,
            "n_tokens": sum(s["n_tokens"] for split in shards.values() for s in split),
            "n_train_tokens": sum(s["n_tokens"] for s in shards["train"]),
            "n_eval_tokens": sum(s["n_tokens"] for s in shards["eval"]),
            "train_shards": shards["train"],
            "eval_shards": shards["eval"],
            "eval_sequence_ids": sorted(eval_ids),
            "locations": "tensor `locations` [n, 2] int32 in each shard: (seq_id in corpus.parquet, token position)",
            "exclude_special_tokens": spec.exclude_special_tokens,
            "n_nonfinite_tokens": n_nonfinite,
            "exclude_norm_outliers": spec.exclude_norm_outliers,
            "n_excluded_outliers": n_excluded,
            "norm_stats": norm_statistics(train_norm, d_model),
        }
        write_json_atomic(self.folder / META_FILE, meta)
        return meta

    def drop_unlisted(self, meta: dict) -> None:
        """Delete the shards meta.json does not list (the originals of rewritten ones, leftovers of a kill)."""
        listed = {shard["file"] for split in ("train", "eval") for shard in meta[f"{split}_shards"]}
        for path in self.folder.glob("*.safetensors"):
            if path.name not in listed:
                path.unlink()


@dataclass
class _Batch:
    """One batch of sequences: its padded ids and mask, its sequence ids, and the kept tokens (non-padding,
    non-special) in row-major order."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    seq_ids: torch.Tensor
    keep: torch.Tensor


def _split_rows(corpus: pl.DataFrame, eval_ids: set[int], split: str) -> pl.DataFrame:
    """The split's sequences, longest first (similar lengths per batch: less padding), ties in corpus order.

    Longest first, as sentence-transformers encodes: the first batches size the heap and the shorter ones after
    fit in what they freed. Shortest first grew the process with the corpus (each larger batch found only
    smaller holes; benchmarks/RESULTS.md, issue 24), and it found an out-of-memory batch last, not first."""
    return (corpus.filter(pl.col("seq_id").is_in(list(eval_ids)) == (split == "eval"))
            .sort(pl.col("input_ids").list.len(), maintain_order=True, descending=True))


def _kept_per_batch(rows: pl.DataFrame, batch_size: int, special: list[int]) -> list[int]:
    """The kept tokens of each batch, from the ids alone (no forward): where a resumed split starts."""
    kept = rows.select(pl.col("input_ids").list.eval(pl.element().is_in(special).not_()).list.sum())
    per_row = kept.to_series().fill_null(0).to_list()
    return [sum(per_row[start:start + batch_size]) for start in range(0, len(per_row), batch_size)]


def _resume_point(kept: list[int], committed: int) -> tuple[int, int]:
    """(first batch to run, its leading kept tokens already in committed shards) when `committed` tokens of the
    split are in shards."""
    seen = 0
    for index, n in enumerate(kept):
        if seen + n > committed:
            return index, committed - seen
        seen += n
    return len(kept), 0


def _batch(rows: pl.DataFrame, pad_id: int, special: torch.Tensor) -> _Batch:
    input_ids, mask = pad_batch(rows["input_ids"].to_list(), pad_id)
    return _Batch(input_ids, mask, torch.tensor(rows["seq_id"].to_list()),
                  mask.bool() & ~torch.isin(input_ids, special))


def extract_activations(corpus: pl.DataFrame, model: nn.Module, tokenizer, spec: ActivationSpec,
                        folder: Path, model_name: str, progress: Callable[[str], None] | None = None,
                        corpus_key: str = "") -> list[dict]:
    """Run the corpus through the model once, up to the deepest of the spec's hooks, and write each hook's store:
    the first in `folder`, the others in `folder/hooks/<hook>/` (`store.hook_store_dir`), each with its shards
    and meta.json; returns the metas in the spec's order. `progress` gets a line every PROGRESS_SECONDS.

    Shards are committed as they are written (MANIFEST_FILE): a rerun into the same folder with the same corpus
    (`corpus_key`, its fingerprint) and settings resumes at the first shard missing, and the shards it writes
    are byte for byte those of an uninterrupted run; anything else in the folder is started again."""
    hooks = [HookPoint.parse(name) for name in spec.hook_names()]
    d_model = check_layer(model, max(hook.layer for hook in hooks))
    for hook in hooks:
        hook.locate(model)  # a site the model lacks is refused before the first batch
    folder.mkdir(parents=True, exist_ok=True)
    key = extraction_key(spec, model_name, corpus_key, next(model.parameters()).device)
    manifest = _resumable(folder, key, hooks[0].name)
    stores = [_HookStore.open(hook, hook_store_dir(folder, hook.name, hooks[0].name), spec,
                              manifest["stores"].get(hook.name, {})) for hook in hooks]
    names = [hook.name for hook in hooks]
    eval_ids = split_sequences(len(corpus), spec.eval_fraction, spec.seed)
    _extract_splits(corpus, model, tokenizer, spec, eval_ids, stores, folder, manifest, progress)
    metas = [store.finish(spec, model_name, d_model, eval_ids, names) for store in stores]
    for store, meta in zip(stores, metas, strict=True):
        store.drop_unlisted(meta)
    return metas


def _extract_splits(corpus: pl.DataFrame, model: nn.Module, tokenizer, spec: ActivationSpec, eval_ids: set[int],
                    stores: list[_HookStore], folder: Path, manifest: dict,
                    progress: Callable[[str], None] | None) -> None:
    """The forward passes of the splits not finished yet, each resumed after its committed shards; the manifest
    is committed whenever a shard is written and when a split ends."""
    special_ids = sorted(set(tokenizer.all_special_ids)) if spec.exclude_special_tokens else []
    special, pad_id = torch.tensor(special_ids, dtype=torch.long), tokenizer.pad_token_id
    plans = {}
    for split in ("train", "eval"):
        if split not in manifest["splits_done"]:
            rows = _split_rows(corpus, eval_ids, split)
            first, skip = _resume_point(_kept_per_batch(rows, spec.batch_size, special_ids),
                                        stores[0].writers[split].n_written)
            plans[split] = rows, first, skip
    to_run = sum(int(rows["input_ids"].list.len().slice(first * spec.batch_size).sum())
                 for rows, first, _ in plans.values())
    advance = progress_counter(progress, "extraction", to_run, "tokens")

    def commit() -> None:
        manifest["stores"] = {store.hook.name: store.committed() for store in stores}
        _commit(folder, manifest)

    for split, (rows, first, skip) in plans.items():
        for start in range(first * spec.batch_size, len(rows), spec.batch_size):
            batch = _batch(rows.slice(start, spec.batch_size), pad_id, special)
            captured = hook_activations(model, [store.hook for store in stores], batch.input_ids, batch.mask)
            rows_idx, pos_idx = batch.keep.nonzero(as_tuple=True)
            rows_idx, pos_idx, skip = rows_idx[skip:], pos_idx[skip:], 0
            locs = torch.stack([batch.seq_ids[rows_idx], pos_idx], dim=1).to(torch.int32)
            wrote = [store.writers[split].add(captured[store.hook][rows_idx, pos_idx], locs) for store in stores]
            if any(wrote):
                commit()
            advance(int(batch.mask.sum()))
        for store in stores:
            store.writers[split].close()
        manifest["splits_done"].append(split)
        commit()
