"""Short human-readable labels for live latents, from their top activating tokens.

Only live latents are labelled (is_live and max_activation >= the threshold): a latent that never fires, or
fires only at 1e-16, has no meaningful top examples, and labelling it would invent a meaning for noise
(seed 003). The default labeller needs no network; `LLMLabeller` asks any OpenAI-compatible chat-completions
endpoint (base URL, model and key from SAE_PIPELINE_LLM_BASE_URL / _MODEL / _API_KEY); both implement `Labeller`.
The API key is only ever sent in the Authorization header: it is not logged, not in any error message, not in
any table or metadata.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import polars as pl

from sae_pipeline.features import LIVE_THRESHOLD, example_rows
from sae_pipeline.markdown import format_cell
from sae_pipeline.progress import RateProgress
from sae_pipeline.storage import read_json, write_json_atomic, write_parquet_atomic

_SUBWORD_MARKERS = ("##", "Ġ", "▁")  # WordPiece continuation, byte-level BPE space, SentencePiece space

LABELS_FILE = "labels.parquet"
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "latent_id": pl.Int64(),
    "label": pl.String(),
    "labeller": pl.String(),
    "top_token": pl.String(),
    "top_token_share": pl.Float64(),
    "max_activation": pl.Float64(),
    "frequency": pl.Float64(),
}

LABEL_COLUMNS: dict[str, str] = {
    "latent_id": "index of the latent (row of W_dec)",
    "label": "a short description of what the latent fires on",
    "labeller": "the labeller's name",
    "top_token": "normalised token with the largest share of the top activation mass",
    "top_token_share": "that share, in (0, 1]",
    "max_activation": "the latent's max activation on held-out tokens (features table)",
    "frequency": "fraction of held-out tokens where it fires (features table)",
}
"""What each LABEL_SCHEMA column holds."""


class Labeller(Protocol):
    name: str
    reads_examples: bool
    """Whether `label` reads `row["examples"]` (giving them costs a pass over the examples table); a labeller
    without the attribute is given them."""

    def label(self, row: dict) -> str:
        """A label for one row of the features table (as a dict); `row["examples"]`, when present, holds its
        top examples from the examples table (dicts with tokens, token_activations, center, activation)."""
        ...


ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = "SAE_PIPELINE_LLM_BASE_URL", "SAE_PIPELINE_LLM_MODEL", "SAE_PIPELINE_LLM_API_KEY"


class LLMError(RuntimeError):
    """The endpoint failed or answered something unusable; the message never contains the key."""

    transient: bool = False
    """True when the endpoint was unavailable (LLMUnavailable): a later attempt may succeed, unlike after an HTTP
    4xx, an unusable answer or the step's deadline."""


class LLMUnavailable(LLMError):
    """Every attempt at one request failed transiently (no connection, timeout, HTTP 429 or 5xx)."""

    transient = True


class _Transient(Exception):
    """A failure worth retrying: no connection, no complete answer in time, HTTP 429 or 5xx."""


@dataclass(frozen=True)
class ChatClient:
    """An OpenAI-compatible chat-completions client (http.client, no SDK): POST {base_url}/chat/completions.

    Each request must complete within `timeout` seconds of wall clock (a server that drips bytes is cut off),
    failed requests are retried with exponential backoff, and nothing runs past `deadline`.
    """

    base_url: str
    """e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama)."""
    model: str
    """Model name the endpoint serves."""
    api_key: str = field(default="", repr=False)
    """Sent as `Authorization: Bearer <key>` only; empty sends no header (local servers)."""
    timeout: float = 60.0
    """Seconds per request, wall clock, from connecting to the last byte of the answer."""
    retries: int = 3
    """Further attempts after a transient failure (no connection, timeout, HTTP 429 or 5xx)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled before each next one."""
    deadline: float | None = None
    """`time.monotonic()` after which no request starts or continues (the labelling step's deadline)."""

    def with_deadline(self, seconds: float) -> ChatClient:
        """This client with every request ending at most `seconds` from now."""
        return replace(self, deadline=time.monotonic() + seconds)

    def _seconds_left(self) -> float:
        left = self.timeout if self.deadline is None else min(self.timeout, self.deadline - time.monotonic())
        if left <= 0:
            raise LLMError(f"{self.base_url}/chat/completions: the labelling step's deadline has passed")
        return left

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
        where = f"{self.base_url}/chat/completions"
        status, data = self._post_with_retries(body)
        if status >= 400:
            raise LLMError(f"{where} answered HTTP {status}")
        try:
            return str(json.loads(data)["choices"][0]["message"]["content"]).strip()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LLMError(f"{where}: the answer is not JSON") from None
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{where}: no choices[0].message.content in the answer") from None

    def _post_with_retries(self, body: bytes) -> tuple[int, bytes]:
        """Up to 1 + `retries` attempts, `backoff` x 2^n seconds apart, none past the deadline."""
        for attempt in range(self.retries):
            try:
                return self._post(body, self._seconds_left())
            except _Transient:
                time.sleep(min(self.backoff * 2**attempt, max(0.0, self._seconds_left() - 1e-3)))
        try:
            return self._post(body, self._seconds_left())
        except _Transient as error:
            raise LLMUnavailable(f"{self.base_url}/chat/completions failed {self.retries + 1} time(s), last: "
                                 f"{error}") from None

    def _post(self, body: bytes, seconds: float) -> tuple[int, bytes]:
        """(status, body) of one POST that must finish within `seconds`: a timer shuts the socket down at
        the limit, which also ends a read that keeps receiving a byte now and then."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connection, target = _connection(f"{self.base_url}/chat/completions", seconds)
        cut = threading.Event()
        timer = threading.Timer(seconds, _shut_down, args=(connection, cut))
        timer.start()
        try:
            connection.request("POST", target, body, headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            reason = f"no complete answer within {seconds:.3g} s" if cut.is_set() else type(error).__name__
            raise _Transient(reason) from None
        finally:
            timer.cancel()
            connection.close()
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        return status, data


def _connection(address: str, seconds: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection for `address` and the request target to send on it, through the proxy that the
    environment (HTTP(S)_PROXY, NO_PROXY) names for it, as urllib would."""
    url = urllib.parse.urlsplit(address)
    target = url.path + (f"?{url.query}" if url.query else "")
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and url.hostname and urllib.request.proxy_bypass(url.hostname):
        proxy = None
    via = urllib.parse.urlsplit(proxy) if proxy else url
    if url.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            via.hostname, via.port, timeout=seconds, context=ssl.create_default_context())
        if proxy:
            connection.set_tunnel(url.hostname, url.port)
        return connection, target
    return http.client.HTTPConnection(via.hostname, via.port, timeout=seconds), address if proxy else target


