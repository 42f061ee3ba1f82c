"""Real-task evaluations of an SAE (DESIGN.md section 10), offline: the task activations at the SAE's hook, built
once per activation store, and an SAE's figures on them (`TaskMetrics`).

The tasks, all read at the store's hook of the store's model:
- **first letter**: single-token lowercase alphabetic words of the model's vocabulary, WORDS_PER_LETTER per
  letter (seeded), each read at the word in WORD_TEMPLATE. They feed first-letter absorption (`absorption`) and
  26 one-vs-rest probing tasks.
- **package**: the corpus's documents by origin (the standard-library package of the embedded corpus), the
  PACKAGES most frequent origins one-vs-rest, each document mean-pooled over its non-special tokens.
- **doctest**: the tokens of DOCTEST_DOCSTRINGS standard-library docstrings that hold doctests (the embedded
  source's raw docstrings, which the corpus's prose filter leaves out; whatever the configured corpus), labelled
  by whether the token is on a `>>>` line.
k-sparse probing (`probing`) runs on every one of them; a task the model or corpus cannot give (one origin only,
a tokenizer without character offsets) is left out and said so.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from torch import Tensor, nn

from sae_pipeline.absorption import AbsorptionResult, LetterProbes, first_letter_absorption, fit_letter_probes
from sae_pipeline.config import ActivationSpec
from sae_pipeline.corpus import stdlib_docstring_sources
from sae_pipeline.evaluation import TaskMetrics
from sae_pipeline.model import HookPoint, load_model, load_tokenizer, pad_batch
from sae_pipeline.probing import (
    PROBE_KS,
    BinaryTask,
    LogisticProbe,
    ProbingResult,
    dense_probing,
    family_means,
    sparse_probing,
)
from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.store import save_atomic

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TASK_FAMILIES = ("first_letter", "package", "doctest")
"""The probing task families (SAEBench's datasets): an SAE's score is their mean, each its tasks' mean."""
WORDS_PER_LETTER = 160
"""Vocabulary words sampled per first letter (fewer where the vocabulary has fewer)."""
WORD_TEMPLATE = "Next word:{word} has the first letter:"
"""The prompt a word is read in, at the word's own token (SAEBench's absorption template after a short prefix, so
that in a causal LM the word is not the first token, whose activations are atypical); the word is put in with a
leading space, as a word inside a sentence is tokenised."""
PACKAGES = 5
"""The most frequent corpus origins probed one-vs-rest."""
TEXTS_PER_PACKAGE = 40
DOCTEST_DOCSTRINGS = 48
"""Standard-library docstrings with doctests whose tokens make the doctest task."""
DOCTEST_PROMPT = ">>>"
CONTEXT = 128
"""Tokens of a doctest docstring read (the rest is cut)."""
TASK_SEED = 0
BATCH = 32
TASKS_FILE = "eval_tasks.safetensors"
"""The task activations, cached in the store's folder (a re-extraction replaces the folder and so the cache)."""
TASKS_VERSION = "3"
"""Bumped when what the tasks hold changes: a cache written under another version is rebuilt."""


@dataclass
class TaskData:
    """The activations of every task at one hook."""

    words: list[str]
    word_x: Tensor
    """[n_words, d_model] at each word's token."""
    word_letter: Tensor
    """[n_words] index of the word's first letter in ALPHABET."""
    packages: list[str] = field(default_factory=list)
    package_x: Tensor = field(default_factory=lambda: torch.empty(0))
    """[n_docs, d_model] mean-pooled document activations."""
    package_label: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    """[n_docs] index into `packages`."""
    doctest_x: Tensor = field(default_factory=lambda: torch.empty(0))
    """[n_tokens, d_model] doctest docstrings' token activations."""
    doctest_y: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    """[n_tokens] whether the token is on a `>>>` line."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Task -> why it could not be built."""
    ceiling: dict[str, float] | None = None
    """The dense probe's accuracy per probing task at TASK_SEED, stored with the data (None: not computed)."""
    letter_probes: LetterProbes | None = None
    """The word split and letter probes of absorption at TASK_SEED, stored with the data (None: not computed)."""

    def binary_tasks(self) -> list[BinaryTask]:
        """Every probing task: first_letter_<c> per letter, package_<name> per package, doctest."""
        tasks = [BinaryTask(f"first_letter_{c}", self.word_x, self.word_letter == i, "first_letter")
                 for i, c in enumerate(ALPHABET) if bool((self.word_letter == i).any())]
        tasks += [BinaryTask(f"package_{name}", self.package_x, self.package_label == i, "package")
                  for i, name in enumerate(self.packages)]
        if len(self.doctest_y):
            tasks.append(BinaryTask("doctest", self.doctest_x, self.doctest_y, "doctest"))
        return tasks

    def save(self, path: Path) -> None:
        tensors = {"word_x": self.word_x, "word_letter": self.word_letter, "package_x": self.package_x,
                   "package_label": self.package_label, "doctest_x": self.doctest_x,
                   "doctest_y": self.doctest_y.to(torch.uint8)}
        probes = self.letter_probes
        if probes is not None:
            fitted = list(probes.probes.values())
            tensors |= {"letter_train": probes.train, "letter_test": probes.test,
                        **{f"probe_{part}": torch.stack([getattr(p, part) for p in fitted])
                           for part in ("mean", "std", "weight")},
                        "probe_bias": torch.stack([p.bias for p in fitted])}
        lists = {"words": self.words, "packages": self.packages, "left_out": self.left_out, "ceiling": self.ceiling,
                 "probe_letters": list(probes.probes) if probes is not None else None}
        save_atomic({name: t.contiguous() for name, t in tensors.items()}, path,
                    {"version": TASKS_VERSION, "lists": json.dumps(lists)})

    @classmethod
    def load(cls, path: Path) -> TaskData:
        with safe_open(str(path), framework="pt") as handle:
            lists = json.loads(handle.metadata()["lists"])
            t = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        data = cls(lists["words"], t["word_x"], t["word_letter"], lists["packages"], t["package_x"],
                   t["package_label"], t["doctest_x"], t["doctest_y"].bool(), lists["left_out"], lists["ceiling"])
        if lists["probe_letters"] is not None:
            probes = {letter: LogisticProbe(t["probe_mean"][i], t["probe_std"][i], t["probe_weight"][i],
                                            t["probe_bias"][i]) for i, letter in enumerate(lists["probe_letters"])}
            data.letter_probes = LetterProbes(data.word_x, data.word_letter, t["letter_train"], t["letter_test"],
                                              probes, ALPHABET)
        return data


def vocabulary_words(tokenizer, per_letter: int = WORDS_PER_LETTER, seed: int = TASK_SEED
                     ) -> list[tuple[int, str]]:
    """(token id, its text) of single-token words: lowercase ASCII letters only, at least 2 of them, that the
    tokenizer encodes back to that one token; per_letter per first letter (seeded), in id order."""
    by_letter: dict[str, list[tuple[int, str]]] = {}
    for token_id in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([token_id])
        word = text.strip()
        if len(word) < 2 or not (word.isascii() and word.isalpha() and word.islower()):
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [token_id]:
            continue
        by_letter.setdefault(word[0], []).append((token_id, text))
    rng = random.Random(seed)
    chosen = [pair for letter in sorted(by_letter)
              for pair in rng.sample(by_letter[letter], min(per_letter, len(by_letter[letter])))]
    return sorted(chosen)


def _batches(items: list, size: int = BATCH) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def word_prompt(tokenizer, token_id: int, text: str) -> tuple[list[int], int] | None:
    """(the token ids of WORD_TEMPLATE around the word, the word's position: its first occurrence after the
    template's prefix), or None when the template's tokenisation does not keep the word's token (a BPE token
    without its leading-space form, say)."""
    ids = tokenizer(WORD_TEMPLATE.format(word=" " + text.lstrip()))["input_ids"]
    prefix = tokenizer(WORD_TEMPLATE.split("{word}")[0])["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(ids, prefix, strict=False)) if a != b), len(prefix))
    return (ids, ids.index(token_id, start)) if token_id in ids[start:] else None


def word_activations(model: nn.Module, tokenizer, hook: HookPoint, words: list[tuple[int, str]]
                     ) -> tuple[list[str], Tensor]:
    """Each word's activation at its token in WORD_TEMPLATE (`word_prompt`); a word it drops is left out."""
    kept, rows = [], []
    prompts = [(text, prompt) for token_id, text in words if (prompt := word_prompt(tokenizer, token_id, text))]
    for batch in _batches(prompts):
        input_ids, mask = pad_batch([ids for _, (ids, _) in batch], tokenizer.pad_token_id or 0)
        acts = hook.capture(model, input_ids, mask)
        for row, (text, (_, position)) in enumerate(batch):
            rows.append(acts[row, position])
            kept.append(text.strip())
    return kept, torch.stack(rows) if rows else torch.empty(0)


def pooled_activations(model: nn.Module, hook: HookPoint, sequences: list[list[int]], special: set[int]
                       ) -> Tensor:
    """[n, d_model]: each token sequence's mean activation over its non-special tokens."""
    pooled = []
    for batch in _batches(sequences):
        input_ids, mask = pad_batch(batch, 0)
        acts = hook.capture(model, input_ids, mask)
        keep = mask.bool() & ~torch.isin(input_ids, torch.tensor(sorted(special), dtype=torch.long))
        weights = keep.unsqueeze(-1).float()
        pooled.append((acts * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))
    return torch.cat(pooled)


def package_documents(corpus: pl.DataFrame, n_packages: int = PACKAGES, per_package: int = TEXTS_PER_PACKAGE,
                      seed: int = TASK_SEED) -> tuple[list[str], list[list[int]], list[int]] | str:
    """(the most frequent origins, token ids of per_package documents of each (seeded), their origin index), or
    why there are none (no origin column, fewer than two origins)."""
    if "origin" not in corpus.columns:
        return "the corpus has no origin column (written before origins were kept): rematerialise corpus"
    counts = Counter(corpus["origin"].to_list())
    frequent = sorted(counts, key=lambda name: (-counts[name], name))[:n_packages]
    if len(frequent) < 2:
        return f"the corpus has {len(counts)} origin(s); one-vs-rest needs two or more"
    rng = random.Random(seed)
    sequences, labels = [], []
    for index, name in enumerate(frequent):
        ids = corpus.filter(pl.col("origin") == name)["input_ids"].to_list()
        for chosen in rng.sample(ids, min(per_package, len(ids))):
            sequences.append(list(chosen))
            labels.append(index)
    return frequent, sequences, labels


@cache
def doctest_docstrings(n: int = DOCTEST_DOCSTRINGS) -> tuple[str, ...]:
    """The first n docstrings, in the sorted order of the public standard-library modules, that hold both prose
    and at least one `>>>` line (read once per process; the walk stops once n are found)."""
    found = []
    for doc in stdlib_docstring_sources(public_only=True):
        lines = doc.text.splitlines()
        if (any(line.lstrip().startswith(DOCTEST_PROMPT) for line in lines)
                and any(line.strip() and not line.lstrip().startswith((DOCTEST_PROMPT, "...")) for line in lines)):
            found.append(doc.text)
            if len(found) == n:
                break
    return tuple(found)


def doctest_line_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the lines of `text` that start (after indentation) with `>>>`."""
    spans, start = [], 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(DOCTEST_PROMPT):
            spans.append((start, start + len(line)))
        start += len(line)
    return spans


def doctest_tokens(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[bool]], list[list[bool]]]:
    """Per text: its token ids (CONTEXT at most), whether each token is on a `>>>` line, whether it is a real
    (non-special) token; by the fast tokenizer's character offsets."""
    ids_list, labels, real = [], [], []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=CONTEXT, return_offsets_mapping=True,
                            return_special_tokens_mask=True)
        spans = doctest_line_spans(text)
        ids_list.append(encoded["input_ids"])
        labels.append([any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]])
        real.append([not special for special in encoded["special_tokens_mask"]])
    return ids_list, labels, real


