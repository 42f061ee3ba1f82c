"""Do two SAEs learn the same dictionary? Hungarian-matched decoder cosines, between seeds of one config.

Two SAEs trained from different seeds on the same data may learn the same features in any order. Their
dictionaries are compared after the one-to-one matching of decoder rows that maximises the summed cosine
(`scipy.optimize.linear_sum_assignment`, the Hungarian method); the sweep report lists, per group of configs
identical except for `seed`, the mean matched cosine and the share of latents matched above `MATCH_THRESHOLD`
(the comparison of Paulo & Belrose 2025, "SAEs trained on the same data don't learn the same features").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sae_pipeline.config import SAEConfig
from sae_pipeline.markdown import markdown_table
from sae_pipeline.saes import load_sae

MATCH_THRESHOLD = 0.7
"""A matched pair of decoder rows with a cosine above this counts as the same latent."""
SEED_GROUP = "seed_group"
"""Column of the sweep runs: the config's key with its seed set to 0 (`seed_group`); equal for seed siblings."""
SAE_DIR = "sae_dir"
"""Column of the sweep runs: local folder of the saved SAE, set for members of multi-seed groups only."""


def unit_rows(matrix: Tensor) -> Tensor:
    """Rows scaled to unit norm in float64 (a zero row stays zero)."""
    rows = matrix.detach().double()
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[len(a), len(b)] cosines between the rows of `a` and the rows of `b`."""
    return unit_rows(a) @ unit_rows(b).t()


def max_matching(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """(row indices, column indices) of the one-to-one matching with the largest summed similarity; it pairs
    min(rows, columns) of them, rows in increasing order."""
    rows, cols = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))


@dataclass(frozen=True)
class DecoderMatch:
    """How well two dictionaries agree after matching their rows one to one."""

    mean_cosine: float
    """Mean cosine over the matched pairs of decoder rows."""
    share_above: float
    """Share of the matched pairs whose cosine is above the threshold."""
    n_matched: int
    """Pairs matched: min of the two dictionary sizes."""


def decoder_match(decoder_a: Tensor, decoder_b: Tensor, threshold: float = MATCH_THRESHOLD) -> DecoderMatch:
    """Hungarian-matched cosine between the rows ([d_sae, d_in]) of two decoders."""
    if decoder_a.ndim != 2 or decoder_b.ndim != 2 or decoder_a.shape[1] != decoder_b.shape[1]:
        raise ValueError(f"decoders: shapes {tuple(decoder_a.shape)} and {tuple(decoder_b.shape)} must be "
                         "[d_sae, d_in] with the same d_in")
    similarity = cosine_matrix(decoder_a, decoder_b)
    rows, cols = max_matching(similarity)
    matched = similarity[rows, cols]
    return DecoderMatch(matched.mean().item(), (matched > threshold).double().mean().item(), len(rows))


def seed_group(cfg: SAEConfig) -> str:
    """Name shared by configs identical except for `seed`: the partition key of the config at seed 0."""
    return cfg.model_copy(update={"seed": 0}).partition_key()


def seed_consistency(runs: pl.DataFrame, threshold: float = MATCH_THRESHOLD) -> pl.DataFrame:
    """One row per group of runs with two or more seeds: the seeds, and over every pair of seeds the mean of the
    matched cosine and of the share matched above `threshold` (and the lowest matched cosine of a pair).

    `runs` needs `key`, `seed`, SEED_GROUP and SAE_DIR columns (`results.collect_runs` writes them); runs without
    an SAE_DIR are left out.
    """
    schema = {"group": pl.String(), "seeds": pl.List(pl.Int64()), "n_pairs": pl.Int64(),
              "mean_matched_cosine": pl.Float64(), "min_pair_cosine": pl.Float64(),
              f"share_above_{threshold}": pl.Float64()}
    if runs.height == 0 or not {SEED_GROUP, SAE_DIR, "seed"} <= set(runs.columns):
        return pl.DataFrame(schema=schema)
    rows = []
    members = runs.filter(pl.col(SAE_DIR).is_not_null()).sort(SEED_GROUP, "seed")
    for (group,), frame in members.group_by(SEED_GROUP, maintain_order=True):
        if frame.height < 2:
            continue
        decoders = [load_sae(Path(folder)).W_dec.detach() for folder in frame.get_column(SAE_DIR)]
        matches = [decoder_match(a, b, threshold) for a, b in itertools.combinations(decoders, 2)]
        rows.append({"group": group, "seeds": frame.get_column("seed").to_list(), "n_pairs": len(matches),
                     "mean_matched_cosine": float(np.mean([m.mean_cosine for m in matches])),
                     "min_pair_cosine": min(m.mean_cosine for m in matches),
                     f"share_above_{threshold}": float(np.mean([m.share_above for m in matches]))})
    return pl.DataFrame(rows, schema=schema, orient="row")


def consistency_by_group(table: pl.DataFrame) -> dict[str, dict]:
    """`seed_consistency`'s rows keyed by group (the `sweep_analysis` metadata entry)."""
    return {row.pop("group"): row for row in table.iter_rows(named=True)}


def seed_consistency_section(table: pl.DataFrame) -> str:
    """The sweep report's markdown section on cross-seed consistency, from `seed_consistency`'s table ("" when
    no config has two seeds)."""
    if table.height == 0:
        return ""
    return "\n".join([
        "", "## Cross-seed consistency", "",
        "Groups of configs identical except for `seed` (named by the key of the config at seed 0). For each pair "
        "of seeds, the decoder rows are matched one to one maximising the summed cosine (Hungarian method); "
        "mean_matched_cosine is the mean cosine of the matched pairs averaged over the pairs of seeds, "
        f"share_above_{MATCH_THRESHOLD} the share of latents whose matched cosine is above {MATCH_THRESHOLD}.", "",
        markdown_table(table.with_columns(pl.col("group").map_elements(lambda g: f"`{g}`",
                                                                       return_dtype=pl.String))),
    ]) + "\n"
