"""Explanation scoring, delphi-style detection and fuzzing: does a label alone predict where the latent fires?

Detection. For each labelled latent the held-out contexts are its `quantile` examples (firing, never shown to
the labeller, which sees only the `top` ones) and its `random` examples whose window does not fire at all. Both
sets are cropped to `window` tokens each side of the centre and balanced (as many non-activating as activating,
so chance accuracy is 0.5). A scorer sees the label and the plain text of each context, without activations,
and predicts which activate; accuracy, precision, recall and F1 against the truth are the latent's score.

Fuzzing (delphi's second scorer: it tests *which tokens* a label picks out, not only which contexts). The
held-out activating contexts, cropped the same way, alternate between correctly highlighted (the tokens where
the latent fires are marked) and falsely highlighted (as many tokens marked, chosen at random, seeded by the
latent id, among those where it does not fire; a context without enough such tokens is skipped); the two kinds
are balanced, so chance is 0.5 again. A scorer sees the label and each context with its marks and says whether
the marks are correct; the fuzzing_* columns score those answers as detection_* score detection's.

- `OfflineScorer`: detection predicts a context activating when one of the label's quoted terms (or, without
  quotes, its words) is one of the context's normalised tokens; fuzzing calls the marks correct when one of the
  marked tokens is such a term: the same token-match rule applied to the marked tokens instead of the whole
  context. It pairs with the offline labeller.
- `LLMScorer`: the same questions to an OpenAI-compatible chat endpoint (delphi's detection and fuzzing prompts).
A latent whose label predicts nothing scores near 0.5 accuracy; a perfect label scores 1.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, get_args

import polars as pl

from sae_pipeline.config import LabellerKind
from sae_pipeline.labelling import ChatClient, LLMError, normalise_token
from sae_pipeline.markdown import format_cell

SCORE_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "scorer": pl.String(),
    "n_positive": pl.Int64(),
    "n_negative": pl.Int64(),
    "detection_accuracy": pl.Float64(),
    "detection_precision": pl.Float64(),
    "detection_recall": pl.Float64(),
    "detection_f1": pl.Float64(),
    "n_fuzzing": pl.Int64(),
    "fuzzing_accuracy": pl.Float64(),
    "fuzzing_precision": pl.Float64(),
    "fuzzing_recall": pl.Float64(),
    "fuzzing_f1": pl.Float64(),
}

SCORE_COLUMNS: dict[str, str] = {
    "latent_id": "index of the latent (row of W_dec)",
    "scorer": "the scorer's name",
    "n_positive": "held-out activating contexts scored",
    "n_negative": "held-out non-activating contexts scored (= n_positive: balanced)",
    "detection_accuracy": "share of those contexts the scorer, given only the label, classified right; null when "
                          "fewer than min_each contexts of either kind were held out",
    "detection_precision": "of the contexts the scorer said activate, the share that do",
    "detection_recall": "of the activating contexts, the share the scorer found",
    "detection_f1": "harmonic mean of detection_precision and detection_recall",
    "n_fuzzing": "held-out activating contexts scored for fuzzing, half highlighted where the latent fires and "
                 "half on as many tokens where it does not",
    "fuzzing_accuracy": "share of those the scorer, given only the label, judged right (highlighting correct or "
                        "not); null when fewer than min_each of either highlighting were held out",
    "fuzzing_precision": "of the contexts the scorer called correctly highlighted, the share that are",
    "fuzzing_recall": "of the correctly highlighted contexts, the share the scorer accepted",
    "fuzzing_f1": "harmonic mean of fuzzing_precision and fuzzing_recall",
}
"""What each SCORE_SCHEMA column holds."""


@dataclass(frozen=True)
class Context:
    """One held-out context: its tokens and whether the latent fires anywhere in it."""

    tokens: list[str]
    activating: bool


@dataclass(frozen=True)
class Highlighted:
    """One held-out activating context with some tokens marked, and whether the marks are where it fires."""

    tokens: list[str]
    marked: list[bool]
    correct: bool


class Scorer(Protocol):
    name: str

    def predict(self, label: str, contexts: list[list[str]]) -> list[bool]:
        """For each context (token strings), whether the label says the latent fires in it."""
        ...

    def judge_highlights(self, label: str, contexts: list[Highlighted]) -> list[bool]:
        """For each highlighted context, whether the label says the marked tokens are where the latent fires."""
        ...


class HeldExample(NamedTuple):
    """What scoring reads of one held-out example (a row of the examples table)."""

    center: int
    tokens: list[str]
    token_activations: list[float]


def _crop(example: HeldExample, window: int) -> tuple[list[str], list[float]]:
    start = max(0, example.center - window)
    stop = example.center + window + 1
    return example.tokens[start:stop], example.token_activations[start:stop]


class HeldOut(NamedTuple):
    """One latent's held-out examples."""

    quantile: list[HeldExample]
    """Its `quantile` examples, rank by rank across bands (rank, then band)."""
    random: list[HeldExample]
    """Its `random` examples, by rank."""


