"""Activations read at chosen hook sites (`activations.hooks`): the names are checked before any compute, one
forward pass fills one store per hook, each naming its hook, and an SAE reads the store of its config's `hook`,
is saved with it and spliced back there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.config import ActivationSpec, ConfigError, SAEConfig
from sae_pipeline.corpus import read_corpus
from sae_pipeline.defs.assets import activations, features, sae
from sae_pipeline.model import HookPoint, capture_hooks, load_model, load_tokenizer, transformer_blocks, validate_layer
from sae_pipeline.spec_errors import parse_sae_config, parse_spec
from sae_pipeline.store import ActivationStore, store_of_hook
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

RESID = "blocks.2.hook_resid_post"
MLP_OUT = "blocks.2.hook_mlp_out"


def test_hook_names_are_checked_as_the_spec_is_read() -> None:
    assert ActivationSpec(hooks=[MLP_OUT]).hook_names() == [MLP_OUT]
    assert ActivationSpec(layer=4).hook_names() == ["blocks.4.hook_resid_post"]
    bad = {"hooks": ["blocks.2.mlp_out"]}
    with pytest.raises(ConfigError, match=r"hooks: .*'blocks\.2\.mlp_out' unknown; allowed blocks\.\{L\}\."
                                          r"\(hook_resid_pre\|hook_resid_post\|hook_attn_out\|hook_mlp_in\|hook_mlp_out\)"):
        parse_spec(ActivationSpec, bad, where="activations config")
    with pytest.raises(ConfigError, match="hooks: .*give one or more distinct hook names"):
        parse_spec(ActivationSpec, {"hooks": [MLP_OUT, MLP_OUT]}, where="activations config")
    with pytest.raises(ConfigError, match=r"layer: 4 beside hooks \['blocks\.2\.hook_mlp_out'\]; give the hooks alone"):
        parse_spec(ActivationSpec, {"hooks": [MLP_OUT], "layer": 4}, where="activations config")
    with pytest.raises(ConfigError, match=r"hook: .*'mlp_out' unknown"):
        parse_sae_config({"k": 8, "hook": "mlp_out"})
    assert SAEConfig(k=8, hook=MLP_OUT).partition_key().endswith("_at-blocks.2.hook_mlp_out")


def test_a_hook_the_model_lacks_is_refused_from_its_config_alone() -> None:
    assert validate_layer(ActivationSpec(hooks=[RESID, MLP_OUT])) == 384
    with pytest.raises(ConfigError, match=r"hook: 'blocks\.6\.hook_mlp_out' is not in model type 'bert'; allowed "
                                          r"blocks\.\{0\.\.5\}\."):
        validate_layer(ActivationSpec(hooks=[RESID, "blocks.6.hook_mlp_out"]))


def test_one_pass_fills_each_hooks_store_at_the_same_tokens(pipeline: Pipeline, tmp_path: Path) -> None:
    from sae_pipeline.activations import extract_activations

    spec = ActivationSpec(hooks=[RESID, MLP_OUT], shard_tokens=1024, batch_size=64)
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    corpus = read_corpus(pipeline.layout)
    passes = []
    handle = transformer_blocks(model)[0].register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        metas = extract_activations(corpus, model, tokenizer, spec, tmp_path, spec.model)
    finally:
        handle.remove()
    assert len(passes) == -(-len(corpus) // 64) + 1  # one pass per batch of each split (the last split's rest)
    assert [m["hook_name"] for m in metas] == [RESID, MLP_OUT] and all(m["hooks"] == [RESID, MLP_OUT] for m in metas)
    folders = [store_of_hook(tmp_path, None), store_of_hook(tmp_path, MLP_OUT)]
    assert folders == [tmp_path, tmp_path / "hooks" / MLP_OUT] and store_of_hook(tmp_path, RESID) == tmp_path
    with pytest.raises(ConfigError, match=r"hook: 'blocks\.1\.hook_mlp_out' has no activation store; the "
                                          r"activations hold blocks\.2\.hook_resid_post, blocks\.2\.hook_mlp_out"):
        store_of_hook(tmp_path, "blocks.1.hook_mlp_out")
    shards = [load_file(str(folder / meta["train_shards"][0]["file"]))
              for folder, meta in zip(folders, metas, strict=True)]
    assert torch.equal(shards[0]["locations"], shards[1]["locations"])
    by_seq = {row["seq_id"]: row["input_ids"] for row in corpus.iter_rows(named=True)}
    hooks = [HookPoint.parse(RESID), HookPoint.parse(MLP_OUT)]
    for row in (0, 7, 300):  # one sequence at a time, unpadded: the batched extraction must agree
        seq_id, position = (int(v) for v in shards[0]["locations"][row])
        ids = torch.tensor([by_seq[seq_id]])
        alone = capture_hooks(model, hooks, ids, torch.ones_like(ids))
        for shard, hook in zip(shards, hooks, strict=True):
            assert torch.allclose(shard["activations"][row], alone[hook][0, position], atol=1e-4)
    assert not torch.allclose(shards[0]["activations"], shards[1]["activations"])


def test_each_sae_reads_its_hooks_store_and_is_saved_and_spliced_there(pipeline: Pipeline, tmp_path: Path) -> None:
    shutil.copytree(pipeline.root / "corpus", tmp_path / "corpus")
    pipe = Pipeline(tmp_path, dg.DagsterInstance.ephemeral())
    run_config = {"ops": {"activations": {"config": {"shard_tokens": 1024, "hooks": [RESID, MLP_OUT]}}}}
    result = pipe.materialize([activations], run_config=run_config)
    assert result.success
    finite = next(e for e in result.get_asset_check_evaluations() if e.check_name == "activations_finite")
    assert finite.passed and RESID in finite.description and MLP_OUT in finite.description
    lineage = json.loads((pipe.layout.activations_dir / "lineage.json").read_text())
    assert lineage["hooks"] == [RESID, MLP_OUT]
    for hook in (None, MLP_OUT):
        key = pipe.register(tiny_topk(hook=hook))
        assert pipe.materialize([sae, features], partition_key=key).success
        cfg = json.loads((pipe.layout.sae_dir(key) / "cfg.json").read_text())
        read = hook or RESID
        assert cfg["hook_name"] == read and cfg["metadata"]["hook_name"] == read
        summary = json.loads((pipe.layout.sae_dir(key) / "summary.json").read_text())
        store = ActivationStore(store_of_hook(pipe.layout.activations_dir, hook))
        assert summary["metrics"]["n_tokens"] == store.n_tokens("eval")
        assert 0 < summary["downstream"]["recovered"] <= 1.0 + 1e-6  # spliced back at its own hook
    missing = pipe.register(tiny_topk(hook="blocks.1.hook_attn_out"))
    refused = pipe.materialize([sae], partition_key=missing)
    failure = next(e for e in refused.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert not refused.success and (f"{missing}: hook: 'blocks.1.hook_attn_out' has no activation store; the "
                                    f"activations hold {RESID}, {MLP_OUT}") in failure.step_failure_data.error.message
