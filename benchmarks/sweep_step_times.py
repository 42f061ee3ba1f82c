"""Per-partition step durations of the `train_sweep` runs in a Dagster instance (what `make run` spent where).

    DAGSTER_HOME=data/dagster_home .venv/bin/python benchmarks/sweep_step_times.py [--step sae]

Prints one row per successful run: partition key (first..last for a ranged run), step, seconds (from the
instance's step stats).
"""

from __future__ import annotations

import argparse

import dagster as dg


def step_times(instance: dg.DagsterInstance, step: str) -> dict[str, float]:
    """Partition key -> duration of `step` in that partition's latest successful train_sweep run."""
    times: dict[str, float] = {}
    records = instance.get_run_records(dg.RunsFilter(job_name="train_sweep", statuses=[dg.DagsterRunStatus.SUCCESS]))
    for record in sorted(records, key=lambda r: r.create_timestamp):
        tags = record.dagster_run.tags
        key = tags.get("dagster/partition") or (f"{tags.get('dagster/asset_partition_range_start')}.."
                                                f"{tags.get('dagster/asset_partition_range_end')}")
        for stats in instance.get_run_step_stats(record.dagster_run.run_id):
            if stats.step_key == step and stats.end_time and stats.start_time:
                times[key] = stats.end_time - stats.start_time
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", default="sae", help="step key (sae, features, feature_labels)")
    args = parser.parse_args()
    times = step_times(dg.DagsterInstance.get(), args.step)
    for key, seconds in times.items():
        print(f"{key}\t{args.step}\t{seconds:.1f}")
    print(f"total\t{args.step}\t{sum(times.values()):.1f}")


if __name__ == "__main__":
    main()
