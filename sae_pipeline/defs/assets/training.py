"""`sae`: one SAE per config partition, trained as groups in one pass over the activations for 1 to n
partitions (an imported partition evaluated as it is), each published with its check results as soon as it is
done."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from sae_pipeline import quality
from sae_pipeline.config import (
    ConfigError,
    SAEConfig,
)
from sae_pipeline.defs.assets.common import CODE_VERSIONS, automation_condition, validate_downstream_config
from sae_pipeline.defs.assets.data import activations
from sae_pipeline.defs.checks import SAE_CHECKS, refuse_if_blocked, refuse_if_other_lineage
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.profiles import gpu_op_tags
from sae_pipeline.defs.ranged import HeldChecks, fail_partitions, partition_materialisation
from sae_pipeline.defs.resources import (
    DeviceResource,
    ModelResource,
    QualityResource,
    StorageResource,
    TrackingResource,
)
from sae_pipeline.defs.staleness import provenance_tags
from sae_pipeline.defs.stops import stops_without_retry
from sae_pipeline.plots import png_markdown
from sae_pipeline.publish import Provenance, PublishedSAE, StoreTasks, imported_result, publish_sae
from sae_pipeline.registry import load_config, sweeps_of_keys
from sae_pipeline.sae_import import ImportRecord, check_against_store, imported_record, load_imported
from sae_pipeline.storage import (
    Layout,
)
from sae_pipeline.store import ActivationStore, store_of_hook
from sae_pipeline.tracking import DEFAULT_GROUP, PartitionTracking, RunEnd, RunInfo, Tracking
from sae_pipeline.training import checkpoint_step, plan_groups, train_group

SAE_RUN_SIZE = 8
"""Partitions of `sae` per run in an asset backfill (from the UI or the schedule): each run trains its configs as
groups in one pass over the activations (`plan_groups` splits by batch size, seed, resume step and memory)."""


def training_hooks(context: dg.AssetExecutionContext, layout: Layout, key: str, tracked: PartitionTracking
                   ) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """The per-row log (the run's debug log and the tracking runs) and the after-checkpoint hook (commit to
    object storage) of one partition's training."""
    checkpoints = layout.checkpoint_dir(key)

    def log(row: dict) -> None:
        context.log.debug(f"{key} step {row['step']}: {row}")
        tracked.log(row)

    return log, (lambda: layout.push(checkpoints))


def start_tracking(tracking: Tracking, layout: Layout, keys: list[str], cfgs: dict[str, SAEConfig],
                   store: ActivationStore) -> dict[str, PartitionTracking]:
    """Each key's tracking runs, grouped by the sweep that registered it; the config logged with the model and
    hook it reads."""
    where = {"model": store.meta["model"], "hook_name": store.meta.get("hook_name", "")}
    sweeps = sweeps_of_keys(layout) if tracking.enabled else {}
    return {key: tracking.start(RunInfo(key, sweeps.get(key, DEFAULT_GROUP),
                                        {**cfgs[key].model_dump(mode="json"), "partition_key": key, **where}))
            for key in keys}


def tracking_end(published: PublishedSAE) -> RunEnd:
    return RunEnd("finished", published.evaluation,
                  {o.name: "pass" if o.passed else o.severity for o in published.outcomes}, published.weights_dir)


def ready_configs(layout: Layout, acts: Path, keys: list[str], device: DeviceResource
                  ) -> tuple[dict[str, SAEConfig], dict[str, ActivationStore], dict[str, str]]:
    """Each key's config and the store of its hook, validated against that store; the keys that failed, why."""
    cfgs: dict[str, SAEConfig] = {}
    stores: dict[Path, ActivationStore] = {}
    store_of: dict[str, ActivationStore] = {}
    failures: dict[str, str] = {}
    for key in keys:
        try:
            cfg = load_config(layout, key)
            folder = store_of_hook(acts, cfg.hook)
            if folder not in stores:
                stores[folder] = ActivationStore(folder)
            store = stores[folder]
            cfg.validate_for_model(store.d_model, device.memory_bytes())
        except ConfigError as error:
            failures[key] = str(error)
            continue
        cfgs[key], store_of[key] = cfg, store
    return cfgs, store_of, failures


