"""Dagster layer: assets, checks, partitions, resources, jobs and schedules wired onto the core."""
