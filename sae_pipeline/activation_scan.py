"""One streamed pass over an activation store: per-shard counts of non-finite, all-zero, constant and duplicated
token rows, and every token's norm (what the `activations_*` checks in `quality.py` judge)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sae_pipeline.store import ActivationStore


@dataclass(frozen=True)
class ShardScan:
    """Per-shard token statistics (one streamed pass; the shard is never held twice)."""

    file: str
    n_tokens: int
    n_nonfinite: int
    n_zero: int
    """Rows whose every value is exactly 0."""
    n_constant: int
    """Rows whose values are all equal (zero rows included)."""


@dataclass(frozen=True)
class DuplicateScan:
    """Token rows that are bit-identical to another row, over both splits."""

    n_rows: int
    """Finite rows identical to at least one other row (every member of a group counts)."""
    largest_group: int
    """Rows sharing the most frequent repeated vector."""
    examples: list[dict[str, Any]]
    """Where some of them are: shard file, row, seq_id and token position; the largest groups first."""


DUPLICATE_EXAMPLES = 20
"""Positions of duplicated rows kept in the check's metadata."""


def _row_keys(x: torch.Tensor) -> torch.Tensor:
    """One int64 per row, equal for identical rows: two fixed float64 projections' bits, mixed. A collision
    between distinct rows needs both 64-bit projections to agree exactly."""
    generator = torch.Generator().manual_seed(12345)
    projections = torch.randn(x.shape[-1], 2, generator=generator, dtype=torch.float64)
    bits = (x @ projections).contiguous().view(torch.int64)
    return bits[:, 0] * 1_000_003 + bits[:, 1]


def find_duplicates(store: ActivationStore, keys: torch.Tensor, rows: torch.Tensor,
                    where: list[tuple[str, int, int]]) -> DuplicateScan:
    """Group finite rows by key (`rows`: their global index; `where`: (split, shard index, first global row)
    per shard, in order) and locate up to DUPLICATE_EXAMPLES members, largest groups first."""
    if keys.numel() == 0:
        return DuplicateScan(0, 0, [])
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    sizes = counts[inverse]
    duplicated = sizes > 1
    if not bool(duplicated.any()):
        return DuplicateScan(0, 1, [])
    order = torch.argsort(-sizes[duplicated] * (keys.numel() + 1) + inverse[duplicated])  # largest groups first
    picked = rows[duplicated][order][:DUPLICATE_EXAMPLES].tolist()
    examples = []
    starts = [first for _, _, first in where]
    for row in picked:
        shard = max(i for i, first in enumerate(starts) if first <= row)
        split, index, first = where[shard]
        _, location = store.read(split, index, row - first, row - first + 1, with_locations=True)
        examples.append({"shard": store.shards(split)[index]["file"], "row": row - first,
                         "seq_id": int(location[0, 0]), "position": int(location[0, 1])})
    return DuplicateScan(int(duplicated.sum()), int(counts.max()), examples)


@dataclass(frozen=True)
class ActivationScan:
    """What the activation checks measure: per-shard counts and the token-norm distribution of every split."""

    shards: list[ShardScan]
    norms: torch.Tensor
    """Finite token norms, float64, train and eval shards together."""
    duplicates: DuplicateScan | None = None
    """Rows identical to another row (None: not measured)."""

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def norm_stats(self) -> dict[str, float]:
        if self.norms.numel() == 0:
            return {k: math.nan for k in ("mean", "median", "std", "min", "max", "p99")}
        return {"mean": self.norms.mean().item(), "median": self.norms.median().item(),
                "std": self.norms.std().item() if self.norms.numel() > 1 else 0.0,
                "min": self.norms.min().item(), "max": self.norms.max().item(),
                "p99": torch.quantile(self.norms, 0.99).item() if self.norms.numel() <= 16_000_000 else math.nan}


def scan_activations(store: ActivationStore, chunk: int = 8192) -> ActivationScan:
    """Read every shard of both splits once and count non-finite, all-zero, constant and duplicated rows; collect
    norms.

    The per-token results go into arrays sized once for the whole store: appending one small tensor per chunk
    between the chunks' large temporaries left glibc's heap fragmented, and the scan's peak grew to several
    times what it holds (benchmarks/RESULTS.md, issue 24)."""
    total = sum(store.n_tokens(split) for split in ("train", "eval"))
    norms, keys = torch.empty(total, dtype=torch.float64), torch.empty(total, dtype=torch.int64)
    rows = torch.empty(total, dtype=torch.int64)
    shards, where, offset, filled = [], [], 0, 0
    for split in ("train", "eval"):
        for index, shard in enumerate(store.shards(split)):
            counts = [0, 0, 0]
            where.append((split, index, offset))
            for start in range(0, shard["n_tokens"], chunk):
                x = store.read(split, index, start, min(start + chunk, shard["n_tokens"])).double()
                finite = torch.isfinite(x).all(dim=-1)
                counts[0] += int((~finite).sum())
                counts[1] += int((x == 0).all(dim=-1).sum())
                counts[2] += int((x.amax(dim=-1) == x.amin(dim=-1)).sum())
                kept = x[finite]
                into = slice(filled, filled + len(kept))
                norms[into], keys[into] = kept.norm(dim=-1), _row_keys(kept)
                rows[into] = offset + start + finite.nonzero().squeeze(1)
                filled += len(kept)
            shards.append(ShardScan(shard["file"], shard["n_tokens"], *counts))
            offset += shard["n_tokens"]
    duplicates = find_duplicates(store, keys[:filled], rows[:filled], where)
    return ActivationScan(shards, norms[:filled], duplicates)