def train_partitions(context: dg.AssetExecutionContext, layout: Layout, acts: Path, keys: list[str],
                     device: DeviceResource, thresholds: quality.QualityThresholds, trust_remote_code: bool,
                     tracking: Tracking) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """Train the partitions of a run as groups, each in one pass over its hook's activations, and materialise
    each partition with its own metadata and check results as soon as it is published. A config that is
    invalid, fails to start, train or publish, or fails a blocking check fails its own partition: its group
    mates are published, and the step fails at the end naming each failed partition and why (a backfill marks
    only those failed)."""
    imported = {key: record for key in keys if (record := imported_record(layout, key)) is not None}
    cfgs, store_of, failures = ready_configs(layout, acts, [k for k in keys if k not in imported], device)
    tags = provenance_tags(context.instance, context.run, CODE_VERSIONS["sae"], {activations.key: None})
    for key in cfgs:
        layout.restore(layout.checkpoint_dir(key))
    by_store: dict[Path, list[str]] = {}
    for key in cfgs:
        by_store.setdefault(store_of[key].folder, []).append(key)
    planned = [[ready[i] for i in group] for ready in by_store.values()
               for group in plan_groups([cfgs[k] for k in ready], store_of[ready[0]].d_model, device.memory_bytes(),
                                        [checkpoint_step(layout.checkpoint_dir(k)) for k in ready])]
    checks = HeldChecks(context)
    tasks = StoreTasks(layout, trust_remote_code, device.resolve())
    try:
        for key, record in imported.items():
            checks.log()
            yield from _publish_imported(context, layout, acts, key, record, device, thresholds, tasks, tags,
                                         failures, checks)
        for number, members in enumerate(planned, 1):
            checks.log()  # before the next group trains: the last partition published has its checks in the UI
            yield from _train_and_materialise(context, layout, members, cfgs, store_of[members[0]], device,
                                              thresholds, tasks, tags, failures, checks,
                                              f"{number}/{len(planned)}", tracking)
    except BaseException:
        checks.log()  # a stop or an error: every partition published keeps its evaluations
        raise
    finally:
        tracking.close()  # a run a stop or an error left open ends as killed
    yield from checks.as_outputs()
    fail_partitions("sae", failures, len(keys))


