"""Runs executed in this process by the CLI: stopped cleanly by SIGINT/SIGTERM, and dead ones released.

Dagster turns a signal during a step into a step failure and returns; the CLI would then start the next run.
A wakeup fd records every signal at C level, whichever Python handler Dagster has installed at that moment,
so after each run the CLI knows it was told to stop: it marks the run cancelled by the user, naming the step
that stopped and what it kept (`stops.kept_after_stop`), starts nothing more and exits 128 + the signal
number. The console shows no traceback for the stop: the CLI says it in one line.

Each run carries the pid and host of the process executing it. At start-up, a run still STARTING/STARTED
whose process is gone (SIGKILL, OOM, power loss) is marked failed and its concurrency-pool slots freed, so the
next run never waits on a dead one ("blocked by limit for pool gpu").

Each run is a run of the code location that `workspace.yaml` loads (its remote origin and code origin are set,
as for a run launched from the UI), so the job pages, the Overview timeline and re-execution see it; only its
executor is the in-process one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

import sae_pipeline
from sae_pipeline.defs.dagster_private import (
    SINGLETON_REPOSITORY_NAME,
    ExecutionResult,
    InMemoryJob,
    LoadableTargetOrigin,
    ManagedGrpcPythonEnvCodeLocationOrigin,
    ReconstructableRepository,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
    create_execution_plan,
    execute_run,
    merge_run_tags,
)
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.schedules import PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG
from sae_pipeline.defs.stops import Stopped, kept_after_stop, published_in_run
from sae_pipeline.storage import Layout

PID_TAG = "sae_pipeline/pid"
HOST_TAG = "sae_pipeline/host"
STOPPED_TAG = "sae_pipeline/stopped_by"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOCATION_NAME = "sae_pipeline.definitions"
"""The code location `workspace.yaml` loads: a `python_module` entry is named after its module."""
DEFS_ATTRIBUTE = "defs"


def process_tags() -> dict[str, str]:
    """Tags naming the process that executes a run (read back by `release_dead_runs`)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


class StopSignals:
    """Records SIGINT/SIGTERM through a wakeup fd; between runs a signal raises `Stopped` at once. `layout` is
    where the stopped step's partitions are read to say what it kept."""

    def __init__(self, layout: Layout) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._received: int | None = None
        self.layout = layout

    def _raise(self, signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous_fd = signal.set_wakeup_fd(self._write)
        previous = {s: signal.signal(s, self._raise) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(self._read)
            os.close(self._write)

    def received(self) -> int | None:
        """The first SIGINT/SIGTERM received so far, if any."""
        with contextlib.suppress(BlockingIOError):
            for number in os.read(self._read, 512):
                if number in STOP_SIGNALS and self._received is None:
                    self._received = number
        return self._received

    def execute(self, job: dg.JobDefinition, instance: dg.DagsterInstance, **kwargs: Any) -> ExecutionResult:
        """`execute_location_run`, tagged with this process, its console quiet about a stop's failures; if a
        stop signal arrived meanwhile, the run is marked cancelled by the user (when it did not finish) and
        `Stopped` is raised, naming the step that was running and what it kept."""
        def stopping() -> bool:
            return self.received() is not None

        job = job.with_logger_defs({"console": console_logger(stopping)})
        with quiet_while(POOL_LOGGER, stopping):
            result = execute_location_run(job, instance, tags={**kwargs.pop("tags", {}), **process_tags()},
                                          **kwargs)
        signum = self.received()
        if signum is None:
            return result
        if result.success:
            raise Stopped(signum)
        step, keys = stopped_step(result), run_partitions(instance, result.run_id)
        published = published_in_run(instance, step, keys, result.run_id) if step else []
        stopped = Stopped(signum, step, keys, kept_after_stop(step, keys, self.layout, published) if step else "")
        mark_cancelled(instance, result.run_id, stopped)
        raise stopped


POOL_LOGGER = "sqlalchemy.pool"
"""A stop can land while the instance's storage closes a database connection; the pool logs that interrupted
close as an error with the stop's traceback (printed by Python's last-resort handler)."""


@contextlib.contextmanager
def quiet_while(logger_name: str, stopping: Callable[[], bool]) -> Iterator[None]:
    """Drop the named logger's records once `stopping()`, for the duration of the block."""
    logger = logging.getLogger(logger_name)

    def keep(_record: logging.LogRecord) -> bool:
        return not stopping()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def console_logger(stopping: Callable[[], bool]) -> dg.LoggerDefinition:
    """Dagster's console output (its format, to stderr) less the ERROR records once `stopping()`: after a stop
    the step's and the run's failures, each with a framework traceback, are the stop itself, which the CLI
    reports in one line (the run's event log keeps them)."""

    def build(context: dg.InitLoggerContext) -> logging.Logger:
        logger = logging.Logger(context.logger_config["name"], level=context.logger_config["log_level"])
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s",
                                               "%Y-%m-%d %H:%M:%S %z"))
        handler.addFilter(lambda record: record.levelno < logging.ERROR or not stopping())
        logger.addHandler(handler)
        return logger

    return dg.LoggerDefinition(build, description="Console logger of the CLI's runs", config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO"),
        "name": dg.Field(str, is_required=False, default_value="dagster")})


