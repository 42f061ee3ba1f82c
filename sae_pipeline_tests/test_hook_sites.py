"""Activations read at a chosen hook site (`activations.hook`): the name is checked before any compute, the store
holds that site's activations and names it, and an SAE trained on it is saved and spliced back at that site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.config import ActivationSpec, ConfigError, parse_spec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.defs.assets import activations, sae
from sae_pipeline.model import HookPoint, capture_hooks, load_model, load_tokenizer, validate_layer
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

MLP_OUT = "blocks.2.hook_mlp_out"


def test_a_hook_name_is_checked_as_the_spec_is_read() -> None:
    assert ActivationSpec(hook=MLP_OUT).hook_name() == MLP_OUT
    assert ActivationSpec(layer=4).hook_name() == "blocks.4.hook_resid_post"
    with pytest.raises(ConfigError, match=r"hook: .*'blocks\.2\.mlp_out' unknown; allowed blocks\.\{L\}\."
                                          r"\(hook_resid_pre\|hook_resid_post\|hook_attn_out\|hook_mlp_in\|hook_mlp_out\)"):
        parse_spec(ActivationSpec, {"hook": "blocks.2.mlp_out"}, where="activations config")
    with pytest.raises(ConfigError, match=r"layer: 4 is not the block of hook 'blocks\.2\.hook_mlp_out'"):
        parse_spec(ActivationSpec, {"hook": "blocks.2.hook_mlp_out", "layer": 4}, where="activations config")


def test_a_hook_the_model_lacks_is_refused_from_its_config_alone() -> None:
    assert validate_layer(ActivationSpec(hook=MLP_OUT)) == 384
    with pytest.raises(ConfigError, match=r"hook: 'blocks\.6\.hook_mlp_out' is not in model type 'bert'; allowed "
                                          r"blocks\.\{0\.\.5\}\."):
        validate_layer(ActivationSpec(hook="blocks.6.hook_mlp_out"))


def test_the_store_holds_the_hooks_activations_at_their_locations(pipeline: Pipeline, tmp_path: Path) -> None:
    from sae_pipeline.activations import extract_activations

    spec = ActivationSpec(hook=MLP_OUT, shard_tokens=1024)
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    corpus = read_corpus(pipeline.layout)
    meta = extract_activations(corpus, model, tokenizer, spec, tmp_path, spec.model)
    assert (meta["hook_name"], meta["layer"]) == (MLP_OUT, 2) and "MLP output" in meta["hook"]
    shard = load_file(str(tmp_path / meta["train_shards"][0]["file"]))
    by_seq = {row["seq_id"]: row["input_ids"] for row in corpus.iter_rows(named=True)}
    for row in (0, 7, 300):  # one sequence at a time, unpadded: the batched extraction must agree
        seq_id, position = (int(v) for v in shard["locations"][row])
        ids = torch.tensor([by_seq[seq_id]])
        (alone,) = capture_hooks(model, [HookPoint.parse(MLP_OUT)], ids, torch.ones_like(ids)).values()
        assert torch.allclose(shard["activations"][row], alone[0, position], atol=1e-4)


def test_an_sae_on_a_hook_site_is_saved_and_spliced_back_there(pipeline: Pipeline, tmp_path: Path) -> None:
    shutil.copytree(pipeline.root / "corpus", tmp_path / "corpus")
    pipe = Pipeline(tmp_path, dg.DagsterInstance.ephemeral())
    run_config = {"ops": {"activations": {"config": {"shard_tokens": 1024, "hook": MLP_OUT}}}}
    assert pipe.materialize([activations], run_config=run_config).success
    key = pipe.register(tiny_topk())
    result = pipe.materialize([sae], partition_key=key)
    assert result.success
    cfg = json.loads((pipe.layout.sae_dir(key) / "cfg.json").read_text())
    assert cfg["hook_name"] == MLP_OUT and cfg["metadata"]["hook_name"] == MLP_OUT
    lineage = json.loads((pipe.layout.activations_dir / "lineage.json").read_text())
    assert lineage["hook_name"] == MLP_OUT
    summary = json.loads((pipe.layout.sae_dir(key) / "summary.json").read_text())
    assert 0 < summary["downstream"]["recovered"] <= 1.0 + 1e-6  # the encoder's output with the SAE spliced in
