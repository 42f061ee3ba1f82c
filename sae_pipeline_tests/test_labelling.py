"""Labels from a hand-built features table: planted latents, normalisation, the live-only rule (seed 003)."""

from __future__ import annotations

import os

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from sae_pipeline.features import FEATURE_SCHEMA, LIVE_THRESHOLD
from sae_pipeline.labelling import (
    LABEL_SCHEMA,
    OfflineLabeller,
    label_features,
    labels_markdown,
    normalise_token,
    write_labels,
)

PLANTED, MIXED, DEAD, NEAR_ZERO, WEAK = 0, 1, 2, 3, 4


def feature_row(latent_id: int, tokens: list[str], activations: list[float], frequency: float) -> dict:
    """One features-table row; max and is_live follow from the activations as compute_features sets them."""
    peak = max(activations, default=0.0)
    return {
        "latent_id": latent_id, "frequency": frequency,
        "mean_activation": sum(activations) / len(activations) if activations else 0.0,
        "max_activation": peak, "is_live": peak >= LIVE_THRESHOLD,
        "top_activations": activations, "top_tokens": tokens,
        "top_contexts": [f"x [[{token}]] y" for token in tokens],
        "top_seq_ids": list(range(len(tokens))), "top_positions": [1] * len(tokens),
    }


@pytest.fixture
def features() -> pl.DataFrame:
    return pl.DataFrame([
        feature_row(PLANTED, ["import"] * 3, [1.7, 1.24, 1.2], 0.25),
        # 'import' in three spellings carries 6 of 10 units; 's' (from '##s') and 'from' 2 each
        feature_row(MIXED, ["Ġimport", "import", "##s", "IMPORT", "from"], [3.0, 2.0, 2.0, 1.0, 2.0], 0.4),
        feature_row(DEAD, [], [], 0.0),
        feature_row(NEAR_ZERO, ["the", "a", "the"], [1e-16, 1e-16, 1e-16], 1.0),
        feature_row(WEAK, ["of", "|pipe|"], [0.05, 0.04], 0.1),
    ], schema=FEATURE_SCHEMA)


class SpyLabeller:
    name = "spy"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def label(self, row: dict) -> str:
        self.seen.append(row["latent_id"])
        return f"latent {row['latent_id']}"


def test_planted_single_token_latent_is_named_with_full_share(features):
    labels = label_features(features)
    row = labels.filter(pl.col("latent_id") == PLANTED).row(0, named=True)
    assert row["label"] == "'import' (100% of top activation)"
    assert (row["top_token"], row["top_token_share"]) == ("import", 1.0)
    assert row["labeller"] == OfflineLabeller.name == "offline-top-tokens"
    assert (row["max_activation"], row["frequency"]) == (1.7, 0.25)


def test_tokens_are_grouped_after_normalisation(features):
    row = label_features(features).filter(pl.col("latent_id") == MIXED).row(0, named=True)
    assert row["top_token"] == "import"
    assert row["top_token_share"] == pytest.approx(0.6)
    assert row["label"] == "'import' (60% of top activation), also 'from', 's'"


def test_normalise_token_strips_subword_markers():
    assert [normalise_token(t) for t in ["##ing", "ĠThe", "▁Word", "CAT", "Ġ", "##"]] == [
        "ing", "the", "word", "cat", "Ġ", "##"]


def test_dead_and_near_zero_latents_are_never_labelled(features):
    labels = label_features(features)
    assert labels["latent_id"].to_list() == [PLANTED, MIXED, WEAK]
    spy = SpyLabeller()
    spied = label_features(features, spy, live_threshold=0.0)  # a lower threshold cannot let them through
    assert spy.seen == [PLANTED, MIXED, WEAK]
    assert DEAD not in spied["latent_id"].to_list() and NEAR_ZERO not in spied["latent_id"].to_list()
    assert spied["label"].to_list() == ["latent 0", "latent 1", "latent 4"]
    assert set(spied["labeller"].to_list()) == {"spy"}


def test_live_threshold_filters_before_the_labeller(features):
    spy = SpyLabeller()
    labels = label_features(features, spy, live_threshold=0.1)
    assert spy.seen == [PLANTED, MIXED] == labels["latent_id"].to_list()


def test_no_live_latents_gives_an_empty_table_with_the_schema(features):
    labels = label_features(features.filter(~pl.col("is_live")))
    assert labels.is_empty() and dict(labels.schema) == LABEL_SCHEMA


def test_label_schema_and_parquet_round_trip(features, tmp_path):
    labels = label_features(features)
    assert dict(labels.schema) == LABEL_SCHEMA
    path = tmp_path / "labels.parquet"
    write_labels(labels, path)
    assert_frame_equal(pl.read_parquet(path), labels)
    assert os.listdir(tmp_path) == ["labels.parquet"]


def test_labels_markdown_orders_by_share_and_escapes_pipes(features):
    text = labels_markdown(label_features(features), n=10)
    rows = text.strip().splitlines()[2:]
    assert [int(line.split("|")[1]) for line in rows] == [PLANTED, MIXED, WEAK]
    assert "\\|pipe\\|" in text
    assert len(labels_markdown(label_features(features), n=1).strip().splitlines()) == 3


def test_offline_labeller_on_a_row_without_examples():
    assert OfflineLabeller().label({"top_tokens": [], "top_activations": []}) == "(no activating examples)"


def test_labelling_reports_the_latents_done_of_the_live_ones(features, monkeypatch) -> None:
    from sae_pipeline import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)  # a line before every latent
    lines: list[str] = []
    labels = label_features(features, progress=lines.append)
    n = labels.height
    assert n >= 2 and [line.split(" latents")[0] for line in lines] == [f"labelling {i} / {n}" for i in range(n)]
