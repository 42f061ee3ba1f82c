"""The asset graph: corpus -> activations -> sae [per config] -> features -> feature_labels; sweep_analysis.

Assets pass paths, not tensors: each publishes one folder under the storage root (atomically) and the next one
pulls it, so no IO manager ever loads every partition into memory, and on object storage each step can run on
another machine (see storage.Layout).
"""

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from sae_pipeline import quality
from sae_pipeline.activation_scan import scan_activations
from sae_pipeline.activations import extract_activations
from sae_pipeline.analysis import build_sweep_report, report_with_inline_plots
from sae_pipeline.calibration import calibration_png, calibration_state, how_to_calibrate, plans_markdown
from sae_pipeline.checks import ActivationEvidence, SAEEvidence, run_checks
from sae_pipeline.config import (
    ActivationSpec,
    ConfigError,
    CorpusSpec,
    FeaturesSpec,
    LabelsSpec,
    SAEConfig,
    parse_spec,
)
from sae_pipeline.corpus import CORPUS_COLUMNS, check_source, iter_texts, tokenize_corpus
from sae_pipeline.dashboard import render_dashboard
from sae_pipeline.defs.checks import (
    ACTIVATIONS_CHECKS,
    FEATURES_CHECKS,
    SAE_CHECKS,
    check_evaluations,
    check_result,
    refuse_if_blocked,
    refuse_if_other_lineage,
)
from sae_pipeline.defs.freshness import provenance_tags
from sae_pipeline.defs.launch import validated_at_launch
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.profiles import gpu_op_tags
from sae_pipeline.defs.resources import DeviceResource, ModelResource, QualityResource, StorageResource
from sae_pipeline.defs.run_config import config_from_spec
from sae_pipeline.defs.stops import LABELS_RETRY_POLICY, not_retried, stops_without_retry
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.features import (
    EXAMPLE_COLUMNS,
    EXAMPLES_FILE,
    FEATURE_COLUMNS,
    FEATURES_FILE,
    FEATURES_META_FILE,
    extract_features,
    features_summary,
    top_features_markdown,
    write_examples,
    write_features,
)
from sae_pipeline.fidelity import measure_downstream
from sae_pipeline.labelling import (
    LABEL_COLUMNS,
    LABEL_SCHEMA,
    LABELS_FILE,
    LLMError,
    label_features,
    labels_markdown,
    load_progress,
    save_progress,
    write_labels,
)
from sae_pipeline.lineage import corpus_fingerprint, file_fingerprint, lineage_record, write_lineage
from sae_pipeline.markdown import format_duration, markdown_table, report_pieces, rounded
from sae_pipeline.model import check_layer, load_model, load_tokenizer, validate_layer
from sae_pipeline.plots import feature_density_png, png_markdown, training_curves_png
from sae_pipeline.registry import load_config, sweeps_dir
from sae_pipeline.results import METRICS_FILE, SUMMARY_FILE, collect_runs, training_logs
from sae_pipeline.saes import load_sae
from sae_pipeline.scoring import (
    SCORE_COLUMNS,
    best_worst_markdown,
    labeller_and_scorer,
    score_labels,
    scores_summary,
    with_scores,
)
from sae_pipeline.storage import (
    CORPUS_FILE,
    Layout,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from sae_pipeline.store import META_FILE, ActivationStore
from sae_pipeline.sweep_stats import last_window_mean
from sae_pipeline.training import TrainResult, checkpoint_step, plan_groups, train_group
from sae_pipeline.vocab import load_vocab_matrix

DASHBOARD_DIR = "dashboard"
WITHDRAWN_FILE = "withdrawn.json"
CODE_VERSIONS = {"corpus": "2", "activations": "2", "sae": "2", "features": "2", "feature_labels": "2"}
"""Each computing asset's code version (bump only its own when a change alters what it writes): with the data
versions upstream, it is what makes a partition stale in the UI and what `run-sweep` compares, so a change to
labelling leaves `sae` and `features` current. "2" is what every asset carried when they shared one version, so
partitions made before are still current."""
ENV_AUTOMATION = "SAE_PIPELINE_AUTOMATION"
"""`eager`: partitions are materialised by declarative automation as soon as they can be (off when unset)."""


def automation_condition(environ: Mapping[str, str] | None = None) -> dg.AutomationCondition | None:
    """`AutomationCondition.eager()` when SAE_PIPELINE_AUTOMATION=eager, so a newly registered partition (and
    one whose upstream changed) is materialised without a launch; None, no automation, when it is unset."""
    mode = (os.environ if environ is None else environ).get(ENV_AUTOMATION, "")
    if mode not in ("", "eager"):
        raise ConfigError(f"{ENV_AUTOMATION}: {mode!r}; allowed: eager, or unset (no automation)")
    return dg.AutomationCondition.eager() if mode else None


def column_schema(frame: pl.DataFrame, descriptions: Mapping[str, str]) -> dg.TableSchema:
    """The `dagster/column_schema` of a written table: its columns and polars types, described where known."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype), description=descriptions.get(name))
                                   for name, dtype in frame.schema.items()])


def read_corpus(layout: Layout) -> pl.DataFrame:
    return pl.read_parquet(layout.pull(layout.corpus_dir) / CORPUS_FILE)


CorpusConfig = config_from_spec("CorpusConfig", CorpusSpec, where="corpus config",
                                check=lambda spec: check_source(spec.source))
ActivationsConfig = config_from_spec("ActivationsConfig", ActivationSpec, where="activations config",
                                     omit=("model", "trust_remote_code"))
"""The model comes from the `model` resource; the layer is checked against it when the step starts."""
FeaturesConfig = config_from_spec("FeaturesConfig", FeaturesSpec, where="features config")
LabelsConfig = config_from_spec("LabelsConfig", LabelsSpec, where="feature_labels config")
"""The LLM's endpoint, model and key come from the environment only."""


def _run_config_of(context: dg.AssetExecutionContext, asset: str) -> dict | None:
    """The raw config this run gives `asset`, or None when the run does not materialise it."""
    selection = context.dagster_run.asset_selection
    if selection and dg.AssetKey(asset) not in selection:  # empty or None: the whole job
        return None
    return context.run_config.get("ops", {}).get(asset, {}).get("config", {})


def validate_run_activations_config(context: dg.AssetExecutionContext, model: ModelResource) -> None:
    """In a run that also extracts activations, check their config (the layer above all) before the corpus is
    rewritten, so a bad value fails the run with nothing written."""
    raw = _run_config_of(context, "activations")
    if raw is None:
        return
    spec = parse_spec(ActivationSpec, {**raw, "model": model.name, "trust_remote_code": model.trust_remote_code},
                      where="activations config")
    validate_layer(spec)


DOWNSTREAM_SPECS: dict[str, type[FeaturesSpec | LabelsSpec]] = {"features": FeaturesSpec,
                                                                 "feature_labels": LabelsSpec}


def validate_downstream_config(context: dg.AssetExecutionContext, *assets: str) -> None:
    """Check the config of this run's later steps before this one computes, so a bad `features` or
    `feature_labels` value fails the run before an SAE is trained, with nothing written."""
    for asset in assets:
        raw = _run_config_of(context, asset)
        if raw is not None:
            parse_spec(DOWNSTREAM_SPECS[asset], raw, where=f"{asset} config")


@dg.asset(group_name="data", kinds={"parquet"}, code_version=CODE_VERSIONS["corpus"],
          description="Tokenised text sequences from the configured corpus.")
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, storage: StorageResource,
           model: ModelResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        spec = parse_spec(CorpusSpec, config.model_dump(), where="corpus config")
        validate_run_activations_config(context, model)
        tokenizer = load_tokenizer(ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code))
        frame = tokenize_corpus(iter_texts(spec), tokenizer, spec)
        layout = storage.layout
        with layout.publish(layout.corpus_dir) as folder:
            write_parquet_atomic(frame, folder / CORPUS_FILE)
        n_tokens = int(frame["input_ids"].list.len().sum())
        context.log.info(f"corpus: {len(frame)} sequences, {n_tokens} tokens from {spec.source}")
        fingerprint = file_fingerprint(layout.pull(layout.corpus_dir, CORPUS_FILE) / CORPUS_FILE)
        return dg.MaterializeResult(data_version=dg.DataVersion(fingerprint), metadata={
            "source": spec.source, "n_sequences": len(frame), "n_tokens": n_tokens, "corpus_sha256": fingerprint,
            "path": dg.MetadataValue.path(layout.location(layout.corpus_dir, CORPUS_FILE)),
            "preview": dg.MetadataValue.md(markdown_table(frame.head(5).select("seq_id", "text"))),
            "dagster/column_schema": column_schema(frame, CORPUS_COLUMNS),
        })