def doctest_activations(model: nn.Module, tokenizer, hook: HookPoint) -> tuple[Tensor, Tensor] | str:
    """(token activations, on-a-`>>>`-line labels) of the doctest docstrings, or why there are none."""
    if not getattr(tokenizer, "is_fast", False):
        return "the tokenizer gives no character offsets (not a fast tokenizer)"
    ids_list, labels, real = doctest_tokens(tokenizer, list(doctest_docstrings()))
    if not ids_list:
        return "no standard-library docstring with doctests was found"
    xs, ys = [], []
    for start in range(0, len(ids_list), BATCH):
        input_ids, mask = pad_batch(ids_list[start:start + BATCH], tokenizer.pad_token_id or 0)
        acts = hook.capture(model, input_ids, mask)
        for row in range(len(input_ids)):
            keep = torch.tensor(real[start + row])
            xs.append(acts[row, : len(keep)][keep])
            ys.append(torch.tensor(labels[start + row])[keep])
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def build_task_data(model: nn.Module, tokenizer, hook: HookPoint, corpus: pl.DataFrame) -> TaskData:
    """Every task's activations at `hook` (module docstring)."""
    words, word_x = word_activations(model, tokenizer, hook, vocabulary_words(tokenizer))
    data = TaskData(words, word_x, torch.tensor([ALPHABET.index(w[0]) for w in words], dtype=torch.long))
    packages = package_documents(corpus)
    if isinstance(packages, str):
        data.left_out["package"] = packages
    else:
        data.packages, sequences, labels = packages
        data.package_x = pooled_activations(model, hook, sequences, set(tokenizer.all_special_ids))
        data.package_label = torch.tensor(labels, dtype=torch.long)
    doctests = doctest_activations(model, tokenizer, hook)
    if isinstance(doctests, str):
        data.left_out["doctest"] = doctests
    else:
        data.doctest_x, data.doctest_y = doctests
    return data


