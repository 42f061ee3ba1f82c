"""The web UI's server loads the workspace and its GraphQL API shows every asset and check."""

from __future__ import annotations

import pytest

from sae_pipeline_tests import webui

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


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("dagster_home")
    env = webui.checkout_env(DAGSTER_HOME=str(home), SAE_PIPELINE_ROOT=str(home / "data"))
    with webui.webserver(env, home / "webserver.log") as port:
        yield port


def test_graphql_lists_assets_and_checks(webserver: int) -> None:
    data = webui.graphql(webserver, QUERY)
    assert "errors" not in data, data
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert set(nodes) >= EXPECTED_ASSETS
    for asset, checks in EXPECTED_CHECKS.items():
        found = {c["name"]: c for c in nodes[asset]["assetChecksOrError"]["checks"]}
        assert checks <= set(found), (asset, found)
        assert all(found[name]["blocking"] for name in checks)
    assert "train_sweep" in nodes["sae"]["jobNames"] and "ci_smoke" in nodes["sae"]["jobNames"]
