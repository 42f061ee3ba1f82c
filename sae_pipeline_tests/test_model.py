"""HookPoint: names, capture (stops after the block) and splice, on a randomly initialised tiny GPT-2."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sae_pipeline.config import ConfigError
from sae_pipeline.model import HookPoint, is_causal_lm, pad_batch


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()


def test_parse_round_trips_and_refuses_unknown_names_naming_the_allowed_ones() -> None:
    assert HookPoint.parse("blocks.2.hook_resid_post") == HookPoint(2)
    assert HookPoint(2).name == "blocks.2.hook_resid_post"
    for name in ("blocks.2.hook_mlp_out", "resid_post", "blocks.x.hook_resid_post"):
        with pytest.raises(ConfigError, match=r"hook: .* unknown; allowed blocks\.\{L\}\.hook_resid_post"):
            HookPoint.parse(name)
    with pytest.raises(ConfigError, match="site"):
        HookPoint(0, "hook_attn_out")


def test_capture_is_the_blocks_hidden_state_and_splice_replaces_it(gpt2: GPT2LMHeadModel) -> None:
    input_ids, mask = pad_batch([[1, 2, 3, 4], [5, 6]], 0)
    with torch.no_grad():
        hidden = gpt2(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    captured = HookPoint(1).capture(gpt2, input_ids, mask)
    assert torch.equal(captured, hidden[2].float())  # hidden_states[0] is the embedding output
    keep = mask.bool()
    keep[0, 0] = False
    with HookPoint(1).splice(gpt2, keep, torch.zeros_like):  # the capture hook sees the spliced output
        spliced = HookPoint(1).capture(gpt2, input_ids, mask)
    assert not spliced[keep].any() and torch.equal(spliced[0, 0], captured[0, 0]) and is_causal_lm(gpt2)
