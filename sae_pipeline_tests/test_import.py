"""Importing an SAE trained elsewhere: each layout and architecture read back to the latents its own formula
gives, the refusals, and re-imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_pipeline.config import ConfigError
from sae_pipeline.sae_import import (
    IMPORT_FILE,
    import_sae,
    imported_key,
    imported_record,
    load_imported,
    read_foreign_sae,
)
from sae_pipeline.storage import Layout

D_IN, D_SAE = 8, 24
META = {"d_model": D_IN, "model": "tiny-model", "hook_name": "blocks.1.hook_resid_post", "layer": 1}


def _activations(root: Path, meta: dict) -> Path:
    """An activations folder with only its meta.json (what the import reads)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _tensors(seed: int = 0, **extra: tuple[int, ...]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,), "b_dec": (D_IN,), **extra}
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def _saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **cfg}))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


X = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(9))


def test_standard_sae_without_b_dec_on_the_input(tmp_path: Path) -> None:
    t = _tensors()
    folder = _saelens(tmp_path / "relu", {"architecture": "standard", "apply_b_dec_to_input": False,
                                          "normalize_activations": "none"}, t)
    sae, fmt, _ = read_foreign_sae(folder)
    assert fmt == "saelens" and sae.architecture == "relu"
    expected = torch.relu(X @ t["W_enc"] + t["b_enc"])  # SAELens: b_dec is not subtracted from the input
    assert torch.allclose(sae.latents(X), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), expected @ t["W_dec"] + t["b_dec"], atol=1e-5)