def held_out_examples(examples: pl.DataFrame, window: int | None = None) -> dict[int, HeldOut]:
    """Each latent's held-out examples, from one pass over the examples table (its token lists read flat), each
    cropped to `window` tokens on either side of its centre when given (as scoring crops them)."""
    rows = examples.filter(pl.col("kind").is_in(["quantile", "random"])).sort(["latent_id", "kind", "rank", "band"])
    if window is not None:
        start = pl.max_horizontal(pl.col("center") - window, 0)
        rows = rows.with_columns(pl.col("tokens", "token_activations").list.slice(start, pl.col("center") + window + 1
                                                                                  - start),
                                 center=pl.col("center") - start)
    tokens = rows["tokens"].explode(empty_as_null=False).to_list()
    values = rows["token_activations"].explode(empty_as_null=False).to_list()
    ends = rows["tokens"].list.len().cum_sum().to_list()
    held: dict[int, HeldOut] = {}
    start = 0
    for latent, kind, center, end in zip(rows["latent_id"].to_list(), rows["kind"].to_list(), rows["center"].to_list(),
                                         ends, strict=True):
        own = held.setdefault(latent, HeldOut([], []))
        (own.quantile if kind == "quantile" else own.random).append(HeldExample(center, tokens[start:end],
                                                                                 values[start:end]))
        start = end
    return held


def scoring_contexts(held: HeldOut, window: int = 8) -> list[Context]:
    """Balanced held-out contexts of one latent, activating ones first.

    Activating: `quantile` examples, taken rank by rank across bands so every band is represented.
    Non-activating: `random` examples whose cropped window has no firing token.
    """
    positives = [Context(_crop(row, window)[0], True) for row in held.quantile]
    negatives = []
    for row in held.random:
        tokens, values = _crop(row, window)
        if max(values, default=0.0) <= 0:
            negatives.append(Context(tokens, False))
    n = min(len(positives), len(negatives))
    return positives[:n] + negatives[:n]


def fuzzing_contexts(held: HeldOut, latent_id: int, window: int = 8) -> list[Highlighted]:
    """Balanced highlighted contexts of one latent, correctly highlighted ones first (see the module docstring).

    The `quantile` examples, in the order detection takes them, alternate: even positions keep their true marks,
    odd ones get as many marks on tokens where the latent does not fire (random.Random(latent_id))."""
    rng = random.Random(latent_id)
    correct, false = [], []
    for index, row in enumerate(held.quantile):
        tokens, values = _crop(row, window)
        fires = [value > 0 for value in values]
        if index % 2 == 0:
            correct.append(Highlighted(tokens, fires, True))
            continue
        silent = [i for i, fired in enumerate(fires) if not fired]
        n_marks = sum(fires)
        if 0 < n_marks <= len(silent):
            chosen = set(rng.sample(silent, n_marks))
            false.append(Highlighted(tokens, [i in chosen for i in range(len(tokens))], False))
    n = min(len(correct), len(false))
    return correct[:n] + false[:n]


def label_terms(label: str) -> set[str]:
    """The terms a label names: its quoted 'terms' if any, else its words (normalised like tokens)."""
    quoted = re.findall(r"'([^']+)'", label)
    words = quoted or re.findall(r"[\w#]+", label)
    return {normalise_token(word) for word in words if word.strip()}


