"""Per-latent statistics and top activating examples of a saved SAE, streamed over the eval split.

One pass over the held-out tokens keeps only running per-latent accumulators (firing count, activation sum,
max) and a running top-N per latent ([d_sae, top_n] values and locations), so memory is flat in n_tokens:
the full [n_tokens, d_sae] latent matrix is never materialised.

A latent whose max activation is below LIVE_THRESHOLD is not live: it either never fires ("dead") or fires
only with numerically meaningless values such as 1e-16 ("near-zero", the symptom of a collapsed SAE in
seed 003). Neither kind may be labelled, because its "top examples" are noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from torch import Tensor

from sae_pipeline.activations import ActivationStore
from sae_pipeline.markdown import format_cell
from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.storage import write_parquet_atomic

LIVE_THRESHOLD = 1e-6

FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "frequency": pl.Float64(),  # fraction of eval tokens where the latent is > 0
    "mean_activation": pl.Float64(),  # mean over the tokens where it fires; 0.0 if it never fires
    "max_activation": pl.Float64(),  # max over eval tokens (0.0 if it never fires)
    "is_live": pl.Boolean(),  # max_activation >= LIVE_THRESHOLD
    "top_activations": pl.List(pl.Float64()),  # descending, only values > 0, at most top_n
    "top_tokens": pl.List(pl.String()),  # raw token string (tokenizer.convert_ids_to_tokens) per example
    "top_contexts": pl.List(pl.String()),  # decoded text around the example, firing token as [[token]]
    "top_seq_ids": pl.List(pl.Int64()),  # corpus seq_id per example
    "top_positions": pl.List(pl.Int64()),  # index into that sequence's input_ids per example
}


def _chunk_top(latents: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each latent in a chunk and their rows, [d_sae, k] each, in canonical order.

    Canonical: descending, equal values in row (token) order, and a tie straddling the k-th place goes to
    the earliest rows. torch.topk alone breaks ties arbitrarily, which would make the table depend on the
    chunk size (a bias-only latent is constant on every token). Latents with such a straddling positive tie
    are re-selected with a stable sort, which is slower but rare; ties at zero never matter.
    """
    values, rows = latents.topk(min(k + 1, len(latents)), dim=0)  # one extra row reveals a straddling tie
    if len(values) > k:
        straddling = ((values[k] == values[k - 1]) & (values[k - 1] > 0)).nonzero().squeeze(1)
        values, rows = values[:k], rows[:k]
        if len(straddling):
            tied_values, tied_rows = latents[:, straddling].sort(dim=0, descending=True, stable=True)
            values[:, straddling], rows[:, straddling] = tied_values[:k], tied_rows[:k]
    rows, by_row = rows.t().sort(dim=1)
    values, by_value = values.t().gather(1, by_row).sort(dim=1, descending=True, stable=True)
    return values, rows.gather(1, by_value)


@dataclass
class _RunningStats:
    """Per-latent accumulators and the running top-N, all on the SAE's device."""

    count: Tensor  # [d_sae] float64, tokens where the latent fires
    total: Tensor  # [d_sae] float64, sum of its activations where it fires
    peak: Tensor  # [d_sae] float64, max activation (>= 0)
    top_values: Tensor  # [d_sae, <= top_n] float32, canonical order (see _chunk_top)
    top_locations: Tensor  # [d_sae, <= top_n, 2] int64, (seq_id, position)
    n_tokens: int = 0

    @classmethod
    def empty(cls, d_sae: int, device: torch.device) -> _RunningStats:
        zeros = torch.zeros(d_sae, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), zeros.clone(), torch.empty(d_sae, 0, device=device),
                   torch.empty(d_sae, 0, 2, dtype=torch.int64, device=device))

    def update(self, latents: Tensor, locations: Tensor, top_n: int) -> None:
        """Fold one chunk in: the top-N over (kept [d_sae, N], the chunk's values transposed).

        The chunk's own top-N is taken first, so the merge handles [d_sae, 2N] values and locations instead
        of [d_sae, N + chunk]; it is a stable sort with the kept (earlier) examples first, so ties keep
        going to the earliest tokens and the result does not depend on the chunk size.
        """
        firing = latents > 0
        self.count += firing.sum(dim=0)
        self.total += torch.where(firing, latents, 0).sum(dim=0, dtype=torch.float64)
        self.peak = torch.maximum(self.peak, latents.amax(dim=0).double())
        self.n_tokens += len(latents)
        chunk_values, rows = _chunk_top(latents, min(top_n, len(latents)))
        values = torch.cat([self.top_values, chunk_values], dim=1)
        candidates = torch.cat([self.top_locations, locations.to(torch.int64)[rows]], dim=1)
        values, order = values.sort(dim=1, descending=True, stable=True)
        self.top_values, order = values[:, :top_n], order[:, :top_n]
        self.top_locations = candidates.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


@torch.no_grad()
def _stream_latents(sae: SparseAutoencoder, store: ActivationStore, top_n: int, device: torch.device,
                    chunk: int) -> _RunningStats:
    stats = _RunningStats.empty(sae.d_sae, device)
    for acts, locations in store.iter_split("eval", chunk, with_locations=True):
        _, latents = sae.reconstruct(acts.to(device))
        stats.update(latents.float(), locations.to(device), top_n)
    if stats.n_tokens == 0:
        raise ValueError(f"{store.folder}: the eval split has no tokens; nothing to compute features on")
    return stats