corpus = validated_at_launch(corpus, CorpusConfig)


@dg.asset(deps=[corpus], group_name="data", kinds={"pytorch", "safetensors"},
          check_specs=ACTIVATIONS_CHECKS, code_version=CODE_VERSIONS["activations"],
          description="Residual-stream activations at one layer, sharded safetensors with a held-out eval slice.")
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, storage: StorageResource,
                model: ModelResource, device: DeviceResource,
                quality_thresholds: QualityResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        spec = parse_spec(ActivationSpec, {"model": model.name, "trust_remote_code": model.trust_remote_code,
                                           **config.model_dump()}, where="activations config")
        thresholds = quality_thresholds.thresholds()
        validate_layer(spec)  # from the model's config alone: before any weights load or file write
        layout = storage.layout
        corpus_sha256 = corpus_fingerprint(layout.pull(layout.corpus_dir, CORPUS_FILE))
        lineage = lineage_record(corpus_sha256, spec.model, spec.layer)
        frame = read_corpus(layout)
        tokenizer, transformer = load_tokenizer(spec), load_model(spec).to(device.resolve())
        check_layer(transformer, spec.layer)
        with layout.publish(layout.activations_dir) as folder:
            meta = extract_activations(frame, transformer, tokenizer, spec, folder, spec.model)
            scan = scan_activations(ActivationStore(folder))  # what was written, not what meta.json says
            outcomes = run_checks("activations", ActivationEvidence(scan, meta["n_excluded_outliers"]), thresholds)
            quality.write_verdict(folder, outcomes)
            write_lineage(folder, lineage)
        context.log.info(f"activations: {meta['n_tokens']} tokens x {meta['d_model']} at layer {spec.layer}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(file_fingerprint(layout.pull(layout.activations_dir, META_FILE) / META_FILE)),
            metadata={"corpus_sha256": str(lineage["corpus_sha256"]),
                      "activations_dir": dg.MetadataValue.path(layout.location(layout.activations_dir)),
                      "n_tokens": meta["n_tokens"], "n_train_tokens": meta["n_train_tokens"],
                      "n_eval_tokens": meta["n_eval_tokens"], "d_model": meta["d_model"], "model": spec.model,
                      "layer": spec.layer, "dtype": meta["dtype"], "norm_stats": meta["norm_stats"]},
            check_results=[check_result(o) for o in outcomes],
        )


