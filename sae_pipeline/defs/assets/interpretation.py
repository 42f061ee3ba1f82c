"""`features` (per-latent statistics, examples and dashboard, with their checks) and `feature_labels`
(resumable labelling and scoring; labels of a partition whose verdict blocks are withdrawn)."""

import functools
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import torch
from torch import Tensor

from sae_pipeline import quality
from sae_pipeline.checks import run_checks
from sae_pipeline.config import ActivationSpec, FeaturesSpec, LabelsSpec
from sae_pipeline.corpus import read_corpus
from sae_pipeline.dashboard import render_dashboard
from sae_pipeline.defs.assets.common import (
    CODE_VERSIONS,
    DASHBOARD_DIR,
    FeaturesConfig,
    LabelsConfig,
    automation_condition,
    column_schema,
    validate_downstream_config,
)
from sae_pipeline.defs.assets.data import corpus
from sae_pipeline.defs.assets.training import SAE_KEY, sae
from sae_pipeline.defs.checks import FEATURES_CHECKS, refuse_if_blocked, refuse_if_other_lineage
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.ranged import HeldChecks, fail_partitions, own_failure, partition_materialisation
from sae_pipeline.defs.resources import DeviceResource, ModelResource, QualityResource, StorageResource
from sae_pipeline.defs.staleness import provenance_tags
from sae_pipeline.defs.stops import LABELS_RETRY_POLICY, not_retried, published_in_run, stops_without_retry
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
from sae_pipeline.markdown import rounded
from sae_pipeline.model import load_tokenizer
from sae_pipeline.sae_import import partition_hook
from sae_pipeline.saes import load_sae
from sae_pipeline.scoring import (
    SCORE_COLUMNS,
    best_worst_markdown,
    labeller_and_scorer,
    score_labels,
    scores_summary,
    with_scores,
)
from sae_pipeline.spec_errors import parse_spec
from sae_pipeline.storage import (
    Layout,
    read_json,
    write_json_atomic,
)
from sae_pipeline.store import ActivationStore, store_of_hook
from sae_pipeline.vocab import load_vocab_matrix

WITHDRAWN_FILE = "withdrawn.json"

FEATURES_KEY = dg.AssetKey("features")
LABELS_KEY = dg.AssetKey("feature_labels")
FEATURES_RUN_SIZE = 16
"""Partitions of `features` per run in an asset backfill, and of `features` and of `feature_labels` per run of
`run-sweep`: each run loads the tokenizer, the vocabulary and the corpus once. Not SAE_RUN_SIZE: each asset needs
its own policy, so that a backfill never runs `sae` and `features` in one run (see `defs.ranged`).
`feature_labels` keeps Dagster's default, one partition per run: that is the smallest policy of the
`train_sweep` job, so a backfill launched from the job's page still runs the three assets one partition at a
time, in one run each."""


class Shared:
    """What the partitions of one `features` step share, each loaded on first use: the tokenizer, the vocabulary
    matrix, the corpus and one store per hook."""

    def __init__(self, layout: Layout, acts: Path, model: ModelResource, spec: FeaturesSpec) -> None:
        self.layout, self.acts, self.model, self.spec = layout, acts, model, spec
        self.stores: dict[Path, ActivationStore] = {}

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(ActivationSpec(model=self.model.name, trust_remote_code=self.model.trust_remote_code))

    @functools.cached_property
    def vocab(self) -> tuple[str, Tensor] | None:
        return load_vocab_matrix(self.model.name, self.model.trust_remote_code) if self.spec.vocab_projection \
            else None

    @functools.cached_property
    def corpus(self) -> pl.DataFrame:
        return read_corpus(self.layout)

    def store(self, hook: str | None) -> ActivationStore:
        folder = store_of_hook(self.acts, hook)
        if folder not in self.stores:
            self.stores[folder] = ActivationStore(folder)
        return self.stores[folder]