class _ContextBuilder:
    """Token strings and marked contexts of (seq_id, position) pairs.

    The seq_id -> tokens lookup is built once, for the sequences that hold a top example only.
    """

    def __init__(self, corpus: pl.DataFrame, seq_ids: set[int], tokenizer, window: int):
        rows = corpus.filter(pl.col("seq_id").is_in(sorted(seq_ids))).select("seq_id", "input_ids")
        pairs = zip(rows["seq_id"].to_list(), rows["input_ids"].to_list(), strict=True)
        self.tokens = {seq: tokenizer.convert_ids_to_tokens(ids) for seq, ids in pairs}
        self.tokenizer, self.window = tokenizer, window
        self.cache: dict[tuple[int, int], str] = {}

    def _sequence(self, seq_id: int, position: int) -> list[str]:
        tokens = self.tokens.get(seq_id)
        if tokens is None or not 0 <= position < len(tokens):
            raise ValueError(f"activation location (seq_id={seq_id}, position={position}) is not in the "
                             "corpus; the corpus and the activation store are out of sync")
        return tokens

    def token(self, seq_id: int, position: int) -> str:
        return self._sequence(seq_id, position)[position]

    def context(self, seq_id: int, position: int) -> str:
        key = (seq_id, position)
        if key not in self.cache:
            tokens = self._sequence(seq_id, position)
            token = tokens[position]
            marked = f"[[{self.tokenizer.convert_tokens_to_string([token]).strip() or token}]]"
            left = self.tokenizer.convert_tokens_to_string(tokens[max(0, position - self.window):position])
            right = self.tokenizer.convert_tokens_to_string(tokens[position + 1:position + 1 + self.window])
            self.cache[key] = " ".join(part for part in (left.strip(), marked, right.strip()) if part)
        return self.cache[key]


def compute_features(sae: SparseAutoencoder, store: ActivationStore, corpus: pl.DataFrame, tokenizer,
                     top_n: int = 20, window: int = 16, device: str | torch.device = "cpu",
                     chunk: int = 4096) -> pl.DataFrame:
    """One row per latent (FEATURE_SCHEMA) from one streamed pass over the eval split.

    Top examples with equal activations are listed in eval-token order, whatever the chunk size.
    """
    if top_n < 1 or window < 0 or chunk < 1:
        raise ValueError(f"top_n={top_n} must be >= 1, window={window} >= 0, chunk={chunk} >= 1")
    device = torch.device(device)
    stats = _stream_latents(sae.to(device).eval(), store, top_n, device, chunk)
    values = stats.top_values.double().cpu().tolist()
    locations = stats.top_locations.cpu().tolist()
    examples = [[loc for value, loc in zip(row_values, row_locations, strict=True) if value > 0]
                for row_values, row_locations in zip(values, locations, strict=True)]
    contexts = _ContextBuilder(corpus, {seq for row in examples for seq, _ in row}, tokenizer, window)
    count = stats.count.cpu()
    return pl.DataFrame({
        "latent_id": range(sae.d_sae),
        "frequency": (count / stats.n_tokens).tolist(),
        "mean_activation": torch.where(count > 0, stats.total.cpu() / count.clamp(min=1), 0.0).tolist(),
        "max_activation": stats.peak.cpu().tolist(),
        "is_live": (stats.peak.cpu() >= LIVE_THRESHOLD).tolist(),
        "top_activations": [[v for v in row if v > 0] for row in values],
        "top_tokens": [[contexts.token(seq, pos) for seq, pos in row] for row in examples],
        "top_contexts": [[contexts.context(seq, pos) for seq, pos in row] for row in examples],
        "top_seq_ids": [[seq for seq, _ in row] for row in examples],
        "top_positions": [[pos for _, pos in row] for row in examples],
    }, schema=FEATURE_SCHEMA)


def features_summary(features: pl.DataFrame) -> dict:
    """Counts of live, dead (never fires) and near-zero (fires, but max < LIVE_THRESHOLD) latents."""
    fires = features["frequency"] > 0
    near_zero = fires & (features["max_activation"] < LIVE_THRESHOLD)
    return {
        "n_latents": len(features),
        "n_live": int(features["is_live"].sum()),
        "n_dead": int((~fires).sum()),
        "n_near_zero": int(near_zero.sum()),
        "mean_frequency": float(features["frequency"].mean() or 0.0),
    }


def top_features_markdown(features: pl.DataFrame, n: int = 10) -> str:
    """Markdown table of the n live latents with the highest max activation (up to 5 distinct top tokens)."""
    top = features.filter(pl.col("is_live")).sort("max_activation", descending=True).head(n)
    lines = ["| latent | frequency | max activation | top tokens |", "|---:|---:|---:|---|"]
    for row in top.iter_rows(named=True):
        tokens = ", ".join(f"`{format_cell(t)}`" for t in list(dict.fromkeys(row["top_tokens"]))[:5])
        lines.append(f"| {row['latent_id']} | {row['frequency']:.4g} | {row['max_activation']:.4g} "
                     f"| {tokens} |")
    return "\n".join(lines) + "\n"


def write_features(features: pl.DataFrame, path: Path) -> None:
    write_parquet_atomic(features, path)
