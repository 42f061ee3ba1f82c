"""The k8s deployment profile renders the GPU op tag and executor config that dagster-k8s reads (no cluster)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

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


# ---------------------------------------------------------------- the user-code image (deploy/Dockerfile)

REPO = profiles.VALUES_PATH.parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args(instruction: str) -> list[str]:
    return [arguments for name, arguments in _instructions() if name == instruction]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_image_copies_files_that_exist_and_the_context_keeps() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for arguments in _args("COPY"):
        *sources, _target = arguments.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is not kept in the build context"


def test_the_image_installs_the_pinned_torch_then_an_extra_that_exists_under_the_constraints() -> None:
    (run,) = [arguments for arguments in _args("RUN") if "pip install" in arguments]
    (extras,) = re.findall(r"pip install -c constraints\.txt \"\.\[([a-z0-9,]+)\]\"", run)
    assert set(extras.split(",")) <= set(_pyproject()["project"]["optional-dependencies"])
    assert "k8s" in extras.split(",")
    (version_command,) = re.findall(r"\"torch==\$\((.+?)\)\"", run)
    version = subprocess.run(["bash", "-c", version_command], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert f"torch=={version}" in _pyproject()["project"]["dependencies"]
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in run
    assert _args("ARG") == ["TORCH_VARIANT=cpu"]


def test_the_images_extra_resolves_within_constraints_txt(tmp_path) -> None:
    """`pip install --dry-run` of what the image installs (torch aside, which comes from PyTorch's index): it
    resolves, and everything it would add is pinned in constraints.txt at that version."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "-c", "constraints.txt",
                    ".[k8s]", "--report", str(report)], cwd=REPO, check=True, capture_output=True, text=True)
    pins = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
            for line in (REPO / "constraints.txt").read_text().split() if "==" in line}
    added = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
             for item in json.loads(report.read_text())["install"]}
    added.pop("sae-pipeline")
    assert {name: pins.get(name) for name in added} == added


def test_the_image_runs_the_code_server_of_the_helm_values_as_a_non_root_user() -> None:
    values = yaml.safe_load(profiles.VALUES_PATH.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    port = deployment["port"]
    (command,) = _args("CMD")
    assert json.loads(command) == ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(port),
                                   *deployment["dagsterApiGrpcArgs"]]
    assert not _args("ENTRYPOINT")  # the chart passes its command as args: an entrypoint would prefix them
    assert _args("EXPOSE") == [str(port)]
    users = _args("USER")
    assert users and users[-1] not in ("root", "0")
    assert any(f"useradd --create-home --uid 10001 {users[-1]}" in run for run in _args("RUN"))
    readme = (REPO / "deploy" / "k8s" / "README.md").read_text()
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    assert f"-t {image} ." in readme and f"docker push {image}" in readme
