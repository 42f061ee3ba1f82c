"""Short human-readable labels for live latents, from their top activating tokens.

Only live latents are labelled (is_live and max_activation >= the threshold): a latent that never fires, or
fires only at 1e-16, has no meaningful top examples, and labelling it would invent a meaning for noise
(seed 003). The default labeller needs no network; `LLMLabeller` asks any OpenAI-compatible chat-completions
endpoint (base URL, model and key from SAE_PIPELINE_LLM_BASE_URL / _MODEL / _API_KEY); both implement `Labeller`.
The API key is only ever sent in the Authorization header: it is not logged, not in any error message, not in
any table or metadata.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
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
        """A label for one row of the features table (as a dict); `row["examples"]`, when present, holds its
        top examples from the examples table (dicts with tokens, token_activations, center, activation)."""
        ...


ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = "SAE_PIPELINE_LLM_BASE_URL", "SAE_PIPELINE_LLM_MODEL", "SAE_PIPELINE_LLM_API_KEY"


class LLMError(RuntimeError):
    """The endpoint failed or answered something unusable; the message never contains the key."""


@dataclass(frozen=True)
class ChatClient:
    """An OpenAI-compatible chat-completions client (urllib, no SDK): POST {base_url}/chat/completions."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama)."""
    model: str
    """Model name the endpoint serves."""
    api_key: str = field(default="", repr=False)
    """Sent as `Authorization: Bearer <key>` only; empty sends no header (local servers)."""
    timeout: float = 60.0
    """Seconds per request."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ChatClient:
        env = os.environ if environ is None else environ
        missing = [name for name in (ENV_BASE_URL, ENV_MODEL) if not env.get(name)]
        if missing:
            raise LLMError(f"LLM labeller: set {', '.join(missing)} (and {ENV_API_KEY} if the endpoint needs one)")
        return cls(env[ENV_BASE_URL].rstrip("/"), env[ENV_MODEL], env.get(ENV_API_KEY, ""))

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 200) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise LLMError(f"{self.base_url}/chat/completions answered HTTP {error.code}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as error:
            raise LLMError(f"{self.base_url}/chat/completions failed: {type(error).__name__}") from None
        try:
            return str(payload["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.base_url}/chat/completions: no choices[0].message.content in the answer") from None


def marked_text(tokens: list[str], values: list[float]) -> str:
    """The window as text with every firing token wrapped in << >> (delphi's highlighting)."""
    from sae_pipeline.dashboard import display_tokens

    out = []
    for text, value in zip(display_tokens(tokens), values, strict=True):
        stripped = text.lstrip(" ")
        out.append(text if value <= 0 else f"{text[:len(text) - len(stripped)]}<<{stripped}>>")
    return "".join(out).strip()


def example_prompt_lines(examples: list[dict], max_examples: int) -> list[str]:
    """Numbered examples with the activation of each firing token, as delphi shows them to the explainer."""
    lines = []
    for number, example in enumerate(examples[:max_examples], start=1):
        firing = [(tok, value) for tok, value in zip(example["tokens"], example["token_activations"], strict=True)
                  if value > 0]
        values = ", ".join(f"{normalise_token(tok)} ({value:.2f})" for tok, value in firing)
        lines.append(f"Example {number}: {marked_text(example['tokens'], example['token_activations'])}")
        lines.append(f"Activations: {values}")
    return lines


LABEL_SYSTEM_PROMPT = (
    "You are a meticulous AI researcher explaining a latent of a sparse autoencoder trained on a language "
    "model's activations. You see text examples where the latent fires; the firing tokens are marked <<like "
    "this>> and listed with their activation values. Reply with one short explanation (at most 12 words) of "
    "what the latent responds to, and nothing else.")


class LLMLabeller:
    """Labels from an OpenAI-compatible chat endpoint, shown the latent's top examples with activation values."""

    def __init__(self, client: ChatClient, max_examples: int = 10):
        self.client, self.max_examples = client, max_examples
        self.name = f"llm:{client.model}"

    def prompt(self, row: dict) -> list[dict[str, str]]:
        examples = row.get("examples") or [
            {"tokens": [token], "token_activations": [value], "center": 0, "activation": value}
            for token, value in zip(row["top_tokens"], row["top_activations"], strict=True)]
        lines = [f"Latent {row['latent_id']} (max activation {row['max_activation']:.3g}, fires on "
                 f"{row['frequency']:.3%} of tokens).", *example_prompt_lines(examples, self.max_examples)]
        return [{"role": "system", "content": LABEL_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]

    def label(self, row: dict) -> str:
        text = self.client.complete(self.prompt(row), max_tokens=60)
        return " ".join(text.split())[:200] or "(empty answer)"


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
                   live_threshold: float = LIVE_THRESHOLD, examples: pl.DataFrame | None = None,
                   max_latents: int = 0) -> pl.DataFrame:
    """Labels for live latents only (is_live and max_activation >= live_threshold); LABEL_SCHEMA columns.

    Never-firing and near-zero latents are filtered out before the labeller sees any row, so lowering
    `live_threshold` below the features table's own LIVE_THRESHOLD cannot let them through either.
    `examples` (the examples table) hands each row its `top` examples only: the quantile and random ones stay
    held out for scoring. `max_latents` > 0 labels only that many, highest max activation first.
    """
    labeller = labeller or OfflineLabeller()
    live = features.filter(pl.col("is_live") & (pl.col("max_activation") >= live_threshold))
    if max_latents > 0:
        live = live.sort("max_activation", descending=True).head(max_latents).sort("latent_id")
    top = {} if examples is None else examples.filter(pl.col("kind") == "top").sort("rank").partition_by(
        "latent_id", as_dict=True)
    rows = []
    for row in live.iter_rows(named=True):
        if examples is not None:
            found = top.get((row["latent_id"],))
            row["examples"] = [] if found is None else list(found.iter_rows(named=True))
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