class OfflineScorer:
    """Predicts 'activating' when a term the label names is a token of the context, and 'correctly highlighted'
    when it is one of the marked tokens."""

    name = "offline-token-match"

    def predict(self, label: str, contexts: list[list[str]]) -> list[bool]:
        terms = label_terms(label)
        return [bool(terms & {normalise_token(token) for token in tokens}) for tokens in contexts]

    def judge_highlights(self, label: str, contexts: list[Highlighted]) -> list[bool]:
        return self.predict(label, [[t for t, mark in zip(c.tokens, c.marked, strict=True) if mark]
                                    for c in contexts])


DETECTION_SYSTEM_PROMPT = (
    "You are an intelligent and meticulous linguistics researcher. You are given an explanation of a latent "
    "of a language model, and numbered text examples. For each example, decide whether the latent is active "
    "anywhere in it, using the explanation alone. Reply with a JSON list of 0s and 1s, one per example, in "
    "order, and nothing else.")


FUZZING_SYSTEM_PROMPT = (
    "You are an intelligent and meticulous linguistics researcher. You are given an explanation of a latent "
    "of a language model, and numbered text examples in which some tokens are marked <<like this>>. In some "
    "examples the marks are on the tokens where the latent is active; in others they are on wrong tokens. For "
    "each example, decide from the explanation alone whether the marked tokens are the ones the latent responds "
    "to. Reply with a JSON list of 0s and 1s (1: correctly marked), one per example, in order, and nothing else.")


def _parse_flags(answer: str, n: int, what: str) -> list[bool]:
    """The JSON list of n 0/1 values in a chat answer; LLMError otherwise."""
    match = re.search(r"\[[^\]]*\]", answer)
    try:
        values = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or len(values) != n:
        raise LLMError(f"{what} answer is not a list of {n} 0/1 values")
    return [bool(int(v)) for v in values]


