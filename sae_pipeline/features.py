"""Per-latent statistics and top activating examples of a saved SAE, streamed over the eval split.

One pass over the held-out tokens keeps only running per-latent accumulators (firing count, activation sum,
max) and a running top-N per latent ([d_sae, top_n] values and locations), so memory is flat in n_tokens:
the full [n_tokens, d_sae] latent matrix is never materialised.

A latent whose max activation is below LIVE_THRESHOLD is not live: it either never fires ("dead") or fires
only with numerically meaningless values such as 1e-16 ("near-zero", the symptom of a collapsed SAE in
seed 003). Neither kind may be labelled, because its "top examples" are noise.

`extract_features` adds what a feature dashboard (SAEDashboard, Neuronpedia) and delphi-style scoring need,
still with memory flat in n_tokens, in three streamed passes over the eval split:
1. statistics, the running top-N and a log10 activation histogram per latent (fixed bins, HIST_LOG10_EDGES);
2. quantile-sampled examples: (0, max] cut into `n_bands` equal-width bands (as SAEDashboard does), up to
   `per_band` examples drawn uniformly per band by a hash of (eval row, latent), the top-N excluded so they stay
   held out for scoring; plus `n_random` non-activating examples (the latent is 0 on the centre token);
3. the per-token activation values of the latent over each kept example's context window: only the
   (sequence, position, latent) triples inside those windows are looked up, so this pass holds
   O(d_sae x examples x window) values, never O(n_tokens).

Tables (plain parquet, `polars.read_parquet` reads them):
- latents (`features.parquet`, FEATURE_SCHEMA): one row per latent;
- examples (`examples.parquet`, EXAMPLE_SCHEMA): one row per kept example, keyed by latent_id, with kind
  `top` | `quantile` | `random`, the window's tokens and the latent's activation on each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import polars as pl
import torch
from torch import Tensor

from sae_pipeline.markdown import format_cell
from sae_pipeline.progress import progress_counter
from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.storage import write_parquet_atomic
from sae_pipeline.store import ActivationStore
from sae_pipeline.vocab import excluded_vocab_ids, vocab_projection

LIVE_THRESHOLD = 1e-6
FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "examples.parquet"
FEATURES_META_FILE = "features_meta.json"
"""The `features` asset's folder: the latents table, the examples table, and how they were made (top_n, window,
n_bands, ..., vocab_kind, model)."""

FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "frequency": pl.Float64(),
    "mean_activation": pl.Float64(),
    "max_activation": pl.Float64(),
    "is_live": pl.Boolean(),
    "top_activations": pl.List(pl.Float64()),
    "top_tokens": pl.List(pl.String()),
    "top_contexts": pl.List(pl.String()),
    "top_seq_ids": pl.List(pl.Int64()),
    "top_positions": pl.List(pl.Int64()),
    "hist_counts": pl.List(pl.Int64()),
    "vocab_kind": pl.String(),
    "top_vocab_tokens": pl.List(pl.String()),
    "top_vocab_values": pl.List(pl.Float64()),
    "bottom_vocab_tokens": pl.List(pl.String()),
    "bottom_vocab_values": pl.List(pl.Float64()),
}

FEATURE_COLUMNS: dict[str, str] = {
    "latent_id": "index of the latent (row of W_dec)",
    "frequency": "fraction of eval tokens where the latent is > 0",
    "mean_activation": "mean over the tokens where it fires; 0.0 if it never fires",
    "max_activation": "max over eval tokens (0.0 if it never fires)",
    "is_live": "max_activation >= LIVE_THRESHOLD (1e-6); only live latents are labelled",
    "top_activations": "descending, only values > 0, at most top_n",
    "top_tokens": "raw token string (tokenizer.convert_ids_to_tokens) per top example",
    "top_contexts": "decoded text around each top example, firing token as [[token]]",
    "top_seq_ids": "corpus seq_id per top example",
    "top_positions": "index into that sequence's input_ids per top example",
    "hist_counts": "eval tokens per log10(activation) bin (HIST_LOG10_EDGES: 1e-6 to 1e4, 0.25 wide); firing only",
    "vocab_kind": "logit_effect, nearest_embedding or none",
    "top_vocab_tokens": "largest logit effect / most similar input embedding first",
    "top_vocab_values": "logit effect (decoder row . W_U column) or cosine similarity",
    "bottom_vocab_tokens": "most negative logit effect / least similar input embedding first",
    "bottom_vocab_values": "the values of bottom_vocab_tokens",
}
"""What each FEATURE_SCHEMA column holds (the `features` asset's column schema shows it)."""

EXAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "kind": pl.String(),
    "band": pl.Int64(),
    "rank": pl.Int64(),
    "seq_id": pl.Int64(),
    "position": pl.Int64(),
    "activation": pl.Float64(),
    "tokens": pl.List(pl.String()),
    "token_activations": pl.List(pl.Float64()),
    "center": pl.Int64(),
}