def describe_partition(key: str, shared: Shared, device: torch.device, thresholds: quality.QualityThresholds,
                       progress: Callable[[str], None]) -> tuple[dict[str, Any], list[quality.CheckOutcome]]:
    """Extract one partition's features, run its checks and publish its folder; its metadata and outcomes."""
    layout, spec = shared.layout, shared.spec
    weights = layout.pull(layout.sae_dir(key))
    refuse_if_blocked("features", key, quality.blocking_failures(weights, missing_ok=True))
    autoencoder = load_sae(weights)
    tables = extract_features(autoencoder, shared.store(partition_hook(layout, key)), shared.corpus,
                              shared.tokenizer, top_n=spec.top_n, window=spec.window, n_bands=spec.n_bands,
                              per_band=spec.per_band, n_random=spec.n_random, vocab=shared.vocab, device=device,
                              progress=progress)
    frame = tables.latents
    vocab_kind = shared.vocab[0] if shared.vocab else "none"
    outcomes = run_checks("features", frame, thresholds)
    with layout.publish(layout.features_dir(key)) as folder:
        write_features(frame, folder / FEATURES_FILE)
        write_examples(tables.examples, folder / EXAMPLES_FILE)
        write_json_atomic(folder / FEATURES_META_FILE, {**spec.model_dump(), "vocab_kind": vocab_kind,
                                                        "model": shared.model.name})
        render_dashboard(frame, tables.examples, folder / DASHBOARD_DIR, f"features {key}", n_bands=spec.n_bands)
        quality.write_verdict(folder, outcomes)
    summary = features_summary(frame)
    where = layout.location(layout.features_dir(key))
    return {"features_path": dg.MetadataValue.path(f"{where}/{FEATURES_FILE}"),
            "examples_path": dg.MetadataValue.path(f"{where}/{EXAMPLES_FILE}"),
            "dashboard_path": dg.MetadataValue.path(f"{where}/{DASHBOARD_DIR}/index.html"),
            "n_examples": len(tables.examples),
            "vocab_projection": vocab_kind,
            "n_live": summary["n_live"], "n_dead": summary["n_dead"],
            "n_near_zero": summary["n_near_zero"],
            "top_latents": dg.MetadataValue.md(top_features_markdown(frame)),
            "dagster/column_schema": column_schema(frame, FEATURE_COLUMNS),
            "examples_column_schema": column_schema(tables.examples, EXAMPLE_COLUMNS)}, outcomes


@dg.multi_asset(
    name="features", partitions_def=sae_configs, check_specs=FEATURES_CHECKS, can_subset=True, pool="gpu",
    backfill_policy=dg.BackfillPolicy.multi_run(FEATURES_RUN_SIZE),
    specs=[dg.AssetSpec(FEATURES_KEY, deps=[sae, corpus], group_name="sae", kinds={"parquet", "html"},
                        code_version=CODE_VERSIONS["features"], automation_condition=automation_condition(),
                        description="Per-latent statistics, top/quantile contexts with per-token activations, "
                                    "vocabulary projection and a static HTML dashboard, on held-out tokens. A run "
                                    "over several partitions loads the model's tokenizer, vocabulary and the "
                                    "corpus once.")])
def features(context: dg.AssetExecutionContext, config: FeaturesConfig, storage: StorageResource,
             device: DeviceResource, model: ModelResource, quality_thresholds: QualityResource
             ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult]:
    layout = storage.layout
    with stops_without_retry(context, layout):
        spec = parse_spec(FeaturesSpec, config.model_dump(), where="features config")
        validate_downstream_config(context, "feature_labels")
        refuse_if_other_lineage("features", layout, model.name)
        acts = layout.pull(layout.activations_dir)
        refuse_if_blocked("features", context.partition_key if context.has_partition_key else None,
                          quality.blocking_failures(acts, missing_ok=True))
        yield from describe_partitions(context, Shared(layout, acts, model, spec), device.resolve(),
                                       quality_thresholds.thresholds())


def describe_partitions(context: dg.AssetExecutionContext, shared: Shared, device: torch.device,
                        thresholds: quality.QualityThresholds
                        ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult]:
    """Each partition of the step described and materialised in turn; one that fails fails alone."""
    keys, failures = list(context.partition_keys), {}
    checks = HeldChecks(context)
    try:
        for number, key in enumerate(keys, 1):
            with own_failure(context, key, failures):
                metadata, outcomes = describe_partition(key, shared, device, thresholds, context.log.info)
                tags = provenance_tags(context.instance, context.run, CODE_VERSIONS["features"],
                                       {SAE_KEY: key, corpus.key: None})
                checks.hold((yield from partition_materialisation(context, FEATURES_KEY, key, metadata, outcomes,
                                                                  tags)))
                blocked = [o.name for o in outcomes if o.blocks]
                if blocked and not context.has_partition_key:
                    failures[key] = "failed blocking checks: " + ", ".join(blocked)
                context.log.info(f"features {key}: published ({number}/{len(keys)})")
    except BaseException:
        checks.log()  # a stop: every partition published keeps its evaluations
        raise
    yield from checks.as_outputs()
    fail_partitions("features", failures, len(keys), allow_retries=False)


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