activations = validated_at_launch(activations, ActivationsConfig)


SAE_RUN_SIZE = 8
"""Partitions of `sae` per run in an asset backfill (from the UI or the schedule): each run trains its configs as
groups in one pass over the activations (`plan_groups` splits by batch size, seed, resume step and memory)."""


@dataclass
class PublishedSAE:
    """One partition's trained SAE, evaluated and published: its check outcomes and materialisation metadata."""

    outcomes: list[quality.CheckOutcome]
    metadata: dict[str, Any]

    @property
    def blocking_failures(self) -> list[str]:
        return [o.name for o in self.outcomes if not o.passed and o.severity == "ERROR"]


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
                                          "dataset_scaling_factor_folded": result.scaling_factor,
                                          "sae_pipeline_config": cfg.model_dump(mode="json")})
        write_parquet_atomic(result.metrics, folder / METRICS_FILE)
        write_json_atomic(folder / SUMMARY_FILE, summary)
        write_bytes_atomic(folder / "training_curves.png", curves)
        write_bytes_atomic(folder / "feature_density.png", density)
        quality.write_verdict(folder, outcomes)
    layout.remove(layout.checkpoint_dir(key))
    return PublishedSAE(outcomes, {
        **rounded({**metrics.reported(), "downstream_spliced": downstream.spliced,
                   "downstream_ablated": downstream.ablated, "downstream_recovered": downstream.recovered}),
        "train_tokens": result.train_tokens, "wall_time": format_duration(result.wall_seconds),
        "resumed_from_step": result.resumed_from_step,
        "weights_dir": dg.MetadataValue.path(layout.location(layout.sae_dir(key))),
        "training_curves": dg.MetadataValue.md(png_markdown(curves, f"training curves {key}")),
        "downstream_kind": downstream.kind,
        "feature_density": dg.MetadataValue.md(png_markdown(density, f"feature density {key}"))})


