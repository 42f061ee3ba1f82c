"""Planted faults, each materialised through Dagster on CPU: the right check fails with ERROR, nothing of the
partition is labelled in that run, and `feature_labels` launched alone in a second run refuses it too.
A healthy control passes every check (WARNs included) and is labelled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_pipeline.activations as activations_module
import sae_pipeline.defs.assets.training as training_assets
from sae_pipeline import quality
from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.assets import activations, feature_labels, features, sae
from sae_pipeline.training import train_group
from sae_pipeline_tests.conftest import TINY_RUN_CONFIG, Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEALTHY = {"architecture": "topk", "expansion_factor": 1, "k": 12, "lr": 3e-3, "batch_size": 256,
           "train_tokens": 256 * 120, "log_every": 10, "dead_tokens": 256 * 20, "target_l0": 0.03}
"""Measured on the tiny store: dead 0 %, dense ~2 %, FVU ~0.42, L0 = 12/384 = 3.1 % (inside 0.6-1.4 x 3 %)."""


def healthy(**overrides) -> SAEConfig:
    return SAEConfig(**{**HEALTHY, **overrides})


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def failure_messages(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(e.step_failure_data.error.message for e in result.all_events
                     if e.event_type == dg.DagsterEventType.STEP_FAILURE)


def _eval_activations(folder: Path) -> torch.Tensor:
    meta = json.loads((folder / "meta.json").read_text())
    return torch.cat([load_file(str(folder / s["file"]))["activations"] for s in meta["eval_shards"]])


def assert_faulty(pipe: Pipeline, key: str, result: dg.ExecuteInProcessResult, check: str) -> dg.AssetCheckEvaluation:
    """`check` failed with ERROR, no labels in this run, and a second run of feature_labels alone refuses."""
    evaluation = evaluations(result)[check]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["verdict"].value == "failed (ERROR)"
    assert not result.asset_materializations_for_node("feature_labels")
    assert not pipe.layout.labels_dir(key).exists()
    alone = pipe.materialize([feature_labels], partition_key=key)
    assert not alone.success
    message = failure_messages(alone)
    assert "Refusing to label" in message and check in message
    assert not pipe.layout.labels_dir(key).exists()
    return evaluation


def test_healthy_control_passes_every_check_and_is_labelled(pipeline: Pipeline) -> None:
    key = pipeline.register(healthy())
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    checks = evaluations(result)
    expected = {"sae_finite_weights", "sae_not_collapsed", "sae_dead_fraction", "sae_dense_fraction",
                "sae_l0_in_target_band", "sae_fvu", "sae_l0_trend", "features_not_near_zero", "features_table_valid"}
    assert set(checks) == expected
    assert all(e.passed for e in checks.values()), {n: e.description for n, e in checks.items() if not e.passed}
    band = checks["sae_l0_in_target_band"].metadata
    assert band["l0_fraction"].value == pytest.approx(12 / 384, rel=1e-6)  # TopK: exactly k of d_sae fire
    assert band["warn_band"].value == pytest.approx([0.6 * 0.03, 1.4 * 0.03])
    table = pl.read_parquet(pipeline.layout.features_dir(key) / "features.parquet")
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert len(labels) == int(table["is_live"].sum()) > 0
    upstream = json.loads((pipeline.layout.activations_dir / "quality.json").read_text())["checks"]
    assert all(check["passed"] for check in upstream.values()), upstream  # real text: few identical token rows
    assert "activations_duplicates" in upstream
    verdict = json.loads((pipeline.layout.sae_dir(key) / "quality.json").read_text())
    assert verdict["blocked"] is False and set(verdict["checks"]) == expected - {"features_not_near_zero",
                                                                                  "features_table_valid"}


def test_nan_activations_fail_finite_check_and_block_everything_downstream(
        pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    shutil.copytree(pipeline.layout.corpus_dir, pipe.layout.corpus_dir)
    original = activations_module.hook_activations

    def poisoned(model, hooks, input_ids, mask):  # a model whose hooked layer overflows on the first row's token 1
        captured = {hook: acts.clone() for hook, acts in original(model, hooks, input_ids, mask).items()}
        for acts in captured.values():
            acts[0, 1, :5] = float("nan")
        return captured

    monkeypatch.setattr(activations_module, "hook_activations", poisoned)
    key = pipe.register(healthy())
    result = pipe.materialize([activations, sae, features, feature_labels], partition_key=key,
                              run_config={"ops": {"activations": TINY_RUN_CONFIG["ops"]["activations"]}})
    folder = pipe.layout.activations_dir
    meta = json.loads((folder / "meta.json").read_text())
    stored = [load_file(str(folder / s["file"]))["activations"] for s in meta["train_shards"] + meta["eval_shards"]]
    n_nonfinite = sum(int((~torch.isfinite(x).all(dim=-1)).sum()) for x in stored)
    assert n_nonfinite > 0
    evaluation = assert_faulty(pipe, key, result, "activations_finite")
    assert evaluation.metadata["n_nonfinite_tokens"].value == n_nonfinite
    assert not result.asset_materializations_for_node("sae")  # blocked in the same run
    assert not pipe.layout.sae_dir(key).exists()
    again = pipe.materialize([sae], partition_key=key)  # and in a later run
    assert not again.success and "activations_finite" in failure_messages(again)
    assert not pipe.layout.sae_dir(key).exists()


def test_sink_vector_on_30_percent_of_tokens_fails_duplicates_check_and_blocks_downstream(
        pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    shutil.copytree(pipeline.layout.corpus_dir, pipe.layout.corpus_dir)
    original = activations_module.hook_activations

    def sink(model, hooks, input_ids, mask):  # every 10th position of 3 is one fixed vector at the row's norm
        captured = {hook: acts.clone() for hook, acts in original(model, hooks, input_ids, mask).items()}
        for acts in captured.values():
            positions = torch.arange(acts.shape[1]) % 10 < 3
            vector = torch.ones(acts.shape[-1]).index_fill_(0, torch.arange(0, acts.shape[-1], 2), -1.0)
            acts[:, positions] = vector * acts.norm(dim=-1).median() / vector.norm()
        return captured

    monkeypatch.setattr(activations_module, "hook_activations", sink)
    key = pipe.register(healthy())
    result = pipe.materialize([activations, sae, features, feature_labels], partition_key=key,
                              run_config={"ops": {"activations": TINY_RUN_CONFIG["ops"]["activations"]}})
    checks = evaluations(result)
    assert checks["activations_not_degenerate"].passed and checks["activations_norm_outliers"].passed
    evaluation = assert_faulty(pipe, key, result, "activations_duplicates")
    assert evaluation.metadata["duplicate_row_fraction"].value > 0.2
    positions = evaluation.metadata["duplicate_positions"].value
    assert positions and all(p["position"] % 10 < 3 for p in positions)
    assert not pipe.layout.sae_dir(key).exists()


def test_sae_collapsed_mid_run_fails_collapse_check_naming_the_step(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def collapsing(*args, **kwargs):  # real training, then a planted trajectory: 95 % dead from step 70 on
        (result,) = train_group(*args, **kwargs)
        result.metrics = result.metrics.with_columns(
            dead_fraction=pl.when(pl.col("step") >= 70).then(0.95).otherwise(pl.col("dead_fraction")))
        return [result]

    monkeypatch.setattr(training_assets, "train_group", collapsing)
    key = pipeline.register(healthy(seed=1))
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    evaluation = assert_faulty(pipeline, key, result, "sae_not_collapsed")
    assert evaluation.metadata["collapsed_at_step"].value == 70
    assert "collapsed at step 70" in evaluation.description
    assert not result.asset_materializations_for_node("features")


def test_all_dead_sae_fails_dead_fraction_check(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args, **kwargs):  # an encoder bias so negative that no latent can fire on any token
        (result,) = train_group(*args, **kwargs)
        with torch.no_grad():
            result.sae.b_enc.fill_(-1e4)
        return [result]

    monkeypatch.setattr(training_assets, "train_group", killed)
    key = pipeline.register(healthy(seed=2))
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    evaluation = assert_faulty(pipeline, key, result, "sae_dead_fraction")
    weights = load_file(str(pipeline.layout.sae_dir(key) / "sae_weights.safetensors"))
    x = _eval_activations(pipeline.layout.activations_dir).double()
    pre = (x - weights["b_dec"].double()) @ weights["W_enc"].double() + weights["b_enc"].double()
    assert int((pre > 0).any(dim=0).sum()) == 0  # independently: no latent fires on any held-out token
    assert evaluation.metadata["dead_fraction"].value == 1.0
    assert evaluation.metadata["error_above"].value == 0.9


def test_features_with_1e_16_maxima_fail_near_zero_check(pipeline: Pipeline) -> None:
    key = pipeline.register(healthy(seed=3))
    assert pipeline.materialize([sae], partition_key=key).success
    path = pipeline.layout.sae_dir(key) / "sae_weights.safetensors"
    weights = load_file(str(path))
    weights["W_enc"] = weights["W_enc"] * 1e-16
    weights["b_enc"] = weights["b_enc"] * 1e-16
    save_file(weights, str(path))  # seed 003: a broken SAE whose activations are ~1e-16
    x = _eval_activations(pipeline.layout.activations_dir).double()
    pre = (x - weights["b_dec"].double()) @ weights["W_enc"].double() + weights["b_enc"].double()
    assert 0 < pre.max().item() < 1e-6  # independently: it fires, but only with meaningless values

    result = pipeline.materialize([features, feature_labels], partition_key=key)
    evaluation = assert_faulty(pipeline, key, result, "features_not_near_zero")
    assert evaluation.metadata["share_not_live"].value == 1.0
    assert evaluation.metadata["live_threshold"].value == 1e-6
    assert evaluations(result)["features_table_valid"].passed  # the table itself is well formed


def test_refused_relabel_withdraws_the_previous_labels(pipeline: Pipeline) -> None:
    key = pipeline.register(healthy(seed=5))
    assert pipeline.materialize([sae, features, feature_labels], partition_key=key).success
    labels_dir = pipeline.layout.labels_dir(key)
    assert (labels_dir / "labels.parquet").exists()
    # the SAE is re-evaluated and now fails a blocking check: its old labels describe features that do not pass
    quality.write_verdict(pipeline.layout.sae_dir(key), [quality.CheckOutcome(
        "sae_not_collapsed", False, "ERROR", "collapsed at step 70")])
    refused = pipeline.materialize([feature_labels], partition_key=key)
    assert not refused.success and "previous labels are withdrawn" in failure_messages(refused)
    assert sorted(p.name for p in labels_dir.iterdir()) == ["withdrawn.json"]
    assert json.loads((labels_dir / "withdrawn.json").read_text())["reasons"] == [
        "sae_not_collapsed: collapsed at step 70"]
    latest = pipeline.instance.get_latest_materialization_event(dg.AssetKey("feature_labels"))
    assert latest.run_id == refused.run_id and latest.asset_materialization.partition == key
    assert latest.asset_materialization.metadata["status"].value == "withdrawn"