@dg.multi_asset(
    name="feature_labels", partitions_def=sae_configs, can_subset=True, retry_policy=LABELS_RETRY_POLICY,
    specs=[dg.AssetSpec(LABELS_KEY, deps=[features], group_name="sae", kinds={"parquet", "html"},
                        code_version=CODE_VERSIONS["feature_labels"], automation_condition=automation_condition(),
                        description="A label and a detection score per live latent, and the dashboard with them; "
                                    "refuses partitions whose blocking checks failed. A ranged run (`run-sweep`) "
                                    "labels its partitions in turn; `step_timeout` bounds the whole run.")])
def feature_labels(context: dg.AssetExecutionContext, config: LabelsConfig,
                   storage: StorageResource) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    with stops_without_retry(context, storage.layout):
        yield from label_partitions(context, config, storage.layout)


def label_partitions(context: dg.AssetExecutionContext, config: LabelsConfig, layout: Layout
                     ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """Each partition of the step labelled in turn; one that fails fails alone. A ranged step is retried when a
    partition's failure allows it (an endpoint that stayed unavailable, with time left), and the retry skips the
    partitions an earlier attempt of the run labelled."""
    with not_retried("feature_labels"):
        spec = parse_spec(LabelsSpec, config.model_dump(), where="feature_labels config")
    refuse_if_other_lineage("feature_labels", layout)
    keys, failures, retryable = list(context.partition_keys), {}, []
    done = set() if context.has_partition_key else set(published_in_run(context.instance, "feature_labels", keys,
                                                                        context.run_id))
    deadline = Deadline(step_started(context), spec.step_timeout)
    tags = {}
    for number, key in enumerate(keys, 1):
        if key in done:
            context.log.info(f"feature_labels {key}: labelled by an earlier attempt of this run")
            continue
        with own_failure(context, key, failures):
            try:
                metadata = label_partition(context, spec, layout, key, deadline)
            except Exception as error:  # as the retry policy treats it: a Failure says, anything else is retried
                retryable.append(error.allow_retries if isinstance(error, dg.Failure) else True)
                raise
            if not context.has_partition_key:
                tags = provenance_tags(context.instance, context.run, CODE_VERSIONS["feature_labels"],
                                       {FEATURES_KEY: key})
            yield (dg.MaterializeResult(asset_key=LABELS_KEY, metadata=metadata) if context.has_partition_key else
                   dg.AssetMaterialization(asset_key=LABELS_KEY, partition=key, metadata=metadata, tags=tags))
            context.log.info(f"feature_labels {key}: published ({number}/{len(keys)})")
    fail_partitions("feature_labels", failures, len(keys), allow_retries=any(retryable))


def label_partition(context: dg.AssetExecutionContext, spec: LabelsSpec, layout: Layout, key: str,
                    deadline: Deadline) -> dict[str, Any]:
    """One partition of `feature_labels`: refuse it when blocked, label and score its live latents, publish;
    its metadata."""
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
    policy = context.op_def.retry_policy or LABELS_RETRY_POLICY
    retry_delay = policy.calculate_delay(context.retry_number + 1)
    with not_retried("feature_labels"):
        labeller, scorer = labeller_and_scorer(spec.labeller, timeout=spec.request_timeout, retries=spec.retries,
                                               step_seconds=max(deadline.left(), 1e-3))
    stamp = {"labeller": labeller.name,
             "features_sha256": hashlib.sha256((features_dir / FEATURES_FILE).read_bytes()).hexdigest()}
    scored = label_resumably(layout, key, stamp, deadline, retry_delay, lambda done, obtained: label_features(
        table, labeller, examples=examples, max_latents=spec.max_latents, done=done, obtained=obtained,
        progress=context.log.info),
        lambda labels: with_scores(labels, score_labels(labels, examples, scorer)))
    n_bands = read_json(features_dir / FEATURES_META_FILE).get("n_bands", 5)
    with layout.publish(layout.labels_dir(key)) as folder:
        write_labels(scored, folder / LABELS_FILE)
        render_dashboard(table, examples, folder / DASHBOARD_DIR, f"labelled features {key}", labels=scored,
                         n_bands=n_bands, reuse=features_dir / DASHBOARD_DIR)
    layout.remove(layout.labels_progress_dir(key))
    summary = scores_summary(scored)
    where = layout.location(layout.labels_dir(key))
    return {
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
    }
