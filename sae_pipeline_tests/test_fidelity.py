"""Downstream fidelity of a splice, on randomly initialised tiny models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from sae_pipeline.fidelity import downstream_fidelity, next_token_ce
from sae_pipeline.model import HookPoint, is_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=32)
    return BertModel(config).eval()


def _batch(lengths: list[int], vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask, mask.bool()


def test_ce_matches_the_models_own_loss(gpt2: GPT2LMHeadModel) -> None:
    ids, mask, _ = _batch([12, 12, 12])
    total, count = next_token_ce(gpt2, ids, mask)
    with torch.no_grad():
        hf_loss = gpt2(input_ids=ids, labels=ids).loss.item()  # transformers' mean next-token CE
    assert count == 3 * 11
    assert total / count == pytest.approx(hf_loss, rel=1e-5)


def test_identity_splice_recovers_everything_and_zero_nothing(gpt2: GPT2LMHeadModel) -> None:
    batches = [_batch([10, 7, 12])]
    identity = downstream_fidelity(gpt2, HookPoint(0), batches, lambda h: h)
    assert identity.kind == "causal_lm" and is_causal_lm(gpt2)
    assert identity.spliced == pytest.approx(identity.clean, abs=1e-6)
    assert identity.recovered == pytest.approx(1.0, abs=1e-5)
    assert identity.ablated != pytest.approx(identity.clean, abs=1e-3)  # ablation really changes the model
    zero = downstream_fidelity(gpt2, HookPoint(0), batches, torch.zeros_like)
    assert zero.recovered == pytest.approx(0.0, abs=1e-6)


def test_partial_splice_lies_between(gpt2: GPT2LMHeadModel) -> None:
    batches = [_batch([12, 12])]
    half = downstream_fidelity(gpt2, HookPoint(1), batches, lambda h: 0.5 * h)
    manual = []
    for scale in (1.0, 0.5, 0.0):
        ids, mask, keep = batches[0]
        with torch.no_grad(), HookPoint(1).splice(gpt2, keep, lambda h, s=scale: s * h):
            logits = gpt2(input_ids=ids, attention_mask=mask).logits[:, :-1]
        manual.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)).item())
    assert [half.clean, half.spliced, half.ablated] == pytest.approx(manual, rel=1e-5)
    assert half.recovered == pytest.approx((manual[2] - manual[1]) / (manual[2] - manual[0]), rel=1e-5)


def test_encoder_cosine_of_pooled_embeddings(bert: BertModel) -> None:
    batches = [_batch([9, 5, 12])]
    identity = downstream_fidelity(bert, HookPoint(0), batches, lambda h: h)
    assert identity.kind == "encoder" and not is_causal_lm(bert)
    assert identity.spliced == pytest.approx(1.0, abs=1e-5) and identity.recovered == pytest.approx(1.0, abs=1e-4)
    noisy = downstream_fidelity(bert, HookPoint(0), batches, lambda h: h + torch.randn_like(h))
    ids, mask, keep = batches[0]
    with torch.no_grad():
        clean = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        with HookPoint(0).splice(bert, keep, torch.zeros_like):
            ablated = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = [(h * weights).sum(1) / weights.sum(1) for h in (clean, ablated)]
    expected = torch.nn.functional.cosine_similarity(pooled[1], pooled[0], dim=-1).mean().item()
    assert noisy.ablated == pytest.approx(expected, rel=1e-5)
    assert noisy.spliced < 1.0


def test_padding_is_never_replaced(gpt2: GPT2LMHeadModel) -> None:
    ids, mask, keep = _batch([4, 12])
    seen: list[int] = []
    with torch.no_grad(), HookPoint(0).splice(gpt2, keep, lambda h: seen.append(len(h)) or h):
        gpt2(input_ids=ids, attention_mask=mask)
    assert seen == [16]  # 4 + 12 real tokens, none of the 8 padding positions


def test_kl_is_the_divergence_of_the_spliced_next_token_distribution(gpt2: GPT2LMHeadModel,
                                                                      bert: BertModel) -> None:
    batches = [_batch([12, 9])]
    flipped = downstream_fidelity(gpt2, HookPoint(0), batches, lambda h: -4 * h)
    identity = downstream_fidelity(gpt2, HookPoint(0), batches, lambda h: h)
    ids, mask, keep = batches[0]
    with torch.no_grad():
        clean = torch.softmax(gpt2(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), dim=-1)
        with HookPoint(0).splice(gpt2, keep, lambda h: -4 * h):
            spliced = torch.softmax(gpt2(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), dim=-1)
    valid = mask[:, 1:].bool()
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=clean[valid]),
                                                 torch.distributions.Categorical(probs=spliced[valid])).mean()
    assert flipped.kl == pytest.approx(float(expected), rel=1e-3) and flipped.kl > 1e-3
    assert identity.kl == pytest.approx(0.0, abs=1e-7)
    assert downstream_fidelity(bert, HookPoint(0), [_batch([8, 6])], lambda h: h).kl is None