EXAMPLE_COLUMNS: dict[str, str] = {
    "latent_id": "the latent this example is of",
    "kind": "top (used for labelling), quantile (held out) or random (latent 0 at the centre token)",
    "band": "quantile band, 0 = lowest (0, max/n_bands]; -1 for top and random examples",
    "rank": "order within (latent, kind, band): descending activation (top, quantile), draw order (random)",
    "seq_id": "corpus seq_id",
    "position": "centre token's index into that sequence's input_ids",
    "activation": "the latent's activation on the centre token",
    "tokens": "the window's raw token strings (convert_ids_to_tokens), special tokens included",
    "token_activations": "the latent on each window token (0 where not stored: special tokens)",
    "center": "index of the centre token inside tokens",
}
"""What each EXAMPLE_SCHEMA column holds."""

HIST_LOG10_EDGES: list[float] = [-6.0 + 0.25 * i for i in range(41)]
"""Bin edges of `hist_counts` in log10(activation): 40 bins from 1e-6 to 1e4; values outside go to the end bins."""


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


def log10_bins(values: Tensor) -> Tensor:
    """Bin index in HIST_LOG10_EDGES of positive values; values outside the edges go to the first/last bin."""
    low, width = HIST_LOG10_EDGES[0], HIST_LOG10_EDGES[1] - HIST_LOG10_EDGES[0]
    bins = ((values.double().log10() - low) / width).floor()
    return bins.clamp(0, len(HIST_LOG10_EDGES) - 2).to(torch.int64)


@dataclass
class _RunningStats:
    """Per-latent accumulators and the running top-N, all on the SAE's device."""

    count: Tensor  # [d_sae] float64, tokens where the latent fires
    total: Tensor  # [d_sae] float64, sum of its activations where it fires
    peak: Tensor  # [d_sae] float64, max activation (>= 0)
    top_values: Tensor  # [d_sae, <= top_n] float32, canonical order (see _chunk_top)
    top_locations: Tensor  # [d_sae, <= top_n, 2] int64, (seq_id, position)
    hist: Tensor  # [d_sae, len(HIST_LOG10_EDGES) - 1] int64, firing tokens per log10 bin
    n_tokens: int = 0

    @classmethod
    def empty(cls, d_sae: int, device: torch.device) -> _RunningStats:
        zeros = torch.zeros(d_sae, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), zeros.clone(), torch.empty(d_sae, 0, device=device),
                   torch.empty(d_sae, 0, 2, dtype=torch.int64, device=device),
                   torch.zeros(d_sae, len(HIST_LOG10_EDGES) - 1, dtype=torch.int64, device=device))

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
        token_rows, latent_ids = firing.nonzero(as_tuple=True)
        self.hist.view(-1).index_add_(0, latent_ids * self.hist.shape[1] + log10_bins(latents[token_rows, latent_ids]),
                                      torch.ones_like(latent_ids))
        chunk_values, rows = _chunk_top(latents, min(top_n, len(latents)))
        values = torch.cat([self.top_values, chunk_values], dim=1)
        candidates = torch.cat([self.top_locations, locations.to(torch.int64)[rows]], dim=1)
        values, order = values.sort(dim=1, descending=True, stable=True)
        self.top_values, order = values[:, :top_n], order[:, :top_n]
        self.top_locations = candidates.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


@torch.no_grad()
def _stream_latents(sae: SparseAutoencoder, store: ActivationStore, top_n: int, device: torch.device,
                    chunk: int, advance: Callable[[int], None]) -> _RunningStats:
    stats = _RunningStats.empty(sae.d_sae, device)
    for acts, locations in store.iter_split("eval", chunk, with_locations=True):
        _, latents = sae.reconstruct(acts.to(device))
        stats.update(latents.float(), locations.to(device), top_n)
        advance(len(acts))
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


