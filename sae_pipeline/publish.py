"""Publishing one trained SAE: evaluated on held-out tokens, checked, its downstream fidelity measured, and its
folder (SAELens weights and cfg.json, training log, summary, plots, verdict) written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sae_pipeline import quality
from sae_pipeline.checks import SAEEvidence, run_checks
from sae_pipeline.config import ActivationSpec, SAEConfig
from sae_pipeline.corpus import read_corpus
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.fidelity import measure_downstream
from sae_pipeline.markdown import format_duration, rounded
from sae_pipeline.model import HookPoint
from sae_pipeline.plots import feature_density_png, training_curves_png
from sae_pipeline.results import METRICS_FILE, SUMMARY_FILE
from sae_pipeline.storage import Layout, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from sae_pipeline.store import ActivationStore
from sae_pipeline.sweep_stats import last_window_mean
from sae_pipeline.tracking import numeric
from sae_pipeline.training import TrainResult

TRAINING_CURVES = "training_curves"
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


def publish_sae(layout: Layout, key: str, cfg: SAEConfig, store: ActivationStore, result: TrainResult,
                device: str, thresholds: quality.QualityThresholds, trust_remote_code: bool) -> PublishedSAE:
    """Evaluate a trained SAE on held-out tokens, run its checks, publish its folder (weights, metrics, summary,
    plots, verdict) and remove its checkpoints."""
    metrics, fire_counts = evaluate_sae(result.sae, store, device)
    frequency = fire_counts / max(metrics.n_tokens, 1)
    outcomes = run_checks("sae", SAEEvidence(result.sae.state_dict(), result.metrics, result.sae.d_sae, metrics,
                                             frequency, cfg.target_l0, cfg.architecture), thresholds)
    model_spec = ActivationSpec(model=store.meta["model"], trust_remote_code=trust_remote_code)
    downstream = measure_downstream(result.sae, store.meta, read_corpus(layout), model_spec)
    curves = training_curves_png(result.metrics, key)
    density = feature_density_png(frequency, key)
    summary = {"key": key, "config": cfg.model_dump(mode="json"), "metrics": metrics.as_dict(),
               "downstream": downstream.as_dict(),
               "final_loss": last_window_mean(result.metrics, "loss"), "train_tokens": result.train_tokens,
               "wall_seconds": result.wall_seconds, "resumed_from_step": result.resumed_from_step}
    with layout.publish(layout.sae_dir(key)) as folder:
        result.sae.save(folder, metadata={"partition_key": key, "model": store.meta["model"],
                                          "layer": store.meta["layer"], "hook": store.meta["hook"],
                                          "hook_name": HookPoint.of_store(store.meta).name,
                                          "dataset_scaling_factor_folded": result.scaling_factor,
                                          "sae_pipeline_config": cfg.model_dump(mode="json")})
        write_parquet_atomic(result.metrics, folder / METRICS_FILE)
        write_json_atomic(folder / SUMMARY_FILE, summary)
        write_bytes_atomic(folder / f"{TRAINING_CURVES}.png", curves)
        write_bytes_atomic(folder / f"{FEATURE_DENSITY}.png", density)
        quality.write_verdict(folder, outcomes)
    layout.remove(layout.checkpoint_dir(key))
    values = {**rounded({**metrics.reported(), "downstream_spliced": downstream.spliced,
                         "downstream_ablated": downstream.ablated, "downstream_recovered": downstream.recovered,
                         **({"downstream_kl": downstream.kl} if downstream.kl is not None else {})}),
              "train_tokens": result.train_tokens, "wall_time": format_duration(result.wall_seconds),
              "resumed_from_step": result.resumed_from_step, "downstream_kind": downstream.kind}
    evaluation = numeric({**metrics.as_dict(),
                          **{f"downstream_{name}": value for name, value in downstream.as_dict().items()}})
    return PublishedSAE(outcomes, values, layout.location(layout.sae_dir(key)),
                        {TRAINING_CURVES: curves, FEATURE_DENSITY: density}, evaluation)
