"""Synthetic activation stores and planted sparse data shared by the unit tests (no model, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from sae_pipeline.store import META_FILE, ActivationStore
from sae_pipeline.synthetic import torch_threads  # noqa: F401 (the tests' import path)


def _locations(n: int, first_seq: int, seq_len: int = 16) -> Tensor:
    """(sequence id, position) per row, as `extract_activations` records them."""
    index = torch.arange(n)
    return torch.stack([first_seq + index // seq_len, index % seq_len], dim=1).to(torch.int32)


def _write_split(folder: Path, prefix: str, acts: Tensor, shard_tokens: int, first_seq: int) -> list[dict]:
    shards = []
    locs = _locations(len(acts), first_seq)
    for number, start in enumerate(range(0, len(acts), shard_tokens)):
        name = f"{prefix}_{number:05d}.safetensors"
        stop = min(start + shard_tokens, len(acts))
        rows = acts[start:stop].to(torch.float32).contiguous()
        save_file({"activations": rows, "locations": locs[start:stop].contiguous(), "norms": rows.norm(dim=-1)},
                  str(folder / name))
        shards.append({"file": name, "n_tokens": stop - start})
    return shards


def norm_stats_reference(train: Tensor, d_model: int) -> dict[str, float]:
    """The train-slice norm summary, computed independently (float64) the way `norm_statistics` documents it."""
    norms = train.double().norm(dim=-1)
    norms = norms[torch.isfinite(norms)]
    mean = norms.mean().item()
    return {
        "mean": mean,
        "median": norms.median().item(),
        "std": norms.std().item() if norms.numel() > 1 else 0.0,
        "min": norms.min().item(),
        "max": norms.max().item(),
        "scaling_factor": math.sqrt(d_model) / max(mean, 1e-12),
    }


def write_store(folder: str | Path, train: Tensor, eval: Tensor, shard_tokens: int) -> ActivationStore:
    """Write `train`/`eval` [n, d] as safetensors shards + meta.json in the `extract_activations` layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if train.ndim != 2 or eval.ndim != 2 or train.shape[1] != eval.shape[1]:
        raise ValueError(f"write_store: train {tuple(train.shape)} and eval {tuple(eval.shape)} must be [n, d]")
    d_model = int(train.shape[1])
    n_train_seqs = math.ceil(len(train) / 16)
    train_shards = _write_split(folder, "train", train, shard_tokens, first_seq=0)
    eval_shards = _write_split(folder, "eval", eval, shard_tokens, first_seq=n_train_seqs)
    n_eval_seqs = math.ceil(len(eval) / 16)
    meta = {
        "model": "synthetic",
        "layer": 0,
        "hook": "synthetic activations",
        "dtype": "float32",
        "d_model": d_model,
        "n_tokens": len(train) + len(eval),
        "n_train_tokens": len(train),
        "n_eval_tokens": len(eval),
        "train_shards": train_shards,
        "eval_shards": eval_shards,
        "eval_sequence_ids": list(range(n_train_seqs, n_train_seqs + n_eval_seqs)),
        "locations": "tensor `locations` [n, 2] int32 in each shard: (seq_id in corpus.parquet, token position)",
        "exclude_special_tokens": True,
        "n_nonfinite_tokens": sum(int((~torch.isfinite(acts).all(dim=-1)).sum()) for acts in (train, eval)),
        "norm_stats": norm_stats_reference(train, d_model),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return ActivationStore(folder)


def planted_sparse_data(n: int, d: int, n_dirs: int, k_active: int, seed: int) -> tuple[Tensor, Tensor]:
    """Tokens that are sparse non-negative combinations of known unit directions.

    Returns (data [n, d] float32, directions [n_dirs, d] with unit rows). Each token uses exactly `k_active`
    distinct directions, chosen uniformly, with coefficients uniform in [0.5, 1.5].
    """
    if not 1 <= k_active <= n_dirs:
        raise ValueError(f"k_active: {k_active} must be in 1..n_dirs={n_dirs}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_dirs, d, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_dirs, generator=generator).argsort(dim=1)[:, :k_active]
    values = 0.5 + torch.rand(n, k_active, generator=generator, dtype=torch.float64)
    coefficients = torch.zeros(n, n_dirs, dtype=torch.float64).scatter_(1, active, values)
    data = coefficients @ directions
    return data.float(), directions.float()


def recovery_score(decoder: Tensor, directions: Tensor) -> float:
    """Mean over planted directions of the best cosine with any decoder row."""
    dec = decoder.double() / decoder.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    dirs = directions.double() / directions.double().norm(dim=1, keepdim=True)
    return (dirs @ dec.t()).max(dim=1).values.mean().item()


PLANTED_D, PLANTED_DIRECTIONS, PLANTED_K = 32, 64, 3
PLANTED_RUN = dict(expansion_factor=4, batch_size=256, train_tokens=100_000, lr=3e-3, lr_warmup_steps=10,
                   log_every=50)
"""Training fields for the planted store: a run that recovers its directions on CPU in seconds."""


def planted_store(folder: Path) -> tuple[ActivationStore, torch.Tensor]:
    """A store of PLANTED_K-sparse combinations of PLANTED_DIRECTIONS directions in PLANTED_D dims, and those
    directions."""
    data, directions = planted_sparse_data(22_000, PLANTED_D, PLANTED_DIRECTIONS, PLANTED_K, seed=0)
    return write_store(folder, data[:20_000], data[20_000:], shard_tokens=4096), directions
