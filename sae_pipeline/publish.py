"""Publishing one SAE, trained here or imported: evaluated on held-out tokens, checked, its downstream fidelity and
real-task figures measured, and its folder (SAELens weights and cfg.json, training log, summary, task details,
plots, verdict) written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from sae_pipeline import quality
from sae_pipeline.checks import SAEEvidence, run_checks
from sae_pipeline.config import ActivationSpec, SAEConfig
from sae_pipeline.corpus import read_corpus
from sae_pipeline.eval_tasks import TaskEvaluator, store_task_data
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.fidelity import measure_downstream
from sae_pipeline.markdown import format_duration, rounded
from sae_pipeline.model import HookPoint
from sae_pipeline.plots import feature_density_png, training_curves_png
from sae_pipeline.results import METRICS_FILE, SUMMARY_FILE
from sae_pipeline.sae_import import ImportRecord
from sae_pipeline.saes import SparseAutoencoder
from sae_pipeline.storage import Layout, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from sae_pipeline.store import ActivationStore
from sae_pipeline.sweep_stats import last_window_mean
from sae_pipeline.tracking import numeric
from sae_pipeline.training import METRIC_COLUMNS, TrainResult

TRAINING_CURVES = "training_curves"
EVALS_FILE = "evals.json"
"""The real-task evaluations in detail: each letter's absorption, each probing task's accuracies."""
FEATURE_DENSITY = "feature_density"


@dataclass
class PublishedSAE:
    """One partition's trained SAE, evaluated and published: its check outcomes, the values its materialisation
    shows, where its weights are, and its plots (PNG bytes by name)."""

    outcomes: list[quality.CheckOutcome]
    values: dict[str, Any]
    weights_dir: str
    plots: dict[str, bytes]
    evaluation: dict[str, float]
    """Every held-out metric and downstream figure, unrounded (what a tracker logs)."""

    @property
    def blocking_failures(self) -> list[str]:
        return [o.name for o in self.outcomes if o.blocks]


class StoreTasks:
    """The TaskEvaluator of each activation store a run publishes from, built on first use: the task data read
    from the store's folder, or built there once (`eval_tasks.store_task_data`)."""

    def __init__(self, layout: Layout, trust_remote_code: bool, device: str):
        self.layout, self.trust_remote_code, self.device = layout, trust_remote_code, device
        self._evaluators: dict[str, TaskEvaluator] = {}

    def of(self, store: ActivationStore) -> TaskEvaluator:
        folder = str(store.folder)
        if folder not in self._evaluators:
            spec = ActivationSpec(model=store.meta["model"], trust_remote_code=self.trust_remote_code)
            data = store_task_data(store.folder, store.meta, read_corpus(self.layout), spec, self.device)
            self._evaluators[folder] = TaskEvaluator(data)
        return self._evaluators[folder]


@dataclass(frozen=True)
class Provenance:
    """Where a published SAE comes from: a registered config trained here, or an SAE imported as it is."""

    config: dict[str, Any]
    """summary.json's `config`: the full config, or an import's hyperparameters (architecture, width, k)."""
    target_l0: float | None
    imported: ImportRecord | None = None

    @classmethod
    def trained(cls, cfg: SAEConfig) -> Provenance:
        return cls(cfg.model_dump(mode="json"), cfg.target_l0)

    @classmethod
    def of_import(cls, record: ImportRecord) -> Provenance:
        return cls(record.hyperparameters, None, record)


def imported_result(sae: SparseAutoencoder) -> TrainResult:
    """An imported SAE as the trainer would hand it over: no training log, no tokens, nothing folded."""
    return TrainResult(sae, pl.DataFrame(schema=dict.fromkeys(METRIC_COLUMNS, pl.Float64)), 0, 0.0, 0, 1.0)


def publish_sae(layout: Layout, key: str, origin: Provenance, store: ActivationStore, result: TrainResult,
                device: str, thresholds: quality.QualityThresholds, tasks: StoreTasks) -> PublishedSAE:
    """Evaluate an SAE (trained, or imported: `origin`) on held-out tokens and the real tasks, run its checks,
    publish its folder (weights, metrics, summary, task details, plots, verdict) and remove its checkpoints."""
    trained = origin.imported is None
    metrics, fire_counts = evaluate_sae(result.sae, store, device)
    result.sae.cpu()  # evaluate_sae moved it to `device`; the task probes and the downstream model run on the CPU
    task_evaluation = tasks.of(store).evaluate(result.sae)
    frequency = fire_counts / max(metrics.n_tokens, 1)
    outcomes = run_checks("sae", SAEEvidence(result.sae.state_dict(), result.metrics, result.sae.d_sae, metrics,
                                             frequency, origin.target_l0, result.sae.architecture, trained),
                          thresholds)
    model_spec = ActivationSpec(model=store.meta["model"], trust_remote_code=tasks.trust_remote_code)
    downstream = measure_downstream(result.sae, store.meta, read_corpus(layout), model_spec)
    plots = {TRAINING_CURVES: training_curves_png(result.metrics, key)} if trained else {}
    plots[FEATURE_DENSITY] = feature_density_png(frequency, key)
    summary = {"key": key, "config": origin.config, "metrics": metrics.as_dict(),
               "downstream": downstream.as_dict(), "tasks": task_evaluation.metrics.as_dict(),
               "final_loss": last_window_mean(result.metrics, "loss") if trained else None,
               "train_tokens": result.train_tokens, "wall_seconds": result.wall_seconds if trained else None,
               "resumed_from_step": result.resumed_from_step,
               **({"imported": origin.imported.as_dict()} if not trained else {})}
    with layout.publish(layout.sae_dir(key)) as folder:
        result.sae.save(folder, metadata={"partition_key": key, "model": store.meta["model"],
                                          "layer": store.meta["layer"], "hook": store.meta["hook"],
                                          "hook_name": HookPoint.of_store(store.meta).name,
                                          "dataset_scaling_factor_folded": result.scaling_factor,
                                          "sae_pipeline_config": origin.config,
                                          **({"imported_from": origin.imported.source} if not trained else {})})
        write_parquet_atomic(result.metrics, folder / METRICS_FILE)
        write_json_atomic(folder / SUMMARY_FILE, summary)
        write_json_atomic(folder / EVALS_FILE, task_evaluation.details())
        for name, png in plots.items():
            write_bytes_atomic(folder / f"{name}.png", png)
        quality.write_verdict(folder, outcomes)
    layout.remove(layout.checkpoint_dir(key))
    values = {**rounded({**metrics.reported(), "downstream_spliced": downstream.spliced,
                         "downstream_ablated": downstream.ablated, "downstream_recovered": downstream.recovered,
                         **({"downstream_kl": downstream.kl} if downstream.kl is not None else {}),
                         **task_evaluation.metrics.as_dict()}),
              "train_tokens": result.train_tokens,
              "wall_time": format_duration(result.wall_seconds) if trained else "not trained here",
              "resumed_from_step": result.resumed_from_step, "downstream_kind": downstream.kind,
              **({"imported_from": origin.imported.source} if not trained else {})}
    evaluation = numeric({**metrics.as_dict(),
                          **{f"downstream_{name}": value for name, value in downstream.as_dict().items()},
                          **task_evaluation.metrics.as_dict()})
    return PublishedSAE(outcomes, values, layout.location(layout.sae_dir(key)), plots, evaluation)