def training_hooks(context: dg.AssetExecutionContext, layout: Layout, key: str
                   ) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """The per-row log and the after-checkpoint hook (commit to object storage) of one partition's training."""
    checkpoints = layout.checkpoint_dir(key)
    return (lambda row: context.log.debug(f"{key} step {row['step']}: {row}")), (lambda: layout.push(checkpoints))


def train_partitions(context: dg.AssetExecutionContext, layout: Layout, store: ActivationStore, keys: list[str],
                     device: DeviceResource, thresholds: quality.QualityThresholds,
                     trust_remote_code: bool) -> Iterator[dg.AssetMaterialization]:
    """Train the partitions of a ranged run as groups, each in one pass over the activations, and materialise
    each partition with its own metadata and check evaluations as soon as it is published. A config that is
    invalid, fails to start, train or publish, or fails a blocking check fails its own partition: its group
    mates are published, and the step fails at the end naming each failed partition and why (a backfill marks
    only those failed)."""
    failures: dict[str, str] = {}
    cfgs: dict[str, SAEConfig] = {}
    for key in keys:
        try:
            cfgs[key] = load_config(layout, key)
            cfgs[key].validate_for_model(store.d_model, device.memory_bytes())
        except ConfigError as error:
            cfgs.pop(key, None)
            failures[key] = str(error)
    ready = list(cfgs)
    tags = provenance_tags(context.instance, context.run, CODE_VERSIONS["sae"], [activations.key])
    for key in ready:
        layout.restore(layout.checkpoint_dir(key))
    groups = plan_groups([cfgs[k] for k in ready], store.d_model, device.memory_bytes(),
                         [checkpoint_step(layout.checkpoint_dir(k)) for k in ready])
    for number, group in enumerate(groups, 1):
        members = [ready[i] for i in group]
        context.log.info(f"sae group {number}/{len(groups)}: {len(members)} configs in one pass over the "
                         f"activations: {', '.join(members)}")
        hooks = [training_hooks(context, layout, key) for key in members]
        results = train_group([cfgs[k] for k in members], store, device.resolve(),
                              [layout.checkpoint_dir(k) for k in members], [h[0] for h in hooks],
                              [h[1] for h in hooks])
        for key, result in zip(members, results, strict=True):
            if isinstance(result, Exception):
                failures[key] = f"training failed ({type(result).__name__}: {result}); its checkpoint is kept"
                continue
            try:
                published = publish_sae(layout, key, cfgs[key], store, result, device.resolve(), thresholds,
                                        trust_remote_code)
            except Exception as error:  # evaluating or writing one partition must not cost its mates theirs
                failures[key] = f"publishing failed ({type(error).__name__}: {error}); rerun to retrain it"
                continue
            yield from materialisation(context, key, published, tags)
            if published.blocking_failures and not context.has_partition_key:
                failures[key] = "failed blocking checks: " + ", ".join(published.blocking_failures)
            context.log.info(f"sae {key}: published ({len(failures)} failed so far)")
    if failures:
        lines = [f"{key}: {why}" for key, why in failures.items()]
        raise dg.Failure(description=f"{len(failures)} of {len(keys)} sae partitions failed (the others are "
                         "materialised): " + "; ".join(lines), metadata={"failed": "\n".join(lines)})


SAE_KEY = dg.AssetKey("sae")