class LLMScorer:
    """delphi's detection and fuzzing scorers on an OpenAI-compatible chat endpoint."""

    def __init__(self, client: ChatClient):
        self.client = client
        self.name = f"llm:{client.model}"

    def prompt(self, label: str, contexts: list[list[str]]) -> list[dict[str, str]]:
        from sae_pipeline.dashboard import display_tokens

        lines = [f"Explanation: {label}", ""]
        lines += [f"Example {i}: {''.join(display_tokens(tokens)).strip()}" for i, tokens in enumerate(contexts, 1)]
        return [{"role": "system", "content": DETECTION_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    def predict(self, label: str, contexts: list[list[str]]) -> list[bool]:
        answer = self.client.complete(self.prompt(label, contexts), max_tokens=8 * len(contexts) + 20)
        return _parse_flags(answer, len(contexts), "detection")

    def fuzzing_prompt(self, label: str, contexts: list[Highlighted]) -> list[dict[str, str]]:
        from sae_pipeline.labelling import marked_text

        lines = [f"Explanation: {label}", ""]
        lines += [f"Example {i}: {marked_text(c.tokens, [float(m) for m in c.marked])}"
                  for i, c in enumerate(contexts, 1)]
        return [{"role": "system", "content": FUZZING_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    def judge_highlights(self, label: str, contexts: list[Highlighted]) -> list[bool]:
        answer = self.client.complete(self.fuzzing_prompt(label, contexts), max_tokens=8 * len(contexts) + 20)
        return _parse_flags(answer, len(contexts), "fuzzing")


def classification_metrics(truth: list[bool], predicted: list[bool], prefix: str) -> dict[str, float]:
    """`{prefix}_accuracy`, `_precision`, `_recall`, `_f1` of binary predictions against the truth."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    fp = sum(p and not t for t, p in zip(truth, predicted, strict=True))
    fn = sum(t and not p for t, p in zip(truth, predicted, strict=True))
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {f"{prefix}_accuracy": correct / len(truth), f"{prefix}_precision": precision,
            f"{prefix}_recall": recall,
            f"{prefix}_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def score_labels(labels: pl.DataFrame, examples: pl.DataFrame, scorer: Scorer | None = None, window: int = 8,
                 min_each: int = 3) -> pl.DataFrame:
    """One SCORE_SCHEMA row per labelled latent; detection (fuzzing) scores null when fewer than `min_each`
    held-out contexts of either kind (either highlighting) exist (a latent firing only on its top examples, or on
    almost every token)."""
    scorer = scorer or OfflineScorer()
    by_latent = held_out_examples(examples, window)
    rows = []
    for latent, label in zip(labels["latent_id"].to_list(), labels["label"].to_list(), strict=True):
        own = by_latent.get(latent, HeldOut([], []))
        contexts = scoring_contexts(own, window)
        highlighted = fuzzing_contexts(own, latent, window)
        n = len(contexts) // 2
        row = {"latent_id": latent, "scorer": scorer.name, "n_positive": n, "n_negative": n,
               "n_fuzzing": len(highlighted)}
        if n >= min_each:
            predicted = scorer.predict(label, [c.tokens for c in contexts])
            row.update(classification_metrics([c.activating for c in contexts], predicted, "detection"))
        if len(highlighted) // 2 >= min_each:
            judged = scorer.judge_highlights(label, highlighted)
            row.update(classification_metrics([c.correct for c in highlighted], judged, "fuzzing"))
        rows.append(row)
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def with_scores(labels: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """The labels table with its score columns (LABEL_SCHEMA then SCORE_SCHEMA minus latent_id)."""
    return labels.join(scores, on="latent_id", how="left")


def scores_summary(scored: pl.DataFrame) -> dict:
    scored_rows = scored.filter(pl.col("detection_accuracy").is_not_null())
    fuzzed = scored.filter(pl.col("fuzzing_accuracy").is_not_null())
    return {"n_labelled": len(scored), "n_scored": len(scored_rows),
            "mean_detection_accuracy": float(scored_rows["detection_accuracy"].mean() or 0.0) if len(scored_rows)
            else None,
            "mean_detection_f1": float(scored_rows["detection_f1"].mean() or 0.0) if len(scored_rows) else None,
            "n_fuzzed": len(fuzzed),
            "mean_fuzzing_accuracy": float(fuzzed["fuzzing_accuracy"].mean() or 0.0) if len(fuzzed) else None}


def _fmt_score(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def best_worst_markdown(scored: pl.DataFrame, n: int = 5) -> str:
    """Markdown tables of the n best and n worst scored labels (detection accuracy, then F1), with the fuzzing
    accuracy beside them (blank where unscored)."""
    rows = scored.filter(pl.col("detection_accuracy").is_not_null())
    lines = []
    for title, descending in (("Best labelled", True), ("Worst labelled", False)):
        part = rows.sort(["detection_accuracy", "detection_f1", "latent_id"],
                         descending=[descending, descending, False]).head(n)
        lines += [f"**{title}**", "", "| latent | label | accuracy | F1 | fuzzing | n held out |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['latent_id']} | {format_cell(r['label'])} | {r['detection_accuracy']:.2f} "
                  f"| {r['detection_f1']:.2f} | {_fmt_score(r['fuzzing_accuracy'])} "
                  f"| {r['n_positive'] + r['n_negative']} |" for r in part.iter_rows(named=True)]
        lines.append("")
    return "\n".join(lines)


LABELLER_KINDS: tuple[str, ...] = get_args(LabellerKind)


def labeller_and_scorer(kind: str, environ: dict[str, str] | None = None, timeout: float = 60.0, retries: int = 3,
                        step_seconds: float | None = None):
    """(labeller, scorer) for `offline` (no network) or `llm` (endpoint, model and key from the environment;
    `timeout` per request, `retries` after transient failures, every request done within `step_seconds`)."""
    from sae_pipeline.labelling import LLMLabeller, OfflineLabeller

    if kind == "offline":
        return OfflineLabeller(), OfflineScorer()
    if kind == "llm":
        client = replace(ChatClient.from_env(environ), timeout=timeout, retries=retries)
        client = client.with_deadline(step_seconds) if step_seconds is not None else client
        return LLMLabeller(client), LLMScorer(client)
    raise ValueError(f"labeller: {kind!r}; allowed {', '.join(LABELLER_KINDS)}")
