"""`sae-pipeline`: register sweeps and run the whole default sweep against the instance under DAGSTER_HOME."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sae_pipeline.config import ConfigError, validate_partition_key
from sae_pipeline.storage import Layout, default_root, exclusive
from sae_pipeline.sweep_spec import load_sweep

if TYPE_CHECKING:
    from sae_pipeline.defs.runs import StopSignals

QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
"""Run config for in-process runs: step-level INFO on the console (the UI keeps every event)."""


def _default_dagster_home() -> None:
    """Runs and partitions persist in `<storage root>/dagster_home` unless DAGSTER_HOME says otherwise."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Layout.at(default_root()).root / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)


INSTANCE_LOCK = ".sae_pipeline_instance.lock"


def register(path: str, dry_run: bool) -> list[str]:
    """Validate a sweep spec, then (unless dry_run) store its configs and add its partitions."""
    from sae_pipeline.defs.partitions import sae_configs
    from sae_pipeline.defs.resources import default_resources
    from sae_pipeline.model import model_width
    from sae_pipeline.registry import store_configs, validate_configs_for_model

    spec = load_sweep(path)
    configs = spec.expand()
    validate_configs_for_model(configs, model_width(default_resources()["model"].name)[0])
    keys = [config.partition_key() for config in configs]
    if dry_run:
        return keys
    layout = Layout.at(default_root())
    layout.check_writable()
    store_configs(layout, configs, spec.name)
    instance = open_instance()
    existing = set(instance.get_dynamic_partitions(sae_configs.name))
    instance.add_dynamic_partitions(sae_configs.name, [k for k in keys if k not in existing])
    return keys


def activations_are_usable(layout: Layout) -> bool:
    """An activation store exists and was made from the corpus now on disk (and the configured model)."""
    from sae_pipeline.defs.resources import default_resources
    from sae_pipeline.lineage import LINEAGE_FILE, LineageError, lineage_mismatch
    from sae_pipeline.storage import CORPUS_FILE

    if not (layout.pull(layout.activations_dir, "meta.json") / "meta.json").exists():
        return False
    try:
        problem = lineage_mismatch(layout.pull(layout.activations_dir, LINEAGE_FILE),
                                   layout.pull(layout.corpus_dir, CORPUS_FILE), default_resources()["model"].name)
    except LineageError as error:
        problem = str(error)
    if problem:
        print(f"== activations out of date: {problem}", flush=True)
    return problem is None


def ensure_activations(defs, instance, layout: Layout, refresh: bool, stop: StopSignals) -> bool:
    """Run `prepare_activations` when asked to or when no usable activation store exists; False if that run
    failed.

    Under a lock on the storage root: of two commands started at once on a fresh root, one extracts and the
    other waits, then finds the store."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.root / ".activations.lock"):
        if not refresh and activations_are_usable(layout):
            return True
        print("== prepare_activations: corpus + activations", flush=True)
        return stop.execute(defs.resolve_job_def("prepare_activations"), instance, run_config=QUIET).success


def open_instance():
    """The instance under DAGSTER_HOME, created and migrated by one command at a time, with the runs of dead
    processes marked failed and their slots freed.

    Opening an instance creates its SQLite databases and stamps their schema version; two first commands on a
    fresh home doing that at once can crash or leave two alembic heads that every later command fails on.
    """
    import dagster as dg

    from sae_pipeline.defs.runs import release_dead_runs

    with exclusive(Path(os.environ["DAGSTER_HOME"]) / INSTANCE_LOCK):
        instance = dg.DagsterInstance.get()
    for run_id in release_dead_runs(instance):
        print(f"== run {run_id}: its process is gone; marked failed, pool slots freed", flush=True)
    return instance


SWEEP_ASSETS = ("sae", "features", "feature_labels")
"""What `train_sweep` materialises per partition, in order."""


def assets_to_run(defs, instance, keys: list[str], refresh: bool) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per key, the train_sweep assets from the first one that is not current (never materialised, or made with
    another code version or from other upstream data) on, all of them with `refresh`; and, per key whose first
    such asset was materialised before, why it is stale (Dagster's causes, as the UI shows them)."""
    from sae_pipeline.defs.staleness import is_current, stale_causes, stale_resolver

    resolver = stale_resolver(instance, defs)
    todo, why = {}, {}
    for key in keys:
        stale = [i for i, asset in enumerate(SWEEP_ASSETS) if refresh or not is_current(resolver, asset, key)]
        todo[key] = list(SWEEP_ASSETS[stale[0]:]) if stale else []
        causes = stale_causes(resolver, SWEEP_ASSETS[stale[0]], key) if stale and not refresh else []
        if causes:
            why[key] = f"{SWEEP_ASSETS[stale[0]]} is stale: " + "; ".join(causes)
    return todo, why


