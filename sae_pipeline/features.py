"""Per-latent statistics and top activating examples of a saved SAE, streamed over the eval split.

One pass over the held-out tokens keeps only running per-latent accumulators (firing count, activation sum,
max) and a running top-N per latent ([d_sae, top_n] values and locations), so memory is flat in n_tokens:
the full [n_tokens, d_sae] latent matrix is never materialised.

A latent whose max activation is below LIVE_THRESHOLD is not live: it either never fires ("dead") or fires
only with numerically meaningless values such as 1e-16 ("near-zero", the symptom of a collapsed SAE in
seed 003). Neither kind may be labelled, because its "top examples" are noise.

`extract_features` adds what a feature dashboard (SAEDashboard, Neuronpedia) and delphi-style scoring need,
still with memory flat in n_tokens, in three streamed passes over the eval split (its latents are encoded once
and kept between the passes when they fit in KEPT_LATENTS_BYTES, else encoded in each pass):
1. statistics, the running top-N and a log10 activation histogram per latent (fixed bins, HIST_LOG10_EDGES);
2. quantile-sampled examples: (0, max] cut into `n_bands` equal-width bands (as SAEDashboard does), up to
   `per_band` examples drawn uniformly per band by a hash of (eval row, latent), the top-N excluded so they stay
   held out for scoring; plus `n_random` non-activating examples (the latent is 0 on the centre token), drawn
   per latent from a pool of about RANDOM_POOL eval rows;
3. the per-token activation values of the latent over each kept example's context window: only the
   (sequence, position, latent) triples inside those windows are looked up, so this pass holds
   O(d_sae x examples x window) values, never O(n_tokens).

Tables (plain parquet, `polars.read_parquet` reads them):
- latents (`features.parquet`, FEATURE_SCHEMA): one row per latent;
- examples (`examples.parquet`, EXAMPLE_SCHEMA): one row per kept example, keyed by latent_id, with kind
  `top` | `quantile` | `random`, the window's tokens and the latent's activation on each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    by_latent = latents.t().contiguous()  # topk along the contiguous dim runs about twice as fast
    values, rows = by_latent.topk(min(k + 1, len(latents)), dim=1)  # one extra row reveals a straddling tie
    if values.shape[1] > k:
        straddling = ((values[:, k] == values[:, k - 1]) & (values[:, k - 1] > 0)).nonzero().squeeze(1)
        values, rows = values[:, :k], rows[:, :k]
        if len(straddling):
            tied_values, tied_rows = by_latent[straddling].sort(dim=1, descending=True, stable=True)
            values[straddling], rows[straddling] = tied_values[:, :k], tied_rows[:, :k]
    rows, by_row = rows.sort(dim=1)
    values, by_value = values.gather(1, by_row).sort(dim=1, descending=True, stable=True)
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


KEPT_LATENTS_BYTES = 512 * 2**20
"""Eval-split latents up to this size are encoded once and kept for the later passes; above it every pass
encodes them again, so memory stays flat in n_tokens."""


class _EvalLatents:
    """The eval split's latents, chunk by chunk in store order, for the three passes of `extract_features`."""

    def __init__(self, sae: SparseAutoencoder, store: ActivationStore, device: torch.device, chunk: int) -> None:
        self.sae, self.store, self.device, self.chunk = sae, store, device, chunk
        self.keep = store.n_tokens("eval") * sae.d_sae * 4 <= KEPT_LATENTS_BYTES
        self.kept: list[tuple[Tensor, Tensor]] | None = None

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(latents [rows, d_sae] float32, locations [rows, 2]) per chunk."""
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        for acts, locations in self.store.iter_split("eval", self.chunk, with_locations=True):
            item = self._encode(acts.to(self.device)), locations.to(self.device)
            if self.keep:
                kept.append(item)
            yield item
        self.kept = kept if self.keep else None

    def selectable(self) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
        """(locations, the latents of the given rows of the chunk) per chunk: only those rows are encoded when
        the latents are not kept."""
        if self.kept is not None:
            for latents, locations in self.kept:
                yield locations, latents.__getitem__
            return
        for acts, locations in self.store.iter_split("eval", self.chunk, with_locations=True):
            acts = acts.to(self.device)
            yield locations.to(self.device), lambda rows, acts=acts: self._encode(acts[rows])

    @torch.no_grad()
    def _encode(self, acts: Tensor) -> Tensor:
        return self.sae.latents(acts).float()


def _stream_latents(latents_of: _EvalLatents, top_n: int, advance: Callable[[int], None]) -> _RunningStats:
    stats = _RunningStats.empty(latents_of.sae.d_sae, latents_of.device)
    for latents, locations in latents_of.chunks():
        stats.update(latents, locations, top_n)
        advance(len(latents))
    if stats.n_tokens == 0:
        raise ValueError(f"{latents_of.store.folder}: the eval split has no tokens; nothing to compute features on")
    return stats


def _hash_priority(rows: Tensor, latent_ids: Tensor, seed: int) -> Tensor:
    """A uniform-looking priority in [0, 1) per (global eval row, latent), float64, broadcast over the two
    index tensors (a [n, 1] column of rows and all latent ids give the dense [n, d_sae] table).

    A fixed integer hash, not a random generator, so the examples drawn do not depend on the chunk size.
    """
    x = rows.to(torch.int64) * 1_000_003 + latent_ids.to(torch.int64) * 7_919 + seed
    for _ in range(2):  # in place: on the dense table each step is a pass over chunk x d_sae int64
        x.bitwise_xor_(x >> 13).bitwise_and_(0xFFFFFFFF).mul_(0x5BD1E995).bitwise_and_(0xFFFFFFFF)
        x.bitwise_xor_(x >> 15)
    return x.double().div_(2.0**32)


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

    def merge(self, groups: slice, priority: Tensor, values: Tensor, locations: Tensor) -> None:
        """Fold a chunk's candidates of `groups` in ([d_sae, len(groups), k'] each, locations with a last dim
        of 2): a stable sort with the kept (earlier) draws first, so ties go to the earliest tokens."""
        k = self.priority.shape[2]
        merged = torch.cat([self.priority[:, groups], priority], dim=2)
        values = torch.cat([self.values[:, groups], values], dim=2)
        locations = torch.cat([self.locations[:, groups], locations], dim=2)
        merged, order = merged.sort(dim=2, descending=True, stable=True)
        order = order[..., :k]
        self.priority[:, groups] = merged[..., :k]
        self.values[:, groups] = values.gather(2, order)
        self.locations[:, groups] = locations.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, 2))


def _band_candidates(latents: Tensor, locations: Tensor, eligible: Tensor, peak: Tensor, n_bands: int, k: int,
                     offset: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's k draws of highest priority per (latent, quantile band), as [d_sae, n_bands, k] priority
    (-inf where empty), values and locations, from its eligible (firing) entries only: the bands never look at
    the zeros, so the work follows the firing count, not chunk x d_sae."""
    d_sae = latents.shape[1]
    rows, latent_ids = eligible.nonzero(as_tuple=True)
    values = latents[rows, latent_ids]
    band = (values / peak[latent_ids].clamp(min=1e-30) * n_bands).floor().clamp(0, n_bands - 1).to(torch.int64)
    priority = _hash_priority(rows + offset, latent_ids, seed)
    order = priority.argsort(descending=True, stable=True)
    group = latent_ids[order] * n_bands + band[order]
    by_group = group.argsort(stable=True)  # groups in order, each by priority, highest first
    order, group = order[by_group], group[by_group]
    counts = torch.bincount(group, minlength=d_sae * n_bands)
    rank = torch.arange(len(group), device=latents.device) - (counts.cumsum(0) - counts)[group]
    keep = rank < k
    order, group, rank = order[keep], group[keep], rank[keep]
    out_priority = torch.full((d_sae * n_bands, k), -torch.inf, dtype=torch.float64, device=latents.device)
    out_values = torch.zeros(d_sae * n_bands, k, device=latents.device)
    out_locations = torch.zeros(d_sae * n_bands, k, 2, dtype=torch.int64, device=latents.device)
    out_priority[group, rank] = priority[order]
    out_values[group, rank] = values[order]
    out_locations[group, rank] = locations.to(torch.int64)[rows[order]]
    return (out_priority.view(d_sae, n_bands, k), out_values.view(d_sae, n_bands, k),
            out_locations.view(d_sae, n_bands, k, 2))


