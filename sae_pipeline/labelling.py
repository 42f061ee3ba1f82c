"""Short human-readable labels for live latents, from their top activating tokens.

Only live latents are labelled (is_live and max_activation >= the threshold): a latent that never fires, or
fires only at 1e-16, has no meaningful top examples, and labelling it would invent a meaning for noise
(seed 003). The default labeller needs no network; another (an LLM, say) plugs in through `Labeller`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Protocol

import polars as pl

from sae_pipeline.features import LIVE_THRESHOLD
from sae_pipeline.markdown import format_cell
from sae_pipeline.storage import write_parquet_atomic

_SUBWORD_MARKERS = ("##", "Ġ", "▁")  # WordPiece continuation, byte-level BPE space, SentencePiece space

LABEL_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "label": pl.String(),
    "labeller": pl.String(),  # the labeller's name
    "top_token": pl.String(),  # normalised token with the largest share of the top activation mass
    "top_token_share": pl.Float64(),  # that share, in (0, 1]
    "max_activation": pl.Float64(),
    "frequency": pl.Float64(),
}


class Labeller(Protocol):
    name: str

    def label(self, row: dict) -> str:
        """A label for one row of the features table (as a dict)."""
        ...


def normalise_token(token: str) -> str:
    """Grouping key of a token string: subword markers stripped, lowercased; a bare marker stays as is."""
    key = token
    for marker in _SUBWORD_MARKERS:
        key = key.removeprefix(marker)
    return key.strip().lower() or token


def token_shares(row: dict) -> list[tuple[str, float]]:
    """(normalised token, share of the summed top activations), largest share first, ties by token."""
    mass: dict[str, float] = defaultdict(float)
    for token, value in zip(row["top_tokens"], row["top_activations"], strict=True):
        mass[normalise_token(token)] += value
    total = sum(mass.values())
    if total <= 0:
        return []
    shares = [(token, value / total) for token, value in mass.items()]
    return sorted(shares, key=lambda item: (-item[1], item[0]))


class OfflineLabeller:
    """Names the tokens that carry most of the latent's activation mass among its top examples."""

    name = "offline-top-tokens"

    def __init__(self, n_also: int = 2):
        self.n_also = n_also

    def label(self, row: dict) -> str:
        shares = token_shares(row)
        if not shares:
            return "(no activating examples)"
        (token, share), others = shares[0], shares[1:1 + self.n_also]
        text = f"'{token}' ({share:.0%} of top activation)"
        if others:
            text += ", also " + ", ".join(f"'{other}'" for other, _ in others)
        return text


def label_features(features: pl.DataFrame, labeller: Labeller | None = None,
                   live_threshold: float = LIVE_THRESHOLD) -> pl.DataFrame:
    """Labels for live latents only (is_live and max_activation >= live_threshold); LABEL_SCHEMA columns.

    Never-firing and near-zero latents are filtered out before the labeller sees any row, so lowering
    `live_threshold` below the features table's own LIVE_THRESHOLD cannot let them through either.
    """
    labeller = labeller or OfflineLabeller()
    live = features.filter(pl.col("is_live") & (pl.col("max_activation") >= live_threshold))
    rows = []
    for row in live.iter_rows(named=True):
        top_token, share = (token_shares(row) or [("", 0.0)])[0]
        rows.append({"latent_id": row["latent_id"], "label": labeller.label(row), "labeller": labeller.name,
                     "top_token": top_token, "top_token_share": share,
                     "max_activation": row["max_activation"], "frequency": row["frequency"]})
    return pl.DataFrame(rows, schema=LABEL_SCHEMA)


def write_labels(labels: pl.DataFrame, path: Path) -> None:
    write_parquet_atomic(labels, path)


def labels_markdown(labels: pl.DataFrame, n: int = 10) -> str:
    """Markdown table of the n best-labelled latents: highest top_token_share, then highest max activation."""
    best = labels.sort(["top_token_share", "max_activation"], descending=True).head(n)
    lines = ["| latent | label | top token share | max activation |", "|---:|---|---:|---:|"]
    for row in best.iter_rows(named=True):
        lines.append(f"| {row['latent_id']} | {format_cell(row['label'])} | {row['top_token_share']:.0%} "
                     f"| {row['max_activation']:.4g} |")
    return "\n".join(lines) + "\n"