def ranged_runs(defs, instance, asset: str, keys: list[str], size: int, stop: StopSignals) -> set[str]:
    """Materialise `asset` for `keys` as ranged runs of at most `size` consecutive partitions (the path an asset
    backfill takes: each run loads what its partitions share once); returns the keys that were not materialised."""
    import dagster as dg

    from sae_pipeline.defs.partitions import key_ranges, sae_configs
    from sae_pipeline.defs.runs import failure_message
    from sae_pipeline.defs.schedules import RANGE_END_TAG, RANGE_START_TAG
    from sae_pipeline.defs.stops import published_in_run

    failed: set[str] = set()
    ranges = key_ranges(instance.get_dynamic_partitions(sae_configs.name), set(keys), size)
    for index, members in enumerate(ranges, 1):
        how = ", trained as groups in one pass each" if asset == "sae" else ""
        print(f"== train_sweep {asset} [{index}/{len(ranges)}]: {len(members)} config(s) in one run{how}: "
              f"{', '.join(members)}", flush=True)
        where = ({"partition_key": members[0]} if len(members) == 1 else
                 {"tags": {RANGE_START_TAG: members[0], RANGE_END_TAG: members[-1]}})
        result = stop.execute(defs.resolve_job_def("train_sweep"), instance, run_config=QUIET,
                              asset_selection=[dg.AssetKey(asset)], **where)
        if not result.success:
            print(f"   {failure_message(result)}", flush=True)
        failed |= set(members) - set(published_in_run(instance, asset, members, result.run_id))
    return failed


