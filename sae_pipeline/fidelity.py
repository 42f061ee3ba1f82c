"""Downstream fidelity: how much of the model's behaviour survives when the SAE's reconstruction replaces the
hooked layer's output (the splice), on held-out sequences.

- Causal LMs: next-token cross-entropy clean, spliced and with the layer zero-ablated;
  `loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)` (1 = no loss, 0 = as bad as ablation), and the
  KL divergence of the spliced model's next-token distribution from the clean one's, per target token.
- Encoders (the default MiniLM): cosine between the mean-pooled sentence embedding (how sentence-transformers
  pools) with and without the splice, averaged over sequences; the zero-ablated cosine is the floor.
Only the tokens the SAE was trained on are replaced (padding and, when excluded, special tokens keep their value).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import polars as pl
import torch
from torch import Tensor, nn

from sae_pipeline.config import ActivationSpec
from sae_pipeline.model import HookPoint, Replace, is_causal_lm, load_model_with_head, load_tokenizer, pad_batch
from sae_pipeline.saes import SparseAutoencoder


@dataclass(frozen=True)
class DownstreamMetrics:
    kind: str
    """`causal_lm` (cross-entropy) or `encoder` (pooled-embedding cosine)."""
    clean: float
    """CE of the unmodified model (causal_lm), or 1.0 (encoder: cosine of the clean embedding with itself)."""
    spliced: float
    """CE with the reconstruction spliced in, or the mean cosine of spliced vs clean pooled embeddings."""
    ablated: float
    """CE with the layer's output zeroed at the replaced tokens, or the mean cosine of ablated vs clean."""
    recovered: float
    """(ablated - spliced) / (ablated - clean): 1 when the splice changes nothing, 0 when it is as bad as ablation."""
    n_sequences: int
    kl: float | None = None
    """causal_lm: mean over target tokens of KL(clean || spliced) of the next-token distributions, in nats; None
    for an encoder."""

    def as_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


@torch.no_grad()
def next_token_logprobs(model: nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Log-probabilities of the next token at every real target position, [n_targets, vocab] float32."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    return torch.log_softmax(logits[mask[:, 1:].bool()], dim=-1)


@torch.no_grad()
def next_token_ce(model: nn.Module, input_ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropies over real target tokens, their count)."""
    logprobs = next_token_logprobs(model, input_ids, mask)
    targets = input_ids[:, 1:][mask[:, 1:].bool()]
    return float(-logprobs.gather(1, targets[:, None]).sum()), len(targets)


def kl_sum(clean: Tensor, other: Tensor) -> float:
    """Sum over positions of KL(clean || other), from log-probabilities [n, vocab]."""
    return float((clean.exp() * (clean - other)).sum(dtype=torch.float64))


@torch.no_grad()
def mean_pooled(model: nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Mean of the last hidden state over real tokens, [batch, d_model]."""
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _recovered(clean: float, spliced: float, ablated: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


@torch.no_grad()
def downstream_fidelity(model: nn.Module, hook: HookPoint, batches: Iterable[tuple[Tensor, Tensor, Tensor]],
                        replace: Replace) -> DownstreamMetrics:
    """Run (input_ids, mask, keep) batches clean, spliced with `replace` and zero-ablated."""
    model.eval()
    causal = is_causal_lm(model)
    totals = torch.zeros(3, dtype=torch.float64)  # clean, spliced, ablated (CE sums or cosine sums)
    count, n_sequences, kl = 0, 0, 0.0
    for input_ids, mask, keep in batches:
        runs = []
        for patch in (None, replace, torch.zeros_like):
            with hook.splice(model, keep, patch) if patch is not None else contextlib.nullcontext():
                runs.append(next_token_logprobs(model, input_ids, mask) if causal
                            else mean_pooled(model, input_ids, mask))
        if causal:
            targets = input_ids[:, 1:][mask[:, 1:].bool()][:, None]
            totals += torch.tensor([float(-run.gather(1, targets).sum()) for run in runs], dtype=torch.float64)
            count += len(targets)
            kl += kl_sum(runs[0], runs[1])
        else:
            clean = runs[0]
            totals += torch.tensor([float(torch.nn.functional.cosine_similarity(run, clean, dim=-1).sum())
                                    for run in runs], dtype=torch.float64)
            count += len(input_ids)
        n_sequences += len(input_ids)
    clean, spliced, ablated = (totals / max(count, 1)).tolist()
    if causal:
        return DownstreamMetrics("causal_lm", clean, spliced, ablated, _recovered(clean, spliced, ablated), n_sequences,
                                 kl / max(count, 1))
    # encoder: cosines are similarities (higher is better); recovery is measured on 1 - cosine
    return DownstreamMetrics("encoder", clean, spliced, ablated, _recovered(1 - clean, 1 - spliced, 1 - ablated),
                             n_sequences)


def eval_batches(corpus: pl.DataFrame, meta: dict, tokenizer, batch_size: int = 16,
                 max_sequences: int = 64) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(input_ids, mask, keep) over the held-out sequences of an activation store; `keep` marks the tokens the
    store holds (real tokens, special ones excluded when the store excluded them)."""
    held_out = meta["eval_sequence_ids"][:max_sequences]
    rows = corpus.filter(pl.col("seq_id").is_in(held_out)).sort("seq_id")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)) if meta.get("exclude_special_tokens") else [])
    for start in range(0, len(rows), batch_size):
        input_ids, mask = pad_batch(rows["input_ids"].slice(start, batch_size).to_list(), tokenizer.pad_token_id)
        yield input_ids, mask, mask.bool() & ~torch.isin(input_ids, special)


def measure_downstream(sae: SparseAutoencoder, meta: dict, corpus: pl.DataFrame, spec: ActivationSpec,
                       max_sequences: int = 64) -> DownstreamMetrics:
    """Splice a saved SAE (taking raw activations) into the model at the store's layer, on held-out sequences."""
    model = load_model_with_head(spec.model, spec.trust_remote_code)
    batches = eval_batches(corpus, meta, load_tokenizer(spec), max_sequences=max_sequences)
    return downstream_fidelity(model, HookPoint.of_store(meta), batches, lambda h: sae.reconstruct(h)[0])