def _hash_priority(rows: Tensor, d_sae: int, seed: int) -> Tensor:
    """A uniform-looking priority in [0, 1) per (global eval row, latent), [len(rows), d_sae] float64.

    A fixed integer hash, not a random generator, so the examples drawn do not depend on the chunk size.
    """
    x = rows.to(torch.int64).unsqueeze(1) * 1_000_003 + torch.arange(d_sae, device=rows.device) * 7_919 + seed
    for _ in range(2):
        x = ((x ^ (x >> 13)) & 0xFFFFFFFF) * 0x5BD1E995 & 0xFFFFFFFF
        x = x ^ (x >> 15)
    return x.double() / 2.0**32


@dataclass
class _BandSampler:
    """Per latent and group (n_bands quantile bands, then one `random` group), the k draws of highest priority."""

    priority: Tensor  # [d_sae, groups, k] float64, -inf where empty
    values: Tensor  # [d_sae, groups, k] float32
    locations: Tensor  # [d_sae, groups, k, 2] int64

    @classmethod
    def empty(cls, d_sae: int, groups: int, k: int, device: torch.device) -> _BandSampler:
        return cls(torch.full((d_sae, groups, k), -torch.inf, dtype=torch.float64, device=device),
                   torch.zeros(d_sae, groups, k, device=device),
                   torch.zeros(d_sae, groups, k, 2, dtype=torch.int64, device=device))

    def update(self, group: int, eligible: Tensor, priority: Tensor, latents: Tensor, locations: Tensor) -> None:
        k = self.priority.shape[2]
        masked = torch.where(eligible, priority, -torch.inf)
        chunk_priority, rows = masked.topk(min(k, len(masked)), dim=0)  # [k', d_sae]
        chunk_values = latents.gather(0, rows).t()
        merged = torch.cat([self.priority[:, group], chunk_priority.t()], dim=1)
        values = torch.cat([self.values[:, group], chunk_values], dim=1)
        locs = torch.cat([self.locations[:, group], locations.to(torch.int64)[rows.t()]], dim=1)
        merged, order = merged.sort(dim=1, descending=True, stable=True)
        order = order[:, :k]
        self.priority[:, group] = merged[:, :k]
        self.values[:, group] = values.gather(1, order)
        self.locations[:, group] = locs.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


@torch.no_grad()
def _sample_examples(sae: SparseAutoencoder, store: ActivationStore, stats: _RunningStats, n_bands: int,
                     per_band: int, n_random: int, device: torch.device, chunk: int, seed: int,
                     advance: Callable[[int], None]) -> _BandSampler:
    """Pass 2: quantile-band and non-activating draws; firing tokens at or above the latent's smallest top-N
    value are excluded (they are the labelling examples; these are held out for scoring)."""
    d_sae = sae.d_sae
    k = max(per_band, n_random, 1)
    sampler = _BandSampler.empty(d_sae, n_bands + 1, k, device)
    if not per_band and not n_random:
        return sampler
    peak = stats.peak.float()
    kept = stats.top_values
    top_floor = torch.where(kept > 0, kept, torch.inf).amin(dim=1) if kept.shape[1] else torch.full_like(peak,
                                                                                                         torch.inf)
    offset = 0
    for acts, locations in store.iter_split("eval", chunk, with_locations=True):
        _, latents = sae.reconstruct(acts.to(device))
        latents, locations = latents.float(), locations.to(device)
        priority = _hash_priority(torch.arange(offset, offset + len(latents), device=device), d_sae, seed)
        offset += len(latents)
        advance(len(latents))
        firing = (latents > 0) & (latents < top_floor)
        band = (latents / peak.clamp(min=1e-30) * n_bands).floor().clamp(0, n_bands - 1).to(torch.int64)
        if per_band:
            for b in range(n_bands):
                sampler.update(b, firing & (band == b), priority, latents, locations)
        if n_random:
            sampler.update(n_bands, latents <= 0, priority, latents, locations)
    return sampler


