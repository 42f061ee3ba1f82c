"""Deployment profiles: `local` (default; in-process, SQLite, data/) and `k8s` (Dagster Helm chart + dagster-k8s).

`SAE_PIPELINE_PROFILE=k8s` makes the code location render what the K8s run launcher and `k8s_job_executor` read:
the `dagster-k8s/config` op tag on `sae` (one `nvidia.com/gpu`) and the executor config in deploy/k8s/values.yaml.
Nothing here imports dagster-k8s; definitions.py attaches `k8s_job_executor` only when the package is installed
(`pip install -e '.[k8s]'`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROFILE_ENV = "SAE_PIPELINE_PROFILE"
K8S_CONFIG_TAG = "dagster-k8s/config"
VALUES_PATH = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "values.yaml"

GPU_STEP_K8S_CONFIG: dict[str, Any] = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "16Gi"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}
"""Per-step pod settings for `sae`: one GPU (the pool `gpu` still keeps one training per GPU slot)."""

K8S_EXECUTOR_CONFIG: dict[str, Any] = {
    "job_namespace": "dagster",
    "max_concurrent": 8,
    "env_config_maps": ["sae-pipeline-env"],
    "env_secrets": ["sae-pipeline-s3"],
}
"""`k8s_job_executor` config: one pod per step; storage root and credentials come from the config map / secret."""


def profile() -> str:
    value = os.environ.get(PROFILE_ENV, "local")
    if value not in ("local", "k8s"):
        raise ValueError(f"{PROFILE_ENV}: {value!r} must be 'local' or 'k8s'")
    return value


def gpu_op_tags() -> dict[str, str]:
    """Op tags for GPU assets: the dagster-k8s/config tag under the k8s profile, none locally."""
    return {K8S_CONFIG_TAG: json.dumps(GPU_STEP_K8S_CONFIG, sort_keys=True)} if profile() == "k8s" else {}


def k8s_executor():
    """`k8s_job_executor` configured for this project, or None when dagster-k8s is not installed."""
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        return None
    return k8s_job_executor.configured(K8S_EXECUTOR_CONFIG)
