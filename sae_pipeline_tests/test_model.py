"""HookPoint: names, capture (stops once read) and splice, on randomly initialised tiny models of every family:
BERT/MiniLM, GPT-2, Llama and Gemma 3 (no weights are downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel, BertConfig, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig

from sae_pipeline.config import ConfigError
from sae_pipeline.model import HookPoint, capture_hooks, is_causal_lm, model_sites, pad_batch, transformer_blocks


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()


def test_parse_round_trips_and_refuses_unknown_names_naming_the_allowed_ones() -> None:
    assert HookPoint.parse("blocks.2.hook_resid_post") == HookPoint(2)
    assert HookPoint(2).name == "blocks.2.hook_resid_post"
    assert HookPoint.parse("blocks.1.hook_mlp_out") == HookPoint(1, "hook_mlp_out")
    for name in ("blocks.2.hook_mlp_post", "resid_post", "blocks.x.hook_resid_post"):
        with pytest.raises(ConfigError, match=r"hook: .* unknown; allowed blocks\.\{L\}\.\(hook_resid_pre\|"):
            HookPoint.parse(name)
    with pytest.raises(ConfigError, match="site"):
        HookPoint(0, "hook_q")


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


TINY = {
    "bert": lambda: BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                               intermediate_size=32),
    "gpt2": lambda: GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32),
    "llama": lambda: LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1),
    "gemma": lambda: Gemma3TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8),
}
SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, AutoModel.from_config(TINY[request.param]()).eval()


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([[1, 2, 3, 4, 5], [6, 7, 8]], 0)


def test_every_site_is_read_in_one_pass_and_agrees_with_the_block_algebra(tiny: tuple[str, nn.Module]) -> None:
    """resid_pre/post are the model's hidden states; each block's sublayers recombine into its output by the
    family's own layout (pre-norm adds; Gemma adds after its post-norms; BERT normalises after adding)."""
    family, model = tiny
    input_ids, mask = _ids()
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hooks = [HookPoint(1, site) for site in SITES]
    got = {hook.site: value for hook, value in capture_hooks(model, hooks, input_ids, mask).items()}
    assert set(got) == set(SITES) and all(v.shape == (2, 5, 16) for v in got.values())
    assert torch.allclose(got["hook_resid_pre"], hidden[1], atol=1e-6)
    assert torch.allclose(got["hook_resid_post"], hidden[2], atol=1e-6)
    block = transformer_blocks(model)[1]
    pre, attn, mlp_in, mlp_out, post = (got[site] for site in SITES)
    with torch.no_grad():
        if family == "bert":
            assert torch.allclose(mlp_in, block.attention.output.LayerNorm(attn + pre), atol=1e-5)
            assert torch.allclose(post, block.output.LayerNorm(mlp_out + mlp_in), atol=1e-5)
        else:
            middle = pre + attn
            norm = {"gpt2": "ln_2", "llama": "post_attention_layernorm", "gemma": "pre_feedforward_layernorm"}[family]
            assert torch.allclose(mlp_in, getattr(block, norm)(middle), atol=1e-5)
            assert torch.allclose(post, middle + mlp_out, atol=1e-5)


def test_the_pass_stops_once_the_deepest_hook_is_read(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    blocks, ran = transformer_blocks(model), []
    handle = blocks[2].register_forward_pre_hook(lambda *_: ran.append(2))
    try:
        capture_hooks(model, [HookPoint(1, "hook_mlp_in"), HookPoint(0, "hook_resid_post")], *_ids())
        assert ran == []
        capture_hooks(model, [HookPoint(2, "hook_resid_pre")], *_ids())
        assert ran == [2]  # block 2's input is read as it starts: its pre-hook ran, nothing after it
    finally:
        handle.remove()


def test_a_spliced_mlp_output_changes_the_residual_and_nothing_before_it(tiny: tuple[str, nn.Module]) -> None:
    family, model = tiny
    input_ids, mask = _ids()
    hooks = [HookPoint(1, "hook_mlp_in"), HookPoint(1, "hook_resid_post")]
    clean = capture_hooks(model, hooks, input_ids, mask)
    keep = mask.bool()
    with HookPoint(1, "hook_mlp_out").splice(model, keep, torch.zeros_like):
        ablated = capture_hooks(model, hooks, input_ids, mask)
    assert torch.equal(ablated[hooks[0]], clean[hooks[0]])
    if family in ("gpt2", "llama", "gemma"):  # pre-norm: the block's output is its middle residual
        middle = capture_hooks(model, [HookPoint(1, "hook_resid_pre"), HookPoint(1, "hook_attn_out")],
                               input_ids, mask)
        expected = sum(middle.values())
    else:  # BERT: LayerNorm(0 + mlp_in)
        expected = transformer_blocks(model)[1].output.LayerNorm(clean[hooks[0]])
    assert torch.allclose(ablated[hooks[1]][keep], expected[keep], atol=1e-5)
    assert not torch.allclose(ablated[hooks[1]], clean[hooks[1]])


def test_a_hook_the_model_lacks_is_refused_naming_the_allowed_ones(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    with pytest.raises(ConfigError, match=r"hook: 'blocks\.3\.hook_resid_post' is not in model type .*; allowed "
                                          r"blocks\.\{0\.\.2\}\.\(hook_resid_pre\|hook_resid_post\|hook_attn_out"):
        HookPoint(3).capture(model, *_ids())


def test_an_unknown_family_offers_the_residual_stream_only() -> None:
    config = GPT2Config(n_layer=2)
    config.model_type = "somethingnew"
    assert list(model_sites(config)) == ["hook_resid_pre", "hook_resid_post"]
    with pytest.raises(ConfigError, match=r"allowed blocks\.\{0\.\.1\}\.\(hook_resid_pre\|hook_resid_post\)$"):
        HookPoint(0, "hook_mlp_out").check(config, 2)