def run_sweep(path: str, refresh_activations: bool, stop: StopSignals, refresh: bool = False) -> int:
    """Register the sweep, extract activations if needed, then materialise `sae`, `features` and
    `feature_labels` where they are not current (all with `refresh`), each as ranged runs (`sae` trains its
    configs as groups; a partition that failed is not taken further), then the sweep report."""
    from sae_pipeline.check_matrix import check_matrix_markdown
    from sae_pipeline.definitions import defs
    from sae_pipeline.defs.assets import FEATURES_RUN_SIZE, SAE_RUN_SIZE
    from sae_pipeline.defs.runs import failure_message

    keys = register(path, dry_run=False)
    instance = open_instance()
    layout = Layout.at(default_root())
    if not ensure_activations(defs, instance, layout, refresh_activations, stop):
        return 1
    todo, why = assets_to_run(defs, instance, keys, refresh)
    for key in keys:
        if not todo[key]:
            print(f"== {key}: skipped, current (same config, code version and activations; --refresh retrains)",
                  flush=True)
        elif key in why:
            print(f"== {key}: reruns from {todo[key][0]} ({why[key]})", flush=True)
    failed: set[str] = set()
    for asset, size in (("sae", SAE_RUN_SIZE), ("features", FEATURES_RUN_SIZE), ("feature_labels", FEATURES_RUN_SIZE)):
        wanted = [key for key in keys if asset in todo[key] and key not in failed]
        failed |= ranged_runs(defs, instance, asset, wanted, size, stop)
    print("== analyze_sweep", flush=True)
    analysis = stop.execute(defs.resolve_job_def("analyze_sweep"), instance, run_config=QUIET)
    _print_results(layout, keys, sorted(failed))
    print("\n" + check_matrix_markdown(layout, keys), flush=True)
    if not analysis.success:
        print(f"error: analyze_sweep failed: {failure_message(analysis)}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def calibrate(path: str, stop: StopSignals) -> int:
    """Register the sweep, extract activations if needed, then run the l1_alpha calibration loop in process."""
    from sae_pipeline.definitions import defs
    from sae_pipeline.defs.sensors import calibrate_in_process

    register(path, dry_run=False)
    instance, layout = open_instance(), Layout.at(default_root())
    if not ensure_activations(defs, instance, layout, False, stop):
        return 1
    plans = calibrate_in_process(path, instance, defs, layout, run_config=QUIET,
                                 log=lambda line: print(f"== {line}", flush=True), execute=stop.execute)
    print(f"\nCalibration report: {layout.location(layout.calibration_dir, 'report.md')}")
    return 0 if all(plan.status == "converged" for plan in plans) else 1


def import_partition(folder: str, name: str | None, stop: StopSignals) -> int:
    """Import an SAE as a partition (`sae_import.import_sae`; the folder is read and refused before anything
    runs), then materialise its `sae` (held-out metrics, checks and real-task evaluations; nothing trained),
    `features` and `feature_labels` where they are not current, then the sweep report; the partition key is the
    last line printed."""
    from sae_pipeline.definitions import defs
    from sae_pipeline.defs.partitions import sae_configs
    from sae_pipeline.defs.runs import failure_message
    from sae_pipeline.sae_import import import_sae, read_foreign_sae

    read_foreign_sae(Path(folder))  # a folder that holds no SAE is refused before activations are extracted
    instance = open_instance()
    layout = Layout.at(default_root())
    if not ensure_activations(defs, instance, layout, False, stop):
        return 1
    record = import_sae(layout, Path(folder), name, layout.pull(layout.activations_dir))
    print(f"== imported {record.source} ({record.format} {record.architecture}, d_in {record.d_in}, d_sae "
          f"{record.d_sae}) as {record.key}", flush=True)
    if not instance.has_dynamic_partition(sae_configs.name, record.key):
        instance.add_dynamic_partitions(sae_configs.name, [record.key])
    todo, _ = assets_to_run(defs, instance, [record.key], refresh=False)
    if not todo[record.key]:
        print(f"== {record.key}: skipped, current (same weights, code version and activations)", flush=True)
    failed: set[str] = set()
    for asset in todo[record.key]:
        if not failed:
            failed |= ranged_runs(defs, instance, asset, [record.key], 1, stop)
    print("== analyze_sweep (the report lists it beside the trained configs)", flush=True)
    analysis = stop.execute(defs.resolve_job_def("analyze_sweep"), instance, run_config=QUIET)
    _print_results(layout, [record.key], sorted(failed))
    if not analysis.success:
        print(f"error: analyze_sweep failed: {failure_message(analysis)}", file=sys.stderr)
    print(record.key, flush=True)
    return 1 if failed or not analysis.success else 0


def _print_results(layout: Layout, keys: list[str], failed: list[str]) -> None:
    print("\nResults")
    print(f"  sweep report : {layout.location(layout.analysis_dir, 'report.md')}")
    for key in keys:
        state = "FAILED (see the run in the UI)" if key in failed else layout.location(layout.labels_dir(key),
                                                                                      "labels.parquet")
        print(f"  {key}: weights {layout.location(layout.sae_dir(key))}, labels {state}")
    print(f"  Dagster home : {os.environ['DAGSTER_HOME']}")
    print("  Open the UI  : make ui   (then http://127.0.0.1:3000)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    reg = commands.add_parser("register-sweep", help="add a sweep's configs as sae_configs partitions")
    reg.add_argument("file")
    reg.add_argument("--dry-run", action="store_true", help="print the keys without registering")
    run = commands.add_parser("run-sweep", help="register a sweep and materialise every partition + the report")
    run.add_argument("file")
    run.add_argument("--refresh-activations", action="store_true", help="re-extract even if activations exist")
    run.add_argument("--refresh", action="store_true", help="retrain partitions that are already current")
    cal = commands.add_parser("calibrate", help="run a sweep's relu configs with target_l0 and propose l1_alpha "
                              "runs until L0 is on target (in process; see the calibration sensor)")
    cal.add_argument("file")
    exp = commands.add_parser("export-neuronpedia", help="write a partition's features (and labels) in "
                              "Neuronpedia's bulk-import layout: <out dir>/<model>/<layer>-<source set>/")
    exp.add_argument("key", help="partition key (with `features` materialised)")
    exp.add_argument("out_dir")
    exp.add_argument("--model-id", help="Neuronpedia model id (default: the model's name as a slug)")
    exp.add_argument("--source-set", help="source set name without the layer (default: sae-pipeline-<key>)")
    exp.add_argument("--creator-id", help="Neuronpedia user id owning the rows (default: its seeded user)")
    imp = commands.add_parser("import-sae", help="evaluate an SAE trained elsewhere (SAELens layout: cfg.json + "
                              "sae_weights.safetensors; or a sparsify checkpoint folder) as a partition: sae "
                              "(metrics, checks, evaluations; nothing trained), features, feature_labels")
    imp.add_argument("folder")
    imp.add_argument("--name", help="the partition is imported_<name> (default: the folder's name)")
    args = parser.parse_args(argv)
    try:
        _default_dagster_home()
        if args.command == "register-sweep":
            print("\n".join(register(args.file, args.dry_run)))
            return 0
        if args.command == "export-neuronpedia":
            print(export_neuronpedia(args))
            return 0
        return run_with_stop_signals(args)
    except (ConfigError, OSError) as error:  # bad input, or a root/home that cannot be written: one line
        print(f"error: {error}", file=sys.stderr)
        return 2


def export_neuronpedia(args: argparse.Namespace) -> Path:
    """The source folder `export-neuronpedia` wrote."""
    from sae_pipeline.neuronpedia import DEFAULT_CREATOR_ID, export_partition

    layout = Layout.at(default_root())
    return export_partition(layout, validate_partition_key(args.key), Path(args.out_dir), model_id=args.model_id,
                            source_set=args.source_set, creator_id=args.creator_id or DEFAULT_CREATOR_ID)


def run_with_stop_signals(args: argparse.Namespace) -> int:
    """`run-sweep` / `calibrate` under SIGINT/SIGTERM handling: the current run is cancelled, nothing later
    starts, one line says which step stopped, what it kept and how to resume, and the exit code is 128 + the
    signal number (130 for Ctrl-C)."""
    from sae_pipeline.defs.runs import StopSignals
    from sae_pipeline.defs.stops import Stopped

    try:
        with StopSignals(Layout.at(default_root())).installed() as stop:
            if args.command == "calibrate":
                return calibrate(args.file, stop)
            if args.command == "import-sae":
                return import_partition(args.folder, args.name, stop)
            return run_sweep(args.file, args.refresh_activations, stop, refresh=args.refresh)
    except Stopped as stopped:
        given = args.folder if args.command == "import-sae" else args.file
        print(f"\n{stopped.line(f'sae-pipeline {args.command} {given}')}", file=sys.stderr, flush=True)
        return stopped.exit_code


if __name__ == "__main__":
    sys.exit(main())