def test_topk_and_jumprelu_follow_their_formulas(tmp_path: Path) -> None:
    t = _tensors(1)
    topk, _, _ = read_foreign_sae(_saelens(tmp_path / "topk", {"architecture": "standard", "activation_fn": "topk",
                                                               "activation_fn_kwargs": {"k": 3}}, t))
    pre = torch.relu((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    values, indices = pre.topk(3, dim=1)
    assert torch.allclose(topk.latents(X), torch.zeros_like(pre).scatter(1, indices, values), atol=1e-5)
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2))
    jump, _, _ = read_foreign_sae(_saelens(tmp_path / "jump", {"architecture": "jumprelu"},
                                           {**t, "threshold": threshold}))
    pre = (X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(jump.latents(X), pre * (pre > threshold), atol=1e-5)


def test_gated_folds_b_dec_into_both_paths(tmp_path: Path) -> None:
    t = _tensors(3, b_gate=(D_SAE,), r_mag=(D_SAE,), b_mag=(D_SAE,))
    del t["b_enc"]
    gated, _, _ = read_foreign_sae(_saelens(tmp_path / "gated", {"architecture": "gated",
                                                                 "apply_b_dec_to_input": False}, t))
    projected = X @ t["W_enc"]
    expected = ((projected + t["b_gate"]) > 0) * torch.relu(projected * t["r_mag"].exp() + t["b_mag"])
    assert torch.allclose(gated.latents(X), expected, atol=1e-5)


def test_sparsify_checkpoint(tmp_path: Path) -> None:
    t = _tensors(4)
    folder = tmp_path / "layers.1"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "num_latents": 0, "k": 4, "d_in": D_IN,
                                                 "normalize_decoder": True, "multi_topk": False,
                                                 "skip_connection": False}))
    save_file({"encoder.weight": t["W_enc"].t().contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(folder / "sae.safetensors"))
    sae, fmt, _ = read_foreign_sae(folder)
    assert fmt == "sparsify" and sae.k == 4
    pre = torch.relu((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"])  # sparsify: encoder(x - b_dec), relu, top-k
    values, indices = pre.topk(4, dim=1)
    assert torch.allclose(sae.latents(X), torch.zeros_like(pre).scatter(1, indices, values), atol=1e-5)
    (folder / "cfg.json").write_text(json.dumps({"k": 4, "d_in": D_IN, "transcode": True}))
    with pytest.raises(ConfigError, match="transcode"):
        read_foreign_sae(folder)


@pytest.mark.parametrize(("cfg", "meta", "message"), [
    ({"architecture": "standard"}, {**META, "d_model": 16}, "d_in = 8, the activation store holds d_model = 16"),
    ({"architecture": "standard", "model_name": "gpt2"}, META, "model 'gpt2', the activation store is of "
                                                               "'tiny-model'"),
    ({"architecture": "standard", "metadata": {"hook_name": "blocks.0.hook_mlp_out"}}, META,
     "hook 'blocks.0.hook_mlp_out', the activation store is at 'blocks.1.hook_resid_post'"),
    ({"architecture": "crosscoder"}, META, "architecture 'crosscoder' cannot be imported"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, META, "normalize_activations"),
])
def test_refusals_name_both_sides(tmp_path: Path, cfg: dict, meta: dict, message: str) -> None:
    folder = _saelens(tmp_path / "sae", cfg, _tensors())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_sae(Layout(tmp_path / "root"), folder, "x", _activations(tmp_path / "acts", meta))
    assert not (tmp_path / "root" / "imports").exists() or not any((tmp_path / "root" / "imports").iterdir())


def test_a_folder_without_an_sae(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no cfg.json"):
        read_foreign_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(ConfigError, match="neither sae_weights.safetensors"):
        read_foreign_sae(tmp_path)


def test_import_keeps_the_sae_and_reimports_idempotently(tmp_path: Path) -> None:
    layout, acts = Layout(tmp_path / "root"), _activations(tmp_path / "acts", META)
    folder = _saelens(tmp_path / "my sae!", {"architecture": "standard", "model_name": "tiny-model"}, _tensors())
    record = import_sae(layout, folder, None, acts)
    assert record.key == imported_key("my sae!") == "imported_my-sae"
    assert imported_record(layout, record.key) == record
    assert json.loads((layout.root / "imports" / record.key / IMPORT_FILE).read_text())["format"] == "saelens"
    original, _, _ = read_foreign_sae(folder)
    assert torch.allclose(load_imported(layout, record.key).latents(X), original.latents(X))
    assert import_sae(layout, folder, None, acts) == record  # same weights, same name: nothing changes
    other = _saelens(tmp_path / "other", {"architecture": "standard"}, _tensors(seed=5))
    with pytest.raises(ConfigError, match="already imported .* give another --name"):
        import_sae(layout, other, "my sae!", acts)
    assert imported_record(layout, record.key) == record
    assert imported_record(layout, "topk_exp4_k16") is None
    assert record.store_hook is None  # its cfg names no hook: the first store


def test_the_store_of_the_named_hook_is_chosen(tmp_path: Path) -> None:
    acts = _activations(tmp_path / "acts", {**META, "hooks": ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]})
    _activations(acts / "hooks" / "blocks.0.hook_mlp_out", {**META, "hook_name": "blocks.0.hook_mlp_out"})
    folder = _saelens(tmp_path / "mlp", {"architecture": "standard", "hook_name": "blocks.0.hook_mlp_out"},
                      _tensors())
    record = import_sae(Layout(tmp_path / "root"), folder, None, acts)
    assert record.store_hook == record.hook_name == "blocks.0.hook_mlp_out"


def _as_saelens_without_b_dec_on_input(folder: Path, out: Path) -> Path:
    """A trained TopK partition rewritten as SAELens writes a TopK SAE that encodes x itself
    (`apply_b_dec_to_input: false`, its b_enc holding what subtracting b_dec did), naming model and hook."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    return _saelens(out, {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "architecture": "topk", "k": cfg["k"],
                          "apply_b_dec_to_input": False, "normalize_activations": "none",
                          "metadata": {"model_name": cfg["model_name"], "hook_name": cfg["hook_name"]}}, tensors)


def test_an_imported_copy_is_evaluated_featured_and_labelled(pipeline, tmp_path: Path) -> None:
    import polars as pl

    from sae_pipeline.defs.assets import feature_labels, features, sae, sweep_analysis
    from sae_pipeline_tests.conftest import tiny_topk

    layout = pipeline.layout
    trained = pipeline.register(tiny_topk(k=6))
    assert pipeline.materialize([sae], partition_key=trained).success
    copy = _as_saelens_without_b_dec_on_input(layout.sae_dir(trained), tmp_path / "copy")
    record = import_sae(layout, copy, "copy_of_tiny", layout.activations_dir)
    assert record.format == "saelens" and record.store_hook == record.hook_name
    pipeline.instance.add_dynamic_partitions("sae_configs", [record.key])
    result = pipeline.materialize([sae, features, feature_labels], partition_key=record.key)
    assert result.success
    original = json.loads((layout.sae_dir(trained) / "summary.json").read_text())
    summary = json.loads((layout.sae_dir(record.key) / "summary.json").read_text())
    for name in ("fvu", "l0", "dead_fraction", "cosine"):  # the same weights on the same held-out tokens
        assert summary["metrics"][name] == pytest.approx(original["metrics"][name], rel=1e-6), name
    assert summary["tasks"]["probe_acc_k5"] == pytest.approx(original["tasks"]["probe_acc_k5"])
    assert summary["imported"]["source"] == str(copy) and summary["train_tokens"] == 0
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["sae_not_collapsed"].passed and not checks["sae_not_collapsed"].metadata["applicable"].value
    assert checks["sae_fvu"].metadata["fvu"].value == pytest.approx(original["metrics"]["fvu"], rel=1e-3)
    assert pl.read_parquet(layout.features_dir(record.key) / "features.parquet").height == record.d_sae
    assert (layout.labels_dir(record.key) / "labels.parquet").exists()
    report = pipeline.materialize([sweep_analysis])
    text = (layout.analysis_dir / "report.md").read_text()
    assert report.success and f"`{record.key}` (imported)" in text and f"`{trained}`" in text


@torch.no_grad()
def test_a_checkpoint_written_by_sparsify_imports_to_what_sparsify_computes(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (the `bench` extra)")
    theirs = sparsify.Sae(D_IN, sparsify.SaeConfig(expansion_factor=3, k=4))
    generator = torch.Generator().manual_seed(1)
    for parameter in theirs.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    theirs.save_to_disk(tmp_path / "layers.1")
    ours, fmt, _ = read_foreign_sae(tmp_path / "layers.1")
    encoded = theirs.encode(X)
    dense = torch.zeros(len(X), theirs.num_latents).scatter(1, encoded.top_indices, encoded.top_acts)
    assert fmt == "sparsify" and torch.allclose(ours.latents(X), dense, atol=1e-5)
