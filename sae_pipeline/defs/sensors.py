"""Sensors (both off by default): register sweep specs dropped into the sweeps folder, and close the l1_alpha
calibration loop (register the proposed config as a new partition and request its run until L0 is on target)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from sae_pipeline.calibration import GroupPlan, calibration_state
from sae_pipeline.config import ConfigError
from sae_pipeline.defs.assets import automation_condition
from sae_pipeline.defs.dagster_private import ExecutionResult
from sae_pipeline.defs.jobs import analysis_job, sweep_job
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import ModelResource, StorageResource
from sae_pipeline.defs.schedules import latest_partition_run
from sae_pipeline.model import model_width
from sae_pipeline.registry import (
    SweepFile,
    read_sweep_file,
    scan_sweeps,
    store_configs,
    sweeps_dir,
    validate_configs_for_model,
)
from sae_pipeline.results import read_summary
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_spec import CalibrationSpec


def register_sweep_file(layout: Layout, sweep: SweepFile, d_model: int, existing: set[str]) -> list[str]:
    """Store the configs of a valid sweep (validated against d_model first); the keys not yet partitions."""
    if sweep.spec is None:
        raise ConfigError(sweep.error or f"{sweep.path}: not a sweep spec")
    validate_configs_for_model(sweep.configs, d_model, where=f"{sweep.path.name}: ")
    keys = store_configs(layout, list(sweep.configs), sweep.spec.name)
    return [key for key in keys if key not in existing]


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Registers the sweep specs in the sweeps folder (data/sweeps/*.yaml) as sae_configs "
                       "partitions when a file is new or its content changed (cursor: sha256 per file).")
def sweep_files_sensor(context: dg.SensorEvaluationContext, storage: StorageResource,
                       model: ModelResource) -> dg.SensorResult | dg.SkipReason:
    layout = storage.layout
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    changed = [s for s in scan_sweeps(sweeps_dir(layout)) if seen.get(s.path.name) != s.digest]
    if not changed:
        return dg.SkipReason("no new or changed sweep file")
    existing = set(context.instance.get_dynamic_partitions(sae_configs.name))
    d_model: int | None = None
    new_keys: list[str] = []
    for sweep in changed:
        seen[sweep.path.name] = sweep.digest  # an invalid file is reported once, and again when it changes
        if sweep.spec is None:
            context.log.info(f"{sweep.path.name}: skipped, not a valid sweep spec: {sweep.error}")
            continue
        if d_model is None:
            d_model = model_width(model.name)[0]
        try:
            keys = register_sweep_file(layout, sweep, d_model, existing | set(new_keys))
        except ConfigError as error:
            context.log.warning(f"{sweep.path.name}: not registered: {error}")
            continue
        context.log.info(f"{sweep.path.name}: {len(sweep.configs)} configs, {len(keys)} new partitions")
        new_keys += keys
    requests = [sae_configs.build_add_request(new_keys)] if new_keys else []
    return dg.SensorResult(dynamic_partitions_requests=requests, cursor=json.dumps(seen, sort_keys=True))


# --- calibration ---------------------------------------------------------------------------------------


def _group_keys(plan: GroupPlan, layout: Layout) -> list[str]:
    from sae_pipeline.calibration import calibratable, group_id
    from sae_pipeline.registry import registered_configs

    return [key for key, config in registered_configs(layout).items()
            if calibratable(config) and group_id(config) == plan.group]


def calibration_requests(instance: dg.DagsterInstance, layout: Layout,
                         log: Callable[[str], None] = lambda _: None) -> dg.SensorResult | dg.SkipReason:
    """One calibration tick over the enabled sweeps: run unfinished seeds, then register and run proposals."""
    registered = set(instance.get_dynamic_partitions(sae_configs.name))
    pending: set[str] = set()
    never_run: list[str] = []
    for key in registered:
        if read_summary(layout, key) is not None:
            continue
        latest = latest_partition_run(instance, key)
        if latest is None:
            never_run.append(key)
            pending.add(key)
        elif not latest.is_finished:
            pending.add(key)
    states = [s for s in calibration_state(layout, pending) if s.enabled]
    run_requests, new_keys, configs = [], [], {}
    for state in states:
        for plan in state.plans:
            log(f"{state.sweep.path.name} {plan.group}: {plan.status}: {plan.reason}")
            group = set(_group_keys(plan, layout))
            for key in sorted(group & set(never_run) & registered):
                run_requests.append(dg.RunRequest(run_key=f"calibration:{key}", partition_key=key,
                                                  job_name=sweep_job.name))
            if plan.status == "propose" and plan.config is not None:
                key = plan.config.partition_key()
                configs.setdefault(state.sweep.spec.name, []).append(plan.config)
                new_keys.append(key)
                run_requests.append(dg.RunRequest(run_key=f"calibration:{key}", partition_key=key,
                                                  job_name=sweep_job.name,
                                                  tags={"sae_pipeline/calibration": plan.group}))
            elif plan.status == "converged" and plan.proposal.best is not None:
                run_requests.append(dg.RunRequest(run_key=f"calibration-report:{plan.group}:{plan.proposal.best.key}",
                                                  job_name=analysis_job.name))
    if not states:
        return dg.SkipReason("no sweep spec with an enabled `calibration` section has a registered relu config "
                             "with target_l0")
    for sweep_name, proposed in configs.items():  # a proposal belongs to the sweep it calibrates
        store_configs(layout, proposed, sweep_name)
    requests = [sae_configs.build_add_request(new_keys)] if new_keys else []
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests)


@dg.sensor(jobs=[sweep_job, analysis_job], minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Closed-loop l1_alpha calibration for sweeps with a `calibration` section: registers the "
                       "proposed config as a new sae_configs partition and requests its run, until a run's L0 is "
                       "within tolerance of target_l0 or max_rounds proposals were made.")
def calibration_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    return calibration_requests(context.instance, storage.layout, context.log.info)


# --- the same loop in one process (the `sae-pipeline calibrate` command) ----------------------------------


def _execute(job: dg.JobDefinition, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    return job.execute_in_process(instance=instance, raise_on_error=False, **kwargs)


def calibrate_in_process(path: str | Path, instance: dg.DagsterInstance, defs: dg.Definitions, layout: Layout,
                         run_config: dict | None = None, log: Callable[[str], None] = print,
                         execute: Callable[..., ExecutionResult] = _execute) -> list[GroupPlan]:
    """Run the sweep's unfinished relu/target_l0 configs, then proposals, one at a time, until every base config
    is converged, at its round limit or stalled; then `analyze_sweep`. Returns the final plans.

    The sweep's `calibration` section gives tolerance and max_rounds (defaults when absent). Assumes the
    sweep is registered and the activations exist.
    """
    sweep = read_sweep_file(Path(path))
    if sweep.spec is None:
        raise ConfigError(sweep.error or str(path))
    settings = sweep.spec.calibration or CalibrationSpec()
    job = defs.resolve_job_def(sweep_job.name)
    failed: set[str] = set()
    for _ in range(settings.max_rounds + len(sweep.configs) + 1):
        (state,) = calibration_state(layout, sweeps=[sweep]) or (None,)
        if state is None:
            raise ConfigError(f"{path}: no registered relu config with target_l0 to calibrate")
        todo = sorted({k for plan in state.plans for k in _group_keys(plan, layout)}
                      - {k for k in failed} - {k for k in instance.get_dynamic_partitions(sae_configs.name)
                                                if read_summary(layout, k) is not None})
        proposals = [plan for plan in state.plans if plan.status == "propose" and plan.config is not None]
        if not todo:
            for plan in proposals:
                (key,) = store_configs(layout, [plan.config], sweep.spec.name)  # type: ignore[list-item]
                instance.add_dynamic_partitions(sae_configs.name, [key])
                log(f"propose {plan.group}: l1_alpha={plan.proposal.l1_alpha:.4g} ({plan.reason}) -> {key}")
                todo.append(key)
        if not todo:
            for plan in state.plans:
                log(f"done {plan.group}: {plan.status}: {plan.reason}")
            execute(defs.resolve_job_def(analysis_job.name), instance, run_config=run_config)
            return state.plans
        for key in todo:
            result = execute(job, instance, partition_key=key, run_config=run_config)
            summary = read_summary(layout, key)
            l0 = summary["metrics"]["l0_fraction"] if summary else None
            if l0 is None:
                failed.add(key)
            log(f"run {key}: {'ok' if result.success else 'FAILED'}, held-out L0 fraction {l0}")
    raise RuntimeError("calibration did not settle within its round budget")


AUTOMATION_SENSOR = "sweep_automation_sensor"


def automation_sensors(environ: dict[str, str] | None = None) -> list[dg.SensorDefinition]:
    """With SAE_PIPELINE_AUTOMATION=eager, the sensor that evaluates the assets' automation conditions, running
    from the start (setting the variable is the opt-in); none when it is unset."""
    if automation_condition(environ) is None:
        return []
    return [dg.AutomationConditionSensorDefinition(AUTOMATION_SENSOR, target=dg.AssetSelection.all(),
                                                   default_status=dg.DefaultSensorStatus.RUNNING)]