def materialisation(context: dg.AssetExecutionContext, key: str, published: PublishedSAE, tags: dict[str, str]
                    ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """A published partition's materialisation and check results. Dagster ties a `MaterializeResult` (the step's
    output, which downstream steps in the run wait for, and whose failed blocking checks stop them) to a partition
    only in a single-partition step; in a ranged step each partition is an `AssetMaterialization` with its check
    evaluations logged beside it."""
    if context.has_partition_key:
        yield dg.MaterializeResult(asset_key=SAE_KEY, metadata=published.metadata,
                                   check_results=[check_result(o, key) for o in published.outcomes])
        return
    yield dg.AssetMaterialization(asset_key=SAE_KEY, partition=key, metadata=published.metadata, tags=tags)
    for evaluation in check_evaluations(context.instance, SAE_KEY, key, published.outcomes):
        context.log_event(evaluation)


@dg.multi_asset(
    name="sae", partitions_def=sae_configs, check_specs=SAE_CHECKS, can_subset=True, pool="gpu",
    op_tags=gpu_op_tags(), backfill_policy=dg.BackfillPolicy.multi_run(SAE_RUN_SIZE),
    specs=[dg.AssetSpec(SAE_KEY, deps=[activations], group_name="sae", kinds={"pytorch"},
                        code_version=CODE_VERSIONS["sae"],
                        automation_condition=automation_condition(),
                        description="One SAE per config partition, in the SAELens file layout. A run over several "
                                    "partitions (an asset backfill, `run-sweep`) trains them as groups, each in "
                                    "one pass over the activations.")])
def sae(context: dg.AssetExecutionContext, storage: StorageResource, device: DeviceResource,
        quality_thresholds: QualityResource, model: ModelResource) -> Iterator[dg.MaterializeResult
                                                                                | dg.AssetMaterialization]:
    layout = storage.layout
    with stops_without_retry(context, layout):
        yield from train_and_publish(context, layout, device, quality_thresholds.thresholds(), model)


def train_and_publish(context: dg.AssetExecutionContext, layout: Layout, device: DeviceResource,
                      thresholds: quality.QualityThresholds,
                      model: ModelResource) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """The body of `sae`: its partitions, one or many, trained as groups and published (`train_partitions`)."""
    validate_downstream_config(context, "features", "feature_labels")
    refuse_if_other_lineage("sae", layout, model.name)
    acts = layout.pull(layout.activations_dir)
    refuse_if_blocked("sae", context.partition_key if context.has_partition_key else None,
                      quality.blocking_failures(acts, missing_ok=True))
    yield from train_partitions(context, layout, ActivationStore(acts), list(context.partition_keys), device,
                                thresholds, model.trust_remote_code)


@dg.asset(partitions_def=sae_configs, deps=[sae, corpus], pool="gpu", group_name="sae", kinds={"parquet", "html"},
          check_specs=FEATURES_CHECKS, code_version=CODE_VERSIONS["features"],
          automation_condition=automation_condition(),
          description="Per-latent statistics, top/quantile contexts with per-token activations, vocabulary "
                      "projection and a static HTML dashboard, on held-out tokens.")
def features(context: dg.AssetExecutionContext, config: FeaturesConfig, storage: StorageResource,
             device: DeviceResource, model: ModelResource, quality_thresholds: QualityResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        key, layout = context.partition_key, storage.layout
        spec = parse_spec(FeaturesSpec, config.model_dump(), where="features config")
        validate_downstream_config(context, "feature_labels")
        thresholds = quality_thresholds.thresholds()
        refuse_if_other_lineage("features", layout, model.name)
        acts, weights = layout.pull(layout.activations_dir), layout.pull(layout.sae_dir(key))
        refuse_if_blocked("features", key, quality.blocking_failures(acts, missing_ok=True)
                          + quality.blocking_failures(weights, missing_ok=True))
        autoencoder = load_sae(weights)
        store = ActivationStore(acts)
        tokenizer = load_tokenizer(ActivationSpec(model=model.name, trust_remote_code=model.trust_remote_code))
        vocab = load_vocab_matrix(model.name, model.trust_remote_code) if spec.vocab_projection else None
        tables = extract_features(autoencoder, store, read_corpus(layout), tokenizer,
                                  top_n=spec.top_n, window=spec.window, n_bands=spec.n_bands,
                                  per_band=spec.per_band, n_random=spec.n_random, vocab=vocab,
                                  device=device.resolve())
        frame = tables.latents
        vocab_kind = vocab[0] if vocab else "none"
        outcomes = run_checks("features", frame, thresholds)
        with layout.publish(layout.features_dir(key)) as folder:
            write_features(frame, folder / FEATURES_FILE)
            write_examples(tables.examples, folder / EXAMPLES_FILE)
            write_json_atomic(folder / FEATURES_META_FILE, {**spec.model_dump(), "vocab_kind": vocab_kind,
                                                            "model": model.name})
            render_dashboard(frame, tables.examples, folder / DASHBOARD_DIR, f"features {key}", n_bands=spec.n_bands)
            quality.write_verdict(folder, outcomes)
        summary = features_summary(frame)
        where = layout.location(layout.features_dir(key))
        return dg.MaterializeResult(
            metadata={"features_path": dg.MetadataValue.path(f"{where}/{FEATURES_FILE}"),
                      "examples_path": dg.MetadataValue.path(f"{where}/{EXAMPLES_FILE}"),
                      "dashboard_path": dg.MetadataValue.path(f"{where}/{DASHBOARD_DIR}/index.html"),
                      "n_examples": len(tables.examples),
                      "vocab_projection": vocab_kind,
                      "n_live": summary["n_live"], "n_dead": summary["n_dead"],
                      "n_near_zero": summary["n_near_zero"],
                      "top_latents": dg.MetadataValue.md(top_features_markdown(frame)),
                      "dagster/column_schema": column_schema(frame, FEATURE_COLUMNS),
                      "examples_column_schema": column_schema(tables.examples, EXAMPLE_COLUMNS)},
            check_results=[check_result(o, key) for o in outcomes],
        )


def withdraw_labels(context: dg.AssetExecutionContext, layout: Layout, key: str, reasons: list[str]) -> bool:
    """On a refused relabel, replace the partition's previous labels (made from features that no longer pass)
    by a `withdrawn.json` naming the reasons, and record that as the latest materialisation; False when there
    were no labels to withdraw."""
    folder = layout.labels_dir(key)
    if not (layout.pull(folder, LABELS_FILE) / LABELS_FILE).exists():
        return False
    with layout.publish(folder) as fresh:
        write_json_atomic(fresh / WITHDRAWN_FILE, {"partition": key, "reasons": reasons,
                                                    "why": "blocking quality checks failed upstream"})
    context.log_event(dg.AssetMaterialization(
        asset_key=context.asset_key, partition=key,
        description="labels withdrawn: blocking quality checks failed upstream",
        metadata={"status": "withdrawn", "reasons": "\n".join(reasons),
                  "withdrawn_path": dg.MetadataValue.path(layout.location(folder, WITHDRAWN_FILE))}))
    return True


@dataclass(frozen=True)
class Deadline:
    """`step_timeout` seconds after the step's first attempt started (epoch seconds)."""

    started: float
    """When the first attempt of the step started."""
    seconds: float
    """The step's whole budget (`step_timeout`)."""

    def left(self) -> float:
        return self.started + self.seconds - time.time()

    def passed(self) -> bool:
        return self.left() <= 0

    def describe(self) -> str:
        if self.passed():
            return f"the step's deadline (step_timeout {self.seconds:g} s from its first attempt) has passed"
        return f"{self.left():.0f} s left of step_timeout {self.seconds:g} s, less than a retry's delay"


def step_started(context: dg.AssetExecutionContext) -> float:
    """When this step's first attempt in this run started (epoch seconds, from the run's event log), so that a
    deadline counts from there across the retries of the step, not from each attempt."""
    starts = [entry.timestamp for entry in context.instance.all_logs(context.run_id, dg.DagsterEventType.STEP_START)
              if entry.step_key == str(context.op_execution_context.node_handle)]
    return min(starts, default=time.time())


def label_resumably(layout: Layout, key: str, stamp: dict[str, str], deadline: Deadline, retry_delay: float,
                    label: Callable[[pl.DataFrame | None, list[dict]], pl.DataFrame],
                    score: Callable[[pl.DataFrame], pl.DataFrame]) -> pl.DataFrame:
    """`score(label(done, obtained))`, where `done` are the labels a previous interrupted run kept (same features,
    same labeller) and `label` appends each label to `obtained` as it gets it. When the endpoint fails part-way,
    the step's deadline passes or the step is stopped, every label obtained is kept in the partition's progress
    folder (the run fails saying so) and the next run asks only for the rest. Past the deadline (or too close to
    it for a retry's delay) the failure is final: no retry is scheduled."""
    folder = layout.labels_progress_dir(key)
    layout.restore(folder)
    done = load_progress(folder, stamp)
    if deadline.passed():
        n_done = 0 if done is None else done.height
        raise dg.Failure(description=f"Labelling partition {key} stopped: {deadline.describe()}; not retried. "
                         f"{n_done} label(s) kept; a rerun resumes from them", metadata={"n_kept": n_done},
                         allow_retries=False)
    obtained: list[dict] = []
    try:
        return score(label(done, obtained))
    except BaseException as error:  # an LLM failure, or a stop: keep what was obtained, then fail
        n_kept = keep_progress(layout, folder, obtained, stamp)
        if not isinstance(error, LLMError):
            raise
        retry = error.transient and deadline.left() > retry_delay
        why = (" (the endpoint was unavailable: retried with backoff)" if retry else
               f" ({deadline.describe()}: no retry)" if error.transient else "")
        raise dg.Failure(description=f"Labelling partition {key} stopped: {error}. {n_kept} label(s) kept; a rerun "
                         f"resumes from them{why}", metadata={"n_kept": n_kept}, allow_retries=retry) from None


def keep_progress(layout: Layout, folder: Path, obtained: list[dict], stamp: dict[str, str]) -> int:
    """Save the labels obtained so far (when there are any) for the next run; returns how many."""
    if obtained:
        save_progress(folder, pl.DataFrame(obtained, schema=LABEL_SCHEMA), stamp)
        layout.push(folder)
    return len(obtained)


@dg.asset(partitions_def=sae_configs, deps=[features], group_name="sae", kinds={"parquet", "html"},
          code_version=CODE_VERSIONS["feature_labels"], retry_policy=LABELS_RETRY_POLICY,
          automation_condition=automation_condition(),
          description="A label and a detection score per live latent, and the dashboard with them; refuses "
                      "partitions whose blocking checks failed.")
def feature_labels(context: dg.AssetExecutionContext, config: LabelsConfig,
                   storage: StorageResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        return label_partition(context, config, storage.layout)


def label_partition(context: dg.AssetExecutionContext, config: LabelsConfig, layout: Layout) -> dg.MaterializeResult:
    """The body of `feature_labels`: refuse a blocked partition, label and score its live latents, publish."""
    key = context.partition_key
    with not_retried("feature_labels"):
        spec = parse_spec(LabelsSpec, config.model_dump(), where="feature_labels config")
    refuse_if_other_lineage("feature_labels", layout)
    features_dir = layout.pull(layout.features_dir(key), FEATURES_FILE, EXAMPLES_FILE, FEATURES_META_FILE,
                               quality.VERDICT_FILE)
    verdicts = [layout.pull(layout.activations_dir, quality.VERDICT_FILE),
                layout.pull(layout.sae_dir(key), quality.VERDICT_FILE), features_dir]
    reasons = [reason for folder in verdicts for reason in quality.blocking_failures(folder)]
    if reasons:
        withdrawn = withdraw_labels(context, layout, key, reasons)
        raise dg.Failure(description=f"Refusing to label partition {key}: blocking quality checks failed: "
                         + "; ".join(reasons) + ("; its previous labels are withdrawn" if withdrawn else ""),
                         metadata={"reasons": "\n".join(reasons)}, allow_retries=False)
    table = pl.read_parquet(features_dir / FEATURES_FILE)
    examples = pl.read_parquet(features_dir / EXAMPLES_FILE)
    deadline = Deadline(step_started(context), spec.step_timeout)
    policy = context.op_def.retry_policy or LABELS_RETRY_POLICY
    retry_delay = policy.calculate_delay(context.retry_number + 1)
    with not_retried("feature_labels"):
        labeller, scorer = labeller_and_scorer(spec.labeller, timeout=spec.request_timeout, retries=spec.retries,
                                               step_seconds=max(deadline.left(), 1e-3))
    stamp = {"labeller": labeller.name,
             "features_sha256": hashlib.sha256((features_dir / FEATURES_FILE).read_bytes()).hexdigest()}
    scored = label_resumably(layout, key, stamp, deadline, retry_delay, lambda done, obtained: label_features(
        table, labeller, examples=examples, max_latents=spec.max_latents, done=done, obtained=obtained),
        lambda labels: with_scores(labels, score_labels(labels, examples, scorer)))
    n_bands = read_json(features_dir / FEATURES_META_FILE).get("n_bands", 5)
    with layout.publish(layout.labels_dir(key)) as folder:
        write_labels(scored, folder / LABELS_FILE)
        render_dashboard(table, examples, folder / DASHBOARD_DIR, f"labelled features {key}", labels=scored,
                         n_bands=n_bands)
    layout.remove(layout.labels_progress_dir(key))
    summary = scores_summary(scored)
    where = layout.location(layout.labels_dir(key))
    return dg.MaterializeResult(metadata={
        "status": "current",
        "labels_path": dg.MetadataValue.path(f"{where}/{LABELS_FILE}"),
        "dashboard_path": dg.MetadataValue.path(f"{where}/{DASHBOARD_DIR}/index.html"),
        "n_labelled": len(scored), "n_scored": summary["n_scored"],
        "mean_detection_accuracy": rounded(summary["mean_detection_accuracy"]),
        "mean_detection_f1": rounded(summary["mean_detection_f1"]),
        "n_fuzzed": summary["n_fuzzed"], "mean_fuzzing_accuracy": rounded(summary["mean_fuzzing_accuracy"]),
        "labeller": labeller.name, "scorer": scorer.name,
        "best_labelled": dg.MetadataValue.md(labels_markdown(scored)),
        "best_and_worst_scored": dg.MetadataValue.md(best_worst_markdown(scored)),
        "dagster/column_schema": column_schema(scored, {**LABEL_COLUMNS, **SCORE_COLUMNS}),
    })


@dg.asset(deps=[sae, features], group_name="analysis", kinds={"markdown"},
          description="The sweep report (seed 004's form) over every finished config partition; the `report` "
                      "metadata holds it whole, plots inline.")
def sweep_analysis(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        layout = storage.layout
        keys = context.instance.get_dynamic_partitions(sae_configs.name)
        logs = training_logs(layout, keys)
        runs, missing = collect_runs(layout, keys, logs)
        with layout.publish(layout.analysis_dir) as folder:
            report = build_sweep_report(runs, folder, sweep_name="sae_configs", missing=missing, training_logs=logs)
            text = report_with_inline_plots(report)
        where = layout.location(layout.analysis_dir)
        return dg.MaterializeResult(metadata={
            **report_metadata(text),
            "report_path": dg.MetadataValue.path(f"{where}/{report.report_path.name}"),
            "table_path": dg.MetadataValue.path(f"{where}/{report.table_path.name}"),
            "n_configs": report.n_configs, "n_missing": len(missing), "failed_blocking_checks": list(report.failed),
            "best_balanced": report.best_balanced or "none",
            "top_configs": dg.MetadataValue.md(report.top_markdown),
            "pareto_l0_dead": list(report.pareto_dead),
        })


def report_metadata(text: str) -> dict[str, dg.MetadataValue]:
    """The report as numbered markdown entries, one per section and plot (`markdown.report_pieces`): the text
    sections show in place on the asset page, where one entry for the whole report would be a link."""
    return {f"report {number:02d}: {title}": dg.MetadataValue.md(piece)
            for number, (title, piece) in enumerate(report_pieces(text), 1)}


@dg.asset(deps=[sweep_analysis], group_name="analysis", kinds={"markdown"},
          description="l1_alpha calibration toward target_l0 for relu configs: fitted points and the next proposal.")
def calibration(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    with stops_without_retry(context, storage.layout):
        layout = storage.layout
        states = calibration_state(layout)
        plans = [plan for state in states for plan in state.plans]
        sections, proposals, pngs = [], {}, {}
        for state in states:
            for plan in state.plans:
                png = pngs[f"{plan.group}.png"] = calibration_png(plan, state.settings.tolerance)
                proposals[plan.group] = {"sweep": state.sweep.path.name, "status": plan.status, "reason": plan.reason,
                                         "target_l0": plan.target, "n_proposed": plan.n_proposed,
                                         "proposed_l1_alpha": plan.proposal.l1_alpha,
                                         "proposed_key": plan.config.partition_key() if plan.config else None,
                                         "points": [[p.key, p.l1_alpha, p.l0] for p in plan.points]}
                sections.append(plans_markdown([plan]) + "\n\n" + png_markdown(png, f"L0 vs l1_alpha {plan.group}"))
        empty = how_to_calibrate(sweeps_dir(layout)) if not plans else None
        report = "# l1_alpha calibration\n\n" + ("\n\n".join(sections) or empty)
        with layout.publish(layout.calibration_dir) as folder:
            for name, png in pngs.items():
                write_bytes_atomic(folder / name, png)
            write_json_atomic(folder / "proposals.json", proposals)
            write_bytes_atomic(folder / "report.md", report.encode())
        context.log.info(f"calibration: {len(plans)} base configs, statuses {[p.status for p in plans]}")
        return dg.MaterializeResult(metadata={
            "report_path": dg.MetadataValue.path(layout.location(layout.calibration_dir, "report.md")),
            "n_groups": len(plans), "statuses": {p.group: p.status for p in plans},
            "proposals": rounded(proposals),
            "fitted_points": dg.MetadataValue.md(empty or plans_markdown(plans)),
            "plot": dg.MetadataValue.md("\n\n".join(sections) if sections else "no calibrated config"),
        })