class _Windows:
    """Token windows of (seq_id, position) centres, from the corpus (only sequences holding an example)."""

    def __init__(self, corpus: pl.DataFrame, seq_ids: set[int], tokenizer, window: int):
        rows = corpus.filter(pl.col("seq_id").is_in(sorted(seq_ids))).select("seq_id", "input_ids")
        self.ids = dict(zip(rows["seq_id"].to_list(), rows["input_ids"].to_list(), strict=True))
        self.tokenizer, self.window = tokenizer, window
        self.cache: dict[int, list[str]] = {}

    def span(self, seq_id: int, position: int) -> tuple[int, int]:
        ids = self.ids.get(seq_id)
        if ids is None or not 0 <= position < len(ids):
            raise ValueError(f"activation location (seq_id={seq_id}, position={position}) is not in the "
                             "corpus; the corpus and the activation store are out of sync")
        return max(0, position - self.window), min(len(ids), position + self.window + 1)

    def tokens(self, seq_id: int, start: int, stop: int) -> list[str]:
        if seq_id not in self.cache:
            self.cache[seq_id] = self.tokenizer.convert_ids_to_tokens(self.ids[seq_id])
        return self.cache[seq_id][start:stop]


@torch.no_grad()
def _window_activations(sae: SparseAutoencoder, store: ActivationStore, spans: list[tuple[int, int, int, int]],
                        device: torch.device, chunk: int) -> list[list[float]]:
    """Pass 3: the latent's activation on every token of each (latent, seq_id, start, stop) window.

    Every window token becomes one entry keyed by (seq_id, position); each chunk looks its rows up in the
    sorted keys, so the work and memory are proportional to the entries, not to n_tokens.
    """
    if not spans:
        return []
    max_pos = max(stop for _, _, _, stop in spans) + 1
    lengths = torch.tensor([stop - start for _, _, start, stop in spans])
    example = torch.repeat_interleave(torch.arange(len(spans)), lengths)
    starts = torch.tensor([start for _, _, start, _ in spans])
    offsets = torch.arange(len(example)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    seqs = torch.tensor([seq for _, seq, _, _ in spans])
    keys = seqs[example] * max_pos + starts[example] + offsets
    keys, order = keys.sort()
    example, offsets = example[order].to(device), offsets[order].to(device)
    keys = keys.to(device)
    latent_of = torch.tensor([latent for latent, _, _, _ in spans], device=device)
    out = torch.zeros(len(spans), int(lengths.max()), device=device)
    for acts, locations in store.iter_split("eval", chunk, with_locations=True):
        locations = locations.to(device).to(torch.int64)
        row_keys = locations[:, 0] * max_pos + locations[:, 1]
        left = torch.searchsorted(keys, row_keys)
        counts = torch.searchsorted(keys, row_keys, right=True) - left
        if not int(counts.sum()):
            continue
        rows = torch.repeat_interleave(torch.arange(len(row_keys), device=device), counts)
        entries = torch.repeat_interleave(left, counts) + torch.arange(len(rows), device=device) - \
            torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        needed = rows.unique()
        _, latents = sae.reconstruct(acts.to(device)[needed])
        position_in_needed = torch.searchsorted(needed, rows)
        ex = example[entries]
        out[ex, offsets[entries]] = latents.float()[position_in_needed, latent_of[ex]]
    return [row[: int(n)] for row, n in zip(out.cpu().double().tolist(), lengths.tolist(), strict=True)]


class FeatureTables(NamedTuple):
    """What `extract_features` returns."""

    latents: pl.DataFrame
    """One row per latent, FEATURE_SCHEMA."""
    examples: pl.DataFrame
    """One row per kept example, EXAMPLE_SCHEMA, sorted by latent_id, kind, band, rank."""


def _example_rows(latent: int, kind: str, band: int, pairs: list[tuple[float, list[int]]]) -> list[dict]:
    return [{"latent_id": latent, "kind": kind, "band": band, "rank": rank, "seq_id": loc[0], "position": loc[1],
             "activation": value} for rank, (value, loc) in enumerate(pairs)]


def extract_features(sae: SparseAutoencoder, store: ActivationStore, corpus: pl.DataFrame, tokenizer,
                     top_n: int = 20, window: int = 16, n_bands: int = 5, per_band: int = 5, n_random: int = 10,
                     vocab: tuple[str, Tensor] | None = None, vocab_k: int = 10,
                     device: str | torch.device = "cpu", chunk: int = 4096, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> FeatureTables:
    """Latents and examples tables from three streamed passes over the eval split (see the module docstring).

    `window` tokens on each side of the centre make a context (16: a 33-token window); top_contexts keep the
    decoded-text form. `vocab` is (kind, matrix) from `vocab.load_vocab_matrix`; None leaves the vocabulary
    columns empty with vocab_kind "none". `progress` gets a line every PROGRESS_SECONDS over the two passes.
    """
    if top_n < 1 or window < 0 or chunk < 1 or n_bands < 1 or per_band < 0 or n_random < 0:
        raise ValueError(f"top_n={top_n} must be >= 1, window={window} >= 0, chunk={chunk} >= 1, "
                         f"n_bands={n_bands} >= 1, per_band={per_band} >= 0, n_random={n_random} >= 0")
    device = torch.device(device)
    sae = sae.to(device).eval()
    advance = progress_counter(progress, "features", 2 * store.n_tokens("eval"), "tokens")
    stats = _stream_latents(sae, store, top_n, device, chunk, advance)
    sampler = _sample_examples(sae, store, stats, n_bands, per_band, n_random, device, chunk, seed, advance)
    values = stats.top_values.double().cpu().tolist()
    locations = stats.top_locations.cpu().tolist()
    top_examples = [[(value, loc) for value, loc in zip(row_values, row_locations, strict=True) if value > 0]
                    for row_values, row_locations in zip(values, locations, strict=True)]
    rows: list[dict] = []
    sampled_ok = (sampler.priority > -torch.inf).cpu()
    sampled_values = sampler.values.double().cpu().tolist()
    sampled_locations = sampler.locations.cpu().tolist()
    for latent in range(sae.d_sae):
        rows += _example_rows(latent, "top", -1, top_examples[latent])
        for group in range(n_bands + 1):
            limit = per_band if group < n_bands else n_random
            kept = [(sampled_values[latent][group][i], sampled_locations[latent][group][i])
                    for i in range(limit) if sampled_ok[latent, group, i]]
            if group < n_bands:
                rows += _example_rows(latent, "quantile", group, sorted(kept, key=lambda item: -item[0]))
            else:
                rows += _example_rows(latent, "random", -1, kept)
    seq_ids = {row["seq_id"] for row in rows}
    contexts = _ContextBuilder(corpus, {seq for row in top_examples for _, (seq, _) in row}, tokenizer, window)
    windows = _Windows(corpus, seq_ids, tokenizer, window)
    spans = []
    for row in rows:
        start, stop = windows.span(row["seq_id"], row["position"])
        spans.append((row["latent_id"], row["seq_id"], start, stop))
        row["tokens"] = windows.tokens(row["seq_id"], start, stop)
        row["center"] = row["position"] - start
    for row, token_values in zip(rows, _window_activations(sae, store, spans, device, chunk), strict=True):
        row["token_activations"] = token_values
    examples = pl.DataFrame(rows, schema=EXAMPLE_SCHEMA) if rows else pl.DataFrame(schema=EXAMPLE_SCHEMA)
    examples = examples.select(list(EXAMPLE_SCHEMA))
    if vocab is not None:
        projected = vocab_projection(sae.W_dec.detach(), vocab[1], vocab[0], tokenizer, vocab_k,
                                     excluded_vocab_ids(tokenizer))
        kind = vocab[0]
    else:
        projected = {name: [[] for _ in range(sae.d_sae)] for name in
                     ("top_vocab_tokens", "top_vocab_values", "bottom_vocab_tokens", "bottom_vocab_values")}
        kind = "none"
    count = stats.count.cpu()
    latents = pl.DataFrame({
        "latent_id": range(sae.d_sae),
        "frequency": (count / stats.n_tokens).tolist(),
        "mean_activation": torch.where(count > 0, stats.total.cpu() / count.clamp(min=1), 0.0).tolist(),
        "max_activation": stats.peak.cpu().tolist(),
        "is_live": (stats.peak.cpu() >= LIVE_THRESHOLD).tolist(),
        "top_activations": [[v for v, _ in row] for row in top_examples],
        "top_tokens": [[contexts.token(seq, pos) for _, (seq, pos) in row] for row in top_examples],
        "top_contexts": [[contexts.context(seq, pos) for _, (seq, pos) in row] for row in top_examples],
        "top_seq_ids": [[seq for _, (seq, _) in row] for row in top_examples],
        "top_positions": [[pos for _, (_, pos) in row] for row in top_examples],
        "hist_counts": stats.hist.cpu().tolist(),
        "vocab_kind": [kind] * sae.d_sae,
        **projected,
    }, schema=FEATURE_SCHEMA)
    return FeatureTables(latents, examples)


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


def write_examples(examples: pl.DataFrame, path: Path) -> None:
    write_parquet_atomic(examples, path)