def _shut_down(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    cut.set()
    if connection.sock is not None:
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)


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

    reads_examples = True

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


@functools.lru_cache(maxsize=1 << 16)
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
    reads_examples = False

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
                   max_latents: int = 0, done: pl.DataFrame | None = None,
                   obtained: list[dict] | None = None,
                   progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    """Labels for live latents only (is_live and max_activation >= live_threshold); LABEL_SCHEMA columns.

    Never-firing and near-zero latents are filtered out before the labeller sees any row, so lowering
    `live_threshold` below the features table's own LIVE_THRESHOLD cannot let them through either.
    `examples` (the examples table) hands each row its `top` examples only, when the labeller reads them: the
    quantile and random ones stay held out for scoring. `max_latents` > 0 labels only that many, highest max
    activation first.
    `done`: labels this labeller already gave (an interrupted run's), reused instead of asked again.
    `obtained`: each LABEL_SCHEMA row is appended here as it is obtained, so that a caller keeps them when the
    labeller fails part-way or the step is stopped. `progress` gets a line every PROGRESS_SECONDS.
    """
    labeller = labeller or OfflineLabeller()
    previous = {} if done is None else {row["latent_id"]: row for row in done.iter_rows(named=True)
                                        if row["labeller"] == labeller.name}
    live = features.filter(pl.col("is_live") & (pl.col("max_activation") >= live_threshold))
    if max_latents > 0:
        live = live.sort("max_activation", descending=True).head(max_latents).sort("latent_id")
    given = examples is not None and getattr(labeller, "reads_examples", True)
    top: dict[int, list[dict]] = {}
    for example in example_rows(examples.filter(pl.col("kind") == "top").sort("latent_id", "rank")) if given else ():
        top.setdefault(example["latent_id"], []).append(example)
    rows = [] if obtained is None else obtained
    tracker = RateProgress(progress, "labelling", live.height, "latents") if progress else None
    for row in live.iter_rows(named=True):
        if tracker is not None:
            tracker.update(len(rows))
        if row["latent_id"] in previous:
            rows.append(previous[row["latent_id"]])
            continue
        if given:
            row["examples"] = top.get(row["latent_id"], [])
        label = labeller.label(row)
        top_token, share = (token_shares(row) or [("", 0.0)])[0]
        rows.append({"latent_id": row["latent_id"], "label": label, "labeller": labeller.name,
                     "top_token": top_token, "top_token_share": share,
                     "max_activation": row["max_activation"], "frequency": row["frequency"]})
    return pl.DataFrame(rows, schema=LABEL_SCHEMA)


def write_labels(labels: pl.DataFrame, path: Path) -> None:
    write_parquet_atomic(labels, path)


PROGRESS_FILE = "progress.json"


def save_progress(folder: Path, labels: pl.DataFrame, stamp: dict[str, str]) -> None:
    """Labels obtained so far, with what they were made from (`stamp`: labeller, features digest), in one file."""
    write_json_atomic(folder / PROGRESS_FILE, {"stamp": stamp, "labels": labels.to_dicts()})


def load_progress(folder: Path, stamp: dict[str, str]) -> pl.DataFrame | None:
    """Saved labels made from the same features by the same labeller (`stamp`), or None."""
    path = folder / PROGRESS_FILE
    if not path.exists():
        return None
    saved = read_json(path)
    return pl.DataFrame(saved["labels"], schema=LABEL_SCHEMA) if saved["stamp"] == stamp else None


def labels_markdown(labels: pl.DataFrame, n: int = 10) -> str:
    """Markdown table of the n best-labelled latents: highest top_token_share, then highest max activation."""
    best = labels.sort(["top_token_share", "max_activation"], descending=True).head(n)
    lines = ["| latent | label | top token share | max activation |", "|---:|---|---:|---:|"]
    for row in best.iter_rows(named=True):
        lines.append(f"| {row['latent_id']} | {format_cell(row['label'])} | {row['top_token_share']:.0%} "
                     f"| {row['max_activation']:.4g} |")
    return "\n".join(lines) + "\n"
