"""The web UI's server loads the workspace and its GraphQL API shows every asset and check."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED_ASSETS = {"corpus", "activations", "sae", "features", "feature_labels", "sweep_analysis"}
EXPECTED_CHECKS = {
    "activations": {"activations_finite", "activations_not_degenerate", "activations_norm_outliers",
                    "activations_duplicates"},
    "sae": {"sae_finite_weights", "sae_not_collapsed", "sae_dead_fraction", "sae_dense_fraction",
            "sae_l0_in_target_band", "sae_fvu", "sae_l0_trend"},
    "features": {"features_not_near_zero", "features_table_valid"},
}
QUERY = """
{ assetNodes { assetKey { path } jobNames
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data = json.loads(response.read())
    assert "errors" not in data, data
    return data


@contextlib.contextmanager
def running_webserver(env: dict[str, str]) -> Iterator[int]:
    """`dagster-webserver -w workspace.yaml` under `env` (its DAGSTER_HOME and storage root) on a free port,
    until the block ends; yields the port once the server answers."""
    port = _free_port()
    binary = Path(sys.executable).with_name("dagster-webserver")
    process = subprocess.Popen([str(binary), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"webserver did not start: {process.stderr.read().decode()[-2000:]}") from None
                time.sleep(1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    home = tmp_path_factory.mktemp("dagster_home")
    with running_webserver({**os.environ, "DAGSTER_HOME": str(home), "SAE_PIPELINE_ROOT": str(home / "data")}) as port:
        yield port


def test_graphql_lists_assets_and_checks(webserver: int) -> None:
    data = _graphql(webserver, QUERY)
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert set(nodes) >= EXPECTED_ASSETS
    for asset, checks in EXPECTED_CHECKS.items():
        found = {c["name"]: c for c in nodes[asset]["assetChecksOrError"]["checks"]}
        assert checks <= set(found), (asset, found)
        assert all(found[name]["blocking"] for name in checks)
    assert "train_sweep" in nodes["sae"]["jobNames"] and "ci_smoke" in nodes["sae"]["jobNames"]
