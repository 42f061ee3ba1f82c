"""Extraction: the corpus through the model up to a hook point, written as an activation store (store.py
describes the folder), with the eval split, norm statistics and outlier exclusion."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sae_pipeline.config import ActivationSpec, ConfigError
from sae_pipeline.model import HookPoint, capture_hooks, check_layer, pad_batch
from sae_pipeline.progress import progress_counter
from sae_pipeline.store import META_FILE, STORAGE_DTYPES, ShardWriter, hook_store_dir


def _exclude_outliers(folder: Path, shards: list[dict], limit: float) -> tuple[list[dict], int]:
    """Rewrite each shard without the tokens whose norm exceeds `limit`; returns the new shard list and the count
    dropped. Shards left empty are deleted (meta.json lists only what exists)."""
    kept, dropped = [], 0
    for shard in shards:
        path = folder / shard["file"]
        with safe_open(str(path), framework="pt") as handle:
            acts, locs = handle.get_tensor("activations"), handle.get_tensor("locations")
        keep = ~(acts.norm(dim=-1) > limit)
        dropped += int((~keep).sum())
        path.unlink()
        if keep.any():
            save_file({"activations": acts[keep].contiguous(), "locations": locs[keep].contiguous()}, str(path))
            kept.append({"file": shard["file"], "n_tokens": int(keep.sum())})
    return kept, dropped


def hook_activations(model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor, mask: torch.Tensor
                     ) -> dict[HookPoint, torch.Tensor]:
    """The activations at each hook, [batch, seq, d_model] on the CPU, from one forward pass (the one place
    extraction reads the model)."""
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


@dataclass
class _HookStore:
    """One hook's store being written: its shard writers, train-token norms and non-finite count."""

    hook: HookPoint
    folder: Path
    writers: dict[str, ShardWriter]
    train_norms: list[torch.Tensor] = field(default_factory=list)
    n_nonfinite: int = 0

    def add(self, split: str, token_acts: torch.Tensor, locs: torch.Tensor) -> None:
        self.n_nonfinite += int((~torch.isfinite(token_acts).all(dim=-1)).sum())
        if split == "train":
            self.train_norms.append(token_acts.norm(dim=-1))
        self.writers[split].add(token_acts, locs)

    def finish(self, spec: ActivationSpec, model_name: str, d_model: int, eval_ids: set[int],
               hook_names: list[str]) -> dict:
        """Close the shards, drop norm outliers if configured, write meta.json; returns it."""
        shards = {split: writer.close() for split, writer in self.writers.items()}
        n_excluded, train_norm = 0, torch.cat(self.train_norms) if self.train_norms else torch.empty(0)
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
            "n_nonfinite_tokens": self.n_nonfinite,
            "exclude_norm_outliers": spec.exclude_norm_outliers,
            "n_excluded_outliers": n_excluded,
            "norm_stats": norm_statistics(train_norm, d_model),
        }
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=2))
        return meta


def extract_activations(corpus: pl.DataFrame, model: nn.Module, tokenizer, spec: ActivationSpec,
                        folder: Path, model_name: str, progress: Callable[[str], None] | None = None
                        ) -> list[dict]:
    """Run the corpus through the model once, up to the deepest of the spec's hooks, and write each hook's store:
    the first in `folder`, the others in `folder/hooks/<hook>/` (`store.hook_store_dir`), each with its shards
    and meta.json; returns the metas in the spec's order. `progress` gets a line every PROGRESS_SECONDS."""
    hooks = [HookPoint.parse(name) for name in spec.hook_names()]
    d_model = check_layer(model, max(hook.layer for hook in hooks))
    for hook in hooks:
        hook.locate(model)  # a site the model lacks is refused before the first batch
    eval_ids = split_sequences(len(corpus), spec.eval_fraction, spec.seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)) if spec.exclude_special_tokens else [])
    storage_dtype = STORAGE_DTYPES[spec.dtype]
    stores = []
    for hook in hooks:
        where = hook_store_dir(folder, hook.name, hooks[0].name)
        where.mkdir(parents=True, exist_ok=True)
        stores.append(_HookStore(hook, where, {split: ShardWriter(where, split, spec.shard_tokens, storage_dtype)
                                               for split in ("train", "eval")}))
    pad_id = tokenizer.pad_token_id
    advance = progress_counter(progress, "extraction", int(corpus["input_ids"].list.len().sum()), "tokens")
    for split in ("train", "eval"):
        rows = (corpus.filter(pl.col("seq_id").is_in(list(eval_ids)) == (split == "eval"))
                .sort(pl.col("input_ids").list.len()))  # similar lengths per batch: less padding
        for start in range(0, len(rows), spec.batch_size):
            batch = rows.slice(start, spec.batch_size)
            seq_ids = torch.tensor(batch["seq_id"].to_list())
            input_ids, mask = pad_batch(batch["input_ids"].to_list(), pad_id)
            captured = hook_activations(model, hooks, input_ids, mask)
            keep = mask.bool() & ~torch.isin(input_ids, special)
            rows_idx, pos_idx = keep.nonzero(as_tuple=True)
            locs = torch.stack([seq_ids[rows_idx], pos_idx], dim=1).to(torch.int32)
            for store in stores:
                store.add(split, captured[store.hook][rows_idx, pos_idx], locs)
            advance(int(mask.sum()))
    names = [hook.name for hook in hooks]
    return [store.finish(spec, model_name, d_model, eval_ids, names) for store in stores]