def _train_and_materialise(context: dg.AssetExecutionContext, layout: Layout, members: list[str],
                           cfgs: dict[str, SAEConfig], store: ActivationStore, device: DeviceResource,
                           thresholds: quality.QualityThresholds, tasks: StoreTasks, tags: dict[str, str],
                           failures: dict[str, str], checks: HeldChecks, number: str, tracking: Tracking
                           ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """One group of `train_partitions`: train it in one pass, then publish and materialise each member; a
    member that fails goes into `failures` with why."""
    context.log.info(f"sae group {number}: {len(members)} configs in one pass over the "
                     f"activations at {store.meta.get('hook_name', 'the store')}: {', '.join(members)}")
    tracked = start_tracking(tracking, layout, members, cfgs, store)
    hooks = [training_hooks(context, layout, key, tracked[key]) for key in members]
    results = train_group([cfgs[k] for k in members], store, device.resolve(),
                          [layout.checkpoint_dir(k) for k in members], [h[0] for h in hooks],
                          [h[1] for h in hooks], progress=context.log.info)
    for key, result in zip(members, results, strict=True):
        if isinstance(result, Exception):
            failures[key] = f"training failed ({type(result).__name__}: {result}); its checkpoint is kept"
            tracked[key].end(RunEnd("failed"))
            continue
        try:
            published = publish_sae(layout, key, Provenance.trained(cfgs[key]), store, result, device.resolve(),
                                    thresholds, tasks)
        except Exception as error:  # evaluating or writing one partition must not cost its mates theirs
            failures[key] = f"publishing failed ({type(error).__name__}: {error}); rerun to retrain it"
            tracked[key].end(RunEnd("failed"))
            continue
        tracked[key].end(tracking_end(published))
        yield from _materialise(context, key, published, tags, failures, checks)
        context.log.info(f"sae {key}: published ({len(failures)} failed so far)")


def _materialise(context: dg.AssetExecutionContext, key: str, published: PublishedSAE, tags: dict[str, str],
                 failures: dict[str, str], checks: HeldChecks
                 ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """A published partition's materialisation with its check results; in a ranged run, a partition that failed
    a blocking check goes into `failures`."""
    checks.hold((yield from partition_materialisation(context, SAE_KEY, key, sae_metadata(published, key),
                                                        published.outcomes, tags)))
    if published.blocking_failures and not context.has_partition_key:
        failures[key] = "failed blocking checks: " + ", ".join(published.blocking_failures)


def _publish_imported(context: dg.AssetExecutionContext, layout: Layout, acts: Path, key: str,
                      record: ImportRecord, device: DeviceResource, thresholds: quality.QualityThresholds,
                      tasks: StoreTasks, tags: dict[str, str], failures: dict[str, str], checks: HeldChecks
                      ) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """One imported partition of `train_partitions`: checked again against its store (which may have been
    re-extracted since the import), then evaluated, checked and published as it is; nothing is trained."""
    context.log.info(f"sae {key}: imported from {record.source} ({record.format}); evaluating it as it is")
    try:
        store = ActivationStore(store_of_hook(acts, record.store_hook))
        autoencoder = load_imported(layout, key)
        check_against_store(autoencoder, {"model_name": record.model, "hook_name": record.hook_name}, store.meta)
        published = publish_sae(layout, key, Provenance.of_import(record), store, imported_result(autoencoder),
                                device.resolve(), thresholds, tasks)
    except Exception as error:  # one partition's failure must not cost the others theirs
        failures[key] = f"publishing the imported SAE failed ({type(error).__name__}: {error})"
        return
    yield from _materialise(context, key, published, tags, failures, checks)


SAE_KEY = dg.AssetKey("sae")


def sae_metadata(published: PublishedSAE, key: str) -> dict[str, Any]:
    """A published partition's materialisation metadata: its values, its folder, and each plot inline."""
    plots = {name: dg.MetadataValue.md(png_markdown(png, f"{name.replace('_', ' ')} {key}"))
             for name, png in published.plots.items()}
    return {**published.values, "weights_dir": dg.MetadataValue.path(published.weights_dir), **plots}


@dg.multi_asset(
    name="sae", partitions_def=sae_configs, check_specs=SAE_CHECKS, can_subset=True, pool="gpu",
    op_tags=gpu_op_tags(), backfill_policy=dg.BackfillPolicy.multi_run(SAE_RUN_SIZE),
    specs=[dg.AssetSpec(SAE_KEY, deps=[activations], group_name="sae", kinds={"pytorch"},
                        code_version=CODE_VERSIONS["sae"],
                        automation_condition=automation_condition(),
                        description="One SAE per config partition, in the SAELens file layout. A run over several "
                                    "partitions (an asset backfill, `run-sweep`) trains them as groups, each in "
                                    "one pass over the activations. An `imported_` partition (`sae-pipeline "
                                    "import-sae`) is evaluated and checked as it is, nothing trained.")])
def sae(context: dg.AssetExecutionContext, storage: StorageResource, device: DeviceResource,
        quality_thresholds: QualityResource, model: ModelResource,
        tracking: TrackingResource) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    layout = storage.layout
    with stops_without_retry(context, layout):
        yield from train_and_publish(context, layout, device, quality_thresholds.thresholds(), model,
                                     tracking.session(layout, context.log.warning))


def train_and_publish(context: dg.AssetExecutionContext, layout: Layout, device: DeviceResource,
                      thresholds: quality.QualityThresholds, model: ModelResource,
                      tracking: Tracking) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """The body of `sae`: its partitions, one or many, trained as groups and published (`train_partitions`)."""
    validate_downstream_config(context, "features", "feature_labels")
    refuse_if_other_lineage("sae", layout, model.name)
    acts = layout.pull(layout.activations_dir)
    refuse_if_blocked("sae", context.partition_key if context.has_partition_key else None,
                      quality.blocking_failures(acts, missing_ok=True))
    yield from train_partitions(context, layout, acts, list(context.partition_keys), device, thresholds,
                                model.trust_remote_code, tracking)