def stopped_step(result: ExecutionResult) -> str | None:
    """The step that failed in a stopped run (the one the stop interrupted), or None when none had started."""
    return next((event.step_key for event in result.all_events if event.is_step_failure), None)


def failure_message(result: ExecutionResult) -> str:
    """The first step failure of a run, as one line (its error message, not the traceback)."""
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if event.is_step_failure and error is not None:
            return f"{event.step_key}: {error.message.strip().splitlines()[0]}"
    return "see the run in the UI"


def run_partitions(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The partition keys of a run: its one partition, every key of its range (in registration order), or
    none."""
    run = instance.get_run_by_id(run_id)
    tags = run.tags if run else {}
    if PARTITION_TAG in tags:
        return [tags[PARTITION_TAG]]
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if start is None or end is None:
        return []
    keys = instance.get_dynamic_partitions(sae_configs.name)
    return keys[keys.index(start):keys.index(end) + 1] if start in keys and end in keys else [start, end]


def location_origins(job_name: str) -> tuple[RemoteJobOrigin, Any]:
    """The remote origin (the code location `workspace.yaml` loads) and the Python code origin of a job of this
    package: what a run launched from the UI carries, so the UI files the run under its job."""
    working_directory = str(Path(sae_pipeline.__file__).resolve().parents[1])
    loadable = LoadableTargetOrigin(executable_path=sys.executable, module_name=LOCATION_NAME,
                                    working_directory=working_directory)
    location = ManagedGrpcPythonEnvCodeLocationOrigin(loadable, location_name=LOCATION_NAME)
    remote = RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job_name)
    repository = ReconstructableRepository.for_module(LOCATION_NAME, DEFS_ATTRIBUTE, working_directory)
    return remote, repository.get_reconstructable_job(job_name).get_python_origin()


def execute_location_run(job: dg.JobDefinition, instance: dg.DagsterInstance, *, run_config: dict | None = None,
                         tags: dict[str, str] | None = None, partition_key: str | None = None,
                         asset_selection: Sequence[dg.AssetKey] | None = None) -> ExecutionResult:
    """Create a run of `job` as a run of the code location (see `location_origins`) and execute it here, with
    the in-process executor; the same arguments as `execute_in_process`, and failures are returned, not
    raised."""
    selection = list(asset_selection or [])
    run_config = run_config or {}
    in_process = InMemoryJob(job.as_ephemeral_job(resource_defs={}, input_values={}))
    subset = in_process.get_subset(asset_selection=frozenset(selection)) if selection else in_process
    remote_origin, code_origin = location_origins(job.name)
    run = instance.create_run_for_job(
        job_def=subset.get_definition(), run_config=run_config,
        tags=merge_run_tags(job, partition_key, tags, selection, instance, run_config),
        asset_selection=frozenset(selection) or None, remote_job_origin=remote_origin, job_code_origin=code_origin,
        execution_plan=create_execution_plan(subset, run_config=run_config, instance_ref=instance.get_ref()))
    return execute_run(in_process, run, instance)


def mark_cancelled(instance: dg.DagsterInstance, run_id: str, stopped: Stopped) -> None:
    """Record an interrupted run as CANCELED by the user, not as a failure, and free its pool slots; its
    message names the step that stopped and what it kept."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return
    name = signal.Signals(stopped.signum).name
    instance.add_run_tags(run_id, {STOPPED_TAG: name})
    instance.report_run_canceled(run, message=f"Stopped by the user ({name}) {stopped.where()}; "
                                              + (stopped.kept or "kept: every finished step"))
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed, and free the pool slots of, every unfinished run started by a process of this host that is
    gone; returns their run ids. Runs of live processes and of other hosts are left alone."""
    released = []
    statuses = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses, tags={HOST_TAG: socket.gethostname()})):
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or _alive(int(pid)) or int(pid) == os.getpid():
            continue
        instance.report_run_failed(run, message=f"The process that executed this run (pid {pid}) is gone "
                                                 "(killed?); marked failed so its pool slots are freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released