def cached_version(path: Path) -> str | None:
    """The TASKS_VERSION a cached task file was written under; None when there is none."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("version")


def store_task_data(folder: Path, meta: dict, corpus: pl.DataFrame, spec: ActivationSpec,
                    device: str = "cpu") -> TaskData:
    """The task data of an activation store (its model and hook): read from TASKS_FILE in its folder when it was
    written under this TASKS_VERSION, or built (the model loaded once, run on `device`) and written there."""
    path = Path(folder) / TASKS_FILE
    if cached_version(path) == TASKS_VERSION:
        return TaskData.load(path)
    model = load_model(spec).to(device)
    data = build_task_data(model, load_tokenizer(spec), HookPoint.of_store(meta), corpus)
    evaluator = TaskEvaluator(data)  # the SAE-independent baselines, stored with the data: computed once
    data.ceiling, data.letter_probes = evaluator.ceiling, evaluator.letter_probes
    data.save(path)
    return data


@dataclass(frozen=True)
class TaskEvaluation:
    """TaskMetrics with what they were computed from: each letter's absorption and each task's accuracies."""

    metrics: TaskMetrics
    absorption: AbsorptionResult
    by_task: dict[str, dict[str, dict[int, float] | float | str]]
    """Task -> {"family": its family, "sae": k -> accuracy, "random": k -> accuracy, "dense": accuracy}."""
    left_out: dict[str, str]

    def details(self) -> dict:
        return {"absorption": self.absorption.as_dict(), "probing": self.by_task, "left_out": self.left_out}


def random_like(sae: SparseAutoencoder, seed: int) -> SparseAutoencoder:
    """A freshly initialised SAE of `sae`'s architecture, shape and settings (the probing floor)."""
    cls = type(sae)
    fresh = cls(sae.d_in, sae.d_sae, sae.normalize, **cls.cfg_kwargs(sae.saelens_cfg({})))
    fresh.initialize(torch.Generator().manual_seed(seed))
    return fresh.eval()