RANDOM_POOL = 2048
"""About this many eval rows, chosen by a hash of the row, are the candidates of every latent's non-activating
draws: drawing them costs pool x d_sae hashes instead of n_tokens x d_sae (10^8 x 16k at scale). Each latent still
draws its own rows from the pool (a hash of row and latent), so two latents share about n_random^2 / pool."""

_POOL_SALT = 0x5EED
"""Keeps the pool hash independent of the per-latent priorities."""


def _random_candidates(latents: Tensor, locations: Tensor, k: int, offset: int, n_rows: int, seed: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's k draws of highest priority per latent among its pool rows where the latent is 0, [d_sae, 1, k']
    each (`n_rows`: the eval split's, which sets the share of rows in the pool)."""
    rows = torch.arange(offset, offset + len(latents), device=latents.device)
    in_pool = _hash_priority(rows, torch.zeros((), dtype=torch.int64, device=rows.device), seed ^ _POOL_SALT) \
        < RANDOM_POOL / max(n_rows, 1)
    pool = in_pool.nonzero().squeeze(1)
    priority = _hash_priority(rows[pool], torch.arange(latents.shape[1], device=latents.device).unsqueeze(1), seed)
    by_latent = latents[pool].t()  # [d_sae, pool rows]: the priority is built in this layout, so topk runs along rows
    masked = torch.where(by_latent <= 0, priority, -torch.inf)
    chunk_priority, chunk_rows = masked.topk(min(k, len(pool)), dim=1)  # [d_sae, k']
    return (chunk_priority.unsqueeze(1), by_latent.gather(1, chunk_rows).unsqueeze(1),
            locations[pool].to(torch.int64)[chunk_rows].unsqueeze(1))


def _sample_examples(latents_of: _EvalLatents, stats: _RunningStats, n_bands: int, per_band: int, n_random: int,
                     seed: int, advance: Callable[[int], None]) -> _BandSampler:
    """Pass 2: quantile-band and non-activating draws; firing tokens at or above the latent's smallest top-N
    value are excluded (they are the labelling examples; these are held out for scoring)."""
    k = max(per_band, n_random, 1)
    sampler = _BandSampler.empty(latents_of.sae.d_sae, n_bands + 1, k, latents_of.device)
    if not per_band and not n_random:
        return sampler
    peak = stats.peak.float()
    kept = stats.top_values
    top_floor = torch.where(kept > 0, kept, torch.inf).amin(dim=1) if kept.shape[1] else torch.full_like(peak,
                                                                                                         torch.inf)
    offset, n_rows = 0, stats.n_tokens
    for latents, locations in latents_of.chunks():
        if per_band:
            eligible = (latents > 0) & (latents < top_floor)
            sampler.merge(slice(0, n_bands), *_band_candidates(latents, locations, eligible, peak, n_bands, k,
                                                              offset, seed))
        if n_random:
            sampler.merge(slice(n_bands, n_bands + 1), *_random_candidates(latents, locations, k, offset, n_rows,
                                                                          seed))
        offset += len(latents)
        advance(len(latents))
    return sampler


class _ContextBuilder:
    """Token strings and marked contexts of (seq_id, position) pairs, from a seq_id -> tokens lookup."""

    def __init__(self, tokens: dict[int, list[str]], tokenizer, window: int):
        self.tokens, self.tokenizer, self.window = tokens, tokenizer, window
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


def _sequence_tokens(corpus: pl.DataFrame, seq_ids: set[int], tokenizer) -> dict[int, list[str]]:
    """seq_id -> its token strings, for the sequences that hold an example only."""
    rows = corpus.filter(pl.col("seq_id").is_in(sorted(seq_ids))).select("seq_id", "input_ids")
    return {seq: tokenizer.convert_ids_to_tokens(ids)
            for seq, ids in zip(rows["seq_id"].to_list(), rows["input_ids"].to_list(), strict=True)}


def _draws(block: int, values: Tensor, locations: Tensor, kept: Tensor) -> pl.DataFrame:
    """The kept draws of one block of examples ([d_sae, m] values and kept mask, [d_sae, m, 2] locations), each
    ranked by its place among the kept ones of its latent."""
    rank = kept.cumsum(dim=1) - 1
    latent_ids, slots = kept.nonzero(as_tuple=True)
    where = locations[latent_ids, slots].cpu().numpy()
    return pl.DataFrame({"latent_id": latent_ids.cpu().numpy(), "block": block,
                         "rank": rank[latent_ids, slots].cpu().numpy(), "seq_id": where[:, 0],
                         "position": where[:, 1], "activation": values[latent_ids, slots].double().cpu().numpy()},
                        schema={"latent_id": pl.Int64(), "block": pl.Int64(), "rank": pl.Int64(),
                                "seq_id": pl.Int64(), "position": pl.Int64(), "activation": pl.Float64()})


def _example_locations(stats: _RunningStats, sampler: _BandSampler, n_bands: int, per_band: int,
                       n_random: int) -> pl.DataFrame:
    """Every kept example's latent_id, kind, band, rank, seq_id, position and activation; per latent its top
    examples, then each quantile band's by descending activation (draw order among equals), then its random
    draws in draw order."""
    blocks = [_draws(0, stats.top_values, stats.top_locations, stats.top_values > 0)]
    drawn = sampler.priority[:, :n_bands, :per_band] > -torch.inf
    values, order = torch.where(drawn, sampler.values[:, :n_bands, :per_band], -torch.inf).sort(
        dim=2, descending=True, stable=True)
    locations = sampler.locations[:, :n_bands, :per_band].gather(2, order.unsqueeze(-1).expand(-1, -1, -1, 2))
    drawn = drawn.gather(2, order)
    blocks += [_draws(1 + band, values[:, band], locations[:, band], drawn[:, band]) for band in range(n_bands)]
    blocks.append(_draws(1 + n_bands, sampler.values[:, n_bands, :n_random], sampler.locations[:, n_bands, :n_random],
                         sampler.priority[:, n_bands, :n_random] > -torch.inf))
    block = pl.col("block")
    return pl.concat(blocks).sort("latent_id", "block", "rank").with_columns(
        kind=pl.when(block == 0).then(pl.lit("top")).when(block <= n_bands).then(pl.lit("quantile"))
        .otherwise(pl.lit("random")),
        band=pl.when((block >= 1) & (block <= n_bands)).then(block - 1).otherwise(-1)).drop("block")


def _with_windows(examples: pl.DataFrame, tokens: dict[int, list[str]], window: int) -> pl.DataFrame:
    """The examples with their window's `start`, `stop` (into the sequence), `tokens` and `center`; a location
    outside the corpus is refused (the corpus and the activation store are out of sync)."""
    sequences = pl.DataFrame({"seq_id": list(tokens), "sequence": list(tokens.values())},
                             schema={"seq_id": pl.Int64(), "sequence": pl.List(pl.String())})
    joined = examples.join(sequences, on="seq_id", how="left", maintain_order="left")
    length, position = pl.col("sequence").list.len(), pl.col("position")
    outside = joined.filter(pl.col("sequence").is_null() | (position < 0) | (position >= length))
    if len(outside):
        seq_id, where = outside.row(0)[outside.columns.index("seq_id")], outside["position"][0]
        raise ValueError(f"activation location (seq_id={seq_id}, position={where}) is not in the corpus; the "
                         "corpus and the activation store are out of sync")
    start = pl.max_horizontal(position - window, 0)
    return joined.with_columns(start=start, stop=pl.min_horizontal(length, position + window + 1)).with_columns(
        tokens=pl.col("sequence").list.slice(pl.col("start"), pl.col("stop") - pl.col("start")),
        center=position - pl.col("start")).drop("sequence")


def _window_activations(latents_of: _EvalLatents, windows: pl.DataFrame) -> pl.Series:
    """Pass 3: the latent's activation on every token of each example's window (`latent_id`, `seq_id`,
    `start`, `stop` columns), as a list column.

    Every window token becomes one entry keyed by (seq_id, position); each chunk looks its rows up in the
    sorted keys, so the work and memory are proportional to the entries, not to n_tokens.
    """
    def column(name: str) -> Tensor:
        return torch.from_numpy(windows[name].to_numpy().copy())

    device = latents_of.device
    starts, lengths = column("start"), column("stop") - column("start")
    max_pos = int(column("stop").max()) + 1
    example = torch.repeat_interleave(torch.arange(len(windows)), lengths)
    offsets = torch.arange(len(example)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    keys = column("seq_id")[example] * max_pos + starts[example] + offsets
    keys, order = keys.sort()
    example, offsets = example[order].to(device), offsets[order].to(device)
    keys = keys.to(device)
    latent_of = column("latent_id").to(device)
    out = torch.zeros(len(windows), int(lengths.max()), device=device)
    for locations, latents_at in latents_of.selectable():
        locations = locations.to(torch.int64)
        row_keys = locations[:, 0] * max_pos + locations[:, 1]
        left = torch.searchsorted(keys, row_keys)
        counts = torch.searchsorted(keys, row_keys, right=True) - left
        if not int(counts.sum()):
            continue
        rows = torch.repeat_interleave(torch.arange(len(row_keys), device=device), counts)
        entries = torch.repeat_interleave(left, counts) + torch.arange(len(rows), device=device) - \
            torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        needed = rows.unique()
        latents = latents_at(needed)
        position_in_needed = torch.searchsorted(needed, rows)
        ex = example[entries]
        out[ex, offsets[entries]] = latents[position_in_needed, latent_of[ex]]
    return _list_column(out.double(), lengths).alias("token_activations")


def _list_column(matrix: Tensor, lengths: Tensor) -> pl.Series:
    """A list column of the first `lengths[i]` values of each row of a 2-D tensor, built without Python lists."""
    frame = pl.DataFrame({"values": matrix.cpu().numpy(), "length": lengths.cpu().numpy()})
    return frame.select(pl.col("values").arr.to_list().list.head(pl.col("length")))["values"]


class FeatureTables(NamedTuple):
    """What `extract_features` returns."""

    latents: pl.DataFrame
    """One row per latent, FEATURE_SCHEMA."""
    examples: pl.DataFrame
    """One row per kept example, EXAMPLE_SCHEMA, sorted by latent_id, kind, band, rank."""


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
    latents_of = _EvalLatents(sae, store, device, chunk)
    stats = _stream_latents(latents_of, top_n, advance)
    sampler = _sample_examples(latents_of, stats, n_bands, per_band, n_random, seed, advance)
    n_top = (stats.top_values > 0).sum(dim=1).cpu()  # the positive ones lead each row (descending)
    top_locations = [row[:n] for row, n in zip(stats.top_locations.cpu().tolist(), n_top.tolist(), strict=True)]
    drawn = _example_locations(stats, sampler, n_bands, per_band, n_random)
    tokens = _sequence_tokens(corpus, set(drawn["seq_id"].unique().to_list()), tokenizer)
    contexts = _ContextBuilder(tokens, tokenizer, window)
    examples = _with_windows(drawn, tokens, window)
    examples = examples.with_columns(_window_activations(latents_of, examples)) if len(examples) \
        else examples.with_columns(token_activations=pl.lit([], dtype=pl.List(pl.Float64())))
    examples = examples.select(list(EXAMPLE_SCHEMA)).cast(EXAMPLE_SCHEMA)
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
        "top_activations": _list_column(stats.top_values.double(), n_top),
        "top_tokens": [[contexts.token(seq, pos) for seq, pos in row] for row in top_locations],
        "top_contexts": [[contexts.context(seq, pos) for seq, pos in row] for row in top_locations],
        "top_seq_ids": _list_column(stats.top_locations[..., 0], n_top),
        "top_positions": _list_column(stats.top_locations[..., 1], n_top),
        "hist_counts": _list_column(stats.hist, torch.full((sae.d_sae,), stats.hist.shape[1])),
        "vocab_kind": [kind] * sae.d_sae,
        **projected,
    }, schema=FEATURE_SCHEMA)
    return FeatureTables(latents, examples)


def example_rows(examples: pl.DataFrame) -> Iterator[dict]:
    """The rows of (a selection of) an examples table as dicts, in order. The `tokens` and `token_activations`
    lists are read flat and sliced, several times faster than `iter_rows` on a table of many windows."""
    lists = [name for name in ("tokens", "token_activations") if name in examples.columns]
    lengths = examples[lists[0]].list.len().to_list() if lists else [0] * len(examples)
    flat = {name: examples[name].explode(empty_as_null=False).to_list() for name in lists}
    scalars = examples.drop(lists).to_dict(as_series=False)
    start = 0
    for index, length in enumerate(lengths):
        row = {name: column[index] for name, column in scalars.items()}
        row.update({name: values[start:start + length] for name, values in flat.items()})
        start += length
        yield row


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
