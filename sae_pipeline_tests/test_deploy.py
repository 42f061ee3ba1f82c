"""The k8s deployment profile renders the GPU op tag and executor config that dagster-k8s reads (no cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from sae_pipeline.defs import profiles

PROBE = """
import json
from sae_pipeline.definitions import defs
sae = defs.get_assets_def("sae")
layout = defs.resources["storage"].layout
print(json.dumps({"sae": dict(sae.op.tags), "features": dict(defs.get_assets_def("features").op.tags),
                  "remote": str(layout.remote) if layout.remote else None, "local": str(layout.root)}))
"""
ENV_CONFIG_MAP = profiles.VALUES_PATH.with_name("env.yaml")


def _load_definitions(profile: str, extra_env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, profiles.PROFILE_ENV: profile, **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_k8s_profile_requests_one_gpu_for_sae_only() -> None:
    tags = _load_definitions("k8s")
    config = json.loads(tags["sae"][profiles.K8S_CONFIG_TAG])
    assert config["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert profiles.K8S_CONFIG_TAG not in tags["features"]


def test_local_profile_has_no_k8s_tags() -> None:
    assert profiles.K8S_CONFIG_TAG not in _load_definitions("local")["sae"]


def test_executor_config_and_helm_values_agree() -> None:
    values = yaml.safe_load(profiles.VALUES_PATH.read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert [m["name"] for m in launcher["envConfigMaps"]] == profiles.K8S_EXECUTOR_CONFIG["env_config_maps"]
    assert [s["name"] for s in launcher["envSecrets"]] == profiles.K8S_EXECUTOR_CONFIG["env_secrets"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "sae_pipeline.definitions"]
    assert {"name": profiles.PROFILE_ENV, "value": "k8s"} in deployment["env"]
    assert values["dagsterDaemon"]["concurrency"]["pools"]["defaultLimit"] == 1
    assert profiles.K8S_EXECUTOR_CONFIG["max_concurrent"] >= 1


def test_unknown_profile_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv(profiles.PROFILE_ENV, "cloud")
    try:
        profiles.profile()
    except ValueError as error:
        assert "cloud" in str(error)
    else:
        raise AssertionError("unknown profile accepted")


def test_k8s_config_map_puts_the_storage_root_on_object_storage() -> None:
    config_map = yaml.safe_load(ENV_CONFIG_MAP.read_text())
    assert config_map["kind"] == "ConfigMap"
    assert [config_map["metadata"]["name"]] == profiles.K8S_EXECUTOR_CONFIG["env_config_maps"]
    data = config_map["data"]
    loaded = _load_definitions("k8s", data)
    assert loaded["remote"] == data["SAE_PIPELINE_ROOT"] and loaded["remote"].startswith("s3://")
    assert loaded["local"] == data["SAE_PIPELINE_CACHE"]
