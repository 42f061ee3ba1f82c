"""The whole graph on a tiny slice of the embedded model and corpus, on CPU, through Dagster."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.assets import feature_labels, features, sae, sweep_analysis
from sae_pipeline.eval_tasks import TASKS_FILE, TaskData, TaskEvaluator
from sae_pipeline.evaluation import TASK_METRICS
from sae_pipeline.markdown import round_significant
from sae_pipeline.saes import load_sae
from sae_pipeline.storage import CORPUS_FILE
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

SAE_METADATA_KEYS = {"l0", "l0_fraction", "dead_fraction", "dense_fraction", "frequent_fraction", "fvu",
                     "explained_variance", "mse", "train_tokens", "wall_time", "weights_dir", "training_curves",
                     "cosine", "l2_ratio", "relative_reconstruction_bias", "decoder_max_cosine_mean",
                     "decoder_max_cosine_max", "downstream_kind", "downstream_spliced", "downstream_ablated",
                     "downstream_recovered", "feature_density", "resumed_from_step", *TASK_METRICS}


def _metadata(result: dg.ExecuteInProcessResult, node: str) -> dict:
    (event,) = result.asset_materializations_for_node(node)
    return {name: value.value for name, value in event.metadata.items()}


def _check_evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _eval_activations(pipeline: Pipeline) -> torch.Tensor:
    folder = pipeline.layout.activations_dir
    meta = json.loads((folder / "meta.json").read_text())
    return torch.cat([load_file(str(folder / s["file"]))["activations"] for s in meta["eval_shards"]])


def test_activations_are_real_and_held_out(pipeline: Pipeline) -> None:
    folder = pipeline.layout.activations_dir
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["d_model"] == 384 and meta["layer"] == 3
    eval_acts = _eval_activations(pipeline)
    train = torch.cat([load_file(str(folder / s["file"]))["activations"] for s in meta["train_shards"]])
    assert train.shape == (meta["n_train_tokens"], 384) and eval_acts.shape == (meta["n_eval_tokens"], 384)
    assert torch.isfinite(train).all() and torch.isfinite(eval_acts).all()
    assert train.norm(dim=-1).std() > 0  # real activations vary
    eval_seqs = {int(s) for s in load_file(str(folder / meta["eval_shards"][0]["file"]))["locations"][:, 0]}
    train_seqs = {int(s) for sh in meta["train_shards"]
                  for s in load_file(str(folder / sh["file"]))["locations"][:, 0]}
    assert eval_seqs and not eval_seqs & train_seqs  # whole sequences held out
    corpus_frame = pl.read_parquet(pipeline.layout.corpus_dir / CORPUS_FILE)
    assert len(corpus_frame) == 160 and corpus_frame["input_ids"].list.len().max() <= 48


def _independent_metrics(weights: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """TopK SAE forward and metrics written out in plain torch, float64."""
    w = {name: t.double() for name, t in weights.items()}
    x = x.double()
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    values, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, values)
    x_hat = z @ w["W_dec"] + w["b_dec"]
    active = (z > 0).double()
    frequency = active.mean(dim=0)
    fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum()
    return {"l0": active.sum(dim=-1).mean().item(), "l0_fraction": active.sum(dim=-1).mean().item() / z.shape[1],
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > 0.1).double().mean().item(), "fvu": fvu.item(),
            "explained_variance": 1 - fvu.item(), "mse": ((x_hat - x) ** 2).mean().item()}


def test_healthy_partition_end_to_end(pipeline: Pipeline) -> None:
    cfg = tiny_topk()
    key = pipeline.register(cfg)
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    meta = _metadata(result, "sae")
    assert set(meta) == SAE_METADATA_KEYS
    folder = pipeline.layout.sae_dir(key)
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (384, 768) and weights["W_dec"].shape == (768, 384)
    expected = _independent_metrics(weights, _eval_activations(pipeline), cfg.k)
    summary = json.loads((folder / "summary.json").read_text())["metrics"]
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name  # full precision on disk
        assert meta[name] == round_significant(summary[name], 4), name  # what a reader needs in the UI
    assert meta["train_tokens"] == cfg.train_tokens
    assert meta["fvu"] < 1.0  # it learned something real
    assert meta["downstream_kind"] == "encoder"  # MiniLM: cosine of pooled sentence embeddings
    assert meta["downstream_ablated"] < meta["downstream_spliced"] <= 1.0 + 1e-6
    tasks = json.loads((folder / "summary.json").read_text())["tasks"]
    store = pipeline.layout.activations_dir
    again = TaskEvaluator(TaskData.load(store / TASKS_FILE)).evaluate(load_sae(folder)).metrics.as_dict()
    assert tasks == pytest.approx(again)  # the figures on disk are those of the published weights
    for name in TASK_METRICS:
        assert meta[name] == round_significant(tasks[name], 4), name
    assert 0.0 <= tasks["absorption_rate"] <= 1.0 and 0.5 < tasks["probe_acc_dense"] <= 1.0
    details = json.loads((folder / "evals.json").read_text())
    assert {letter["letter"] for letter in details["absorption"]["letters"]} <= set("abcdefghijklmnopqrstuvwxyz")
    assert {"doctest", "first_letter_a"} <= set(details["probing"])
    assert not [e.check_name for e in _check_evaluations(result).values()
                if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR]

    table = pl.read_parquet(pipeline.layout.features_dir(key) / "features.parquet")
    assert len(table) == 768 and table["is_live"].sum() > 0
    live = table.filter(pl.col("is_live"))
    assert (live["top_contexts"].list.len() > 0).all()
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / "labels.parquet")
    assert len(labels) == len(live) and labels["label"].str.len_chars().min() > 0


def test_collapsed_sae_fails_collapse_check_and_gets_no_labels(pipeline: Pipeline) -> None:
    collapsed = SAEConfig(architecture="relu", expansion_factor=2, l1_alpha=100.0, lr=0.05, batch_size=256,
                          train_tokens=256 * 60, log_every=10, dead_tokens=256 * 20)
    key = pipeline.register(collapsed)
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    checks = _check_evaluations(result)
    assert not checks["sae_not_collapsed"].passed
    assert checks["sae_not_collapsed"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["sae_not_collapsed"].metadata["collapsed_at_step"].value > 0
    assert not result.asset_materializations_for_node("feature_labels")
    assert not pipeline.layout.labels_dir(key).exists()

    alone = pipeline.materialize([feature_labels], partition_key=key)  # a separate run must refuse too
    assert not alone.success
    failure = next(e for e in alone.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "Refusing to label" in failure.step_failure_data.error.message
    assert not pipeline.layout.labels_dir(key).exists()


def test_sweep_analysis_reports_finished_and_missing(pipeline: Pipeline) -> None:
    key = pipeline.register(tiny_topk(k=4))
    pipeline.instance.add_dynamic_partitions("sae_configs", ["topk_exp2_k99_never_run"])
    assert pipeline.materialize([sae], partition_key=key).success
    result = pipeline.materialize([sweep_analysis])
    assert result.success
    report = _metadata(result, "sweep_analysis")["report_path"]
    text = Path(report).read_text()
    assert key in text and "topk_exp2_k99_never_run" in text