class TaskEvaluator:
    """Evaluates SAEs on one hook's task data; what does not depend on the trained weights (the letter probes,
    the dense ceiling, the random-init floor of each architecture and shape) is computed once and reused."""

    def __init__(self, data: TaskData, seed: int = TASK_SEED):
        self.data, self.seed = data, seed
        self.tasks = data.binary_tasks()
        self._floors: dict[str, ProbingResult] = {}
        stored = seed == TASK_SEED  # the data's stored baselines were computed at TASK_SEED
        self._ceiling = data.ceiling if stored else None
        self._letter_probes = data.letter_probes if stored else None

    @property
    def ceiling(self) -> dict[str, float]:
        if self._ceiling is None:
            self._ceiling = dense_probing(self.tasks, self.seed)
        return self._ceiling

    @property
    def letter_probes(self) -> LetterProbes:
        if self._letter_probes is None:
            self._letter_probes = fit_letter_probes(self.data.word_x, self.data.word_letter, ALPHABET, self.seed)
        return self._letter_probes

    def floor(self, sae: SparseAutoencoder) -> ProbingResult:
        """k-sparse probing of a random-init SAE like `sae` (one per architecture, shape and settings)."""
        shape = json.dumps([type(sae).__name__, sae.d_in, sae.d_sae, sae.normalize, sae.extra_cfg()],
                           sort_keys=True, default=str)
        if shape not in self._floors:
            self._floors[shape] = sparse_probing(self.tasks, random_like(sae, self.seed).latents, self.seed)
        return self._floors[shape]

    @torch.no_grad()
    def evaluate(self, sae: SparseAutoencoder) -> TaskEvaluation:
        """Absorption and k-sparse probing of `sae` (on the CPU)."""
        sae = sae.cpu().eval()
        trained, floor, ceiling = sparse_probing(self.tasks, sae.latents, self.seed), self.floor(sae), self.ceiling
        absorption = first_letter_absorption(sae, self.letter_probes)
        dense = family_means(ceiling, trained.families)
        at_five = trained.family_means(5)
        nan = float("nan")
        values = {"absorption_rate": absorption.absorption_rate,
                  "absorption_fraction": absorption.absorption_fraction,
                  "split_latents": absorption.split_latents,
                  **{f"probe_acc_k{k}": trained.mean(k) for k in PROBE_KS},
                  **{f"probe_acc_k5_{family}": at_five.get(family, nan) for family in TASK_FAMILIES},
                  "probe_acc_dense": sum(dense.values()) / len(dense) if dense else nan,
                  **{f"probe_acc_dense_{family}": dense.get(family, nan) for family in TASK_FAMILIES},
                  **{f"probe_acc_random_k{k}": floor.mean(k) for k in PROBE_KS}}
        by_task = {name: {"family": trained.families[name], "sae": trained.by_task[name],
                          "random": floor.by_task[name], "dense": ceiling[name]} for name in trained.by_task}
        return TaskEvaluation(TaskMetrics(**values), absorption, by_task, self.data.left_out)
