"""A latent's vocabulary (SAEDashboard's logit tables / nearest tokens): its decoder row against the model's
unembedding (causal LM) or input embeddings (encoder)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sae_pipeline.model import is_causal_lm, load_model_with_head


def load_vocab_matrix(model: str, trust_remote_code: bool = False) -> tuple[str, Tensor]:
    """("logit_effect", W_U [vocab, d]) for a causal LM, else ("nearest_embedding", input embeddings [vocab, d]).

    A causal LM's output embeddings are the unembedding W_U. Encoders (the default MiniLM) have no unembedding
    over the vocabulary, so their decoder directions are compared with the input embeddings.
    """
    loaded = load_model_with_head(model, trust_remote_code)
    if is_causal_lm(loaded):
        return "logit_effect", loaded.get_output_embeddings().weight.detach().float()
    return "nearest_embedding", loaded.get_input_embeddings().weight.detach().float()


def excluded_vocab_ids(tokenizer) -> list[int]:
    """Special tokens and WordPiece's untrained `[unusedN]` slots: never shown as a latent's vocabulary."""
    vocab = tokenizer.get_vocab()
    unused = [i for token, i in vocab.items() if token.startswith("[unused") and token.endswith("]")]
    return sorted(set(tokenizer.all_special_ids) | set(unused))


@torch.no_grad()
def vocab_projection(decoder: Tensor, matrix: Tensor, kind: str, tokenizer, k: int = 10,
                     exclude_ids: list[int] | None = None, block: int = 1024) -> dict[str, list]:
    """Top and bottom k vocabulary entries per decoder row (SAEDashboard's logit tables / nearest tokens).

    kind `logit_effect`: decoder row . W_U row per token (the direct effect on the logits, no final norm);
    kind `nearest_embedding`: cosine similarity of the decoder row with each token's input embedding.
    Computed `block` latents at a time, so memory stays [block, vocab].
    """
    if kind not in ("logit_effect", "nearest_embedding"):
        raise ValueError(f"kind: {kind!r}; allowed logit_effect, nearest_embedding")
    matrix = matrix.to(decoder.device, torch.float32)
    if kind == "nearest_embedding":
        matrix = matrix / matrix.norm(dim=1, keepdim=True).clamp(min=1e-12)
    k = min(k, len(matrix))
    found: dict[str, list[tuple[Tensor, Tensor]]] = {"top": [], "bottom": []}
    for start in range(0, len(decoder), block):
        rows = decoder[start:start + block].float()
        if kind == "nearest_embedding":
            rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        scores = rows @ matrix.t()
        if exclude_ids:
            scores[:, exclude_ids] = torch.nan
        found["top"].append(scores.nan_to_num(-torch.inf).topk(k, dim=1))
        found["bottom"].append(scores.nan_to_num(torch.inf).topk(k, dim=1, largest=False))
    names = np.array(tokenizer.convert_ids_to_tokens(list(range(len(matrix)))), dtype=object)  # once per id
    out: dict[str, list] = {}
    for name, results in found.items():
        out[f"{name}_vocab_tokens"] = names[torch.cat([r.indices for r in results]).cpu().numpy()].tolist()
        out[f"{name}_vocab_values"] = torch.cat([r.values for r in results]).double().cpu().tolist()
    return out
