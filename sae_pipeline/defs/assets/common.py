"""What the asset modules share: each asset's code version, declarative automation, the run-config classes
(built from the specs) and the launch-time checks of a run's later steps."""

import os
from collections.abc import Mapping

import dagster as dg
import polars as pl

from sae_pipeline.config import ActivationSpec, ConfigError, CorpusSpec, FeaturesSpec, LabelsSpec
from sae_pipeline.corpus import check_source
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.defs.run_config import config_from_spec
from sae_pipeline.model import validate_layer
from sae_pipeline.spec_errors import parse_spec

DASHBOARD_DIR = "dashboard"


CODE_VERSIONS = {"corpus": "3", "activations": "3", "sae": "3", "features": "3", "feature_labels": "2"}
"""Each computing asset's code version (bump only its own when a change alters what it writes): with the data
versions upstream, it is what makes a partition stale in the UI and what `run-sweep` compares, so a change to
labelling leaves `sae` and `features` current. "2" is what every asset carried when they shared one version, so
partitions made before are still current."""


ENV_AUTOMATION = "SAE_PIPELINE_AUTOMATION"
"""`eager`: partitions are materialised by declarative automation as soon as they can be (off when unset)."""


def automation_condition(environ: Mapping[str, str] | None = None) -> dg.AutomationCondition | None:
    """`AutomationCondition.eager()` when SAE_PIPELINE_AUTOMATION=eager, so a newly registered partition (and
    one whose upstream changed) is materialised without a launch; None, no automation, when it is unset."""
    mode = (os.environ if environ is None else environ).get(ENV_AUTOMATION, "")
    if mode not in ("", "eager"):
        raise ConfigError(f"{ENV_AUTOMATION}: {mode!r}; allowed: eager, or unset (no automation)")
    return dg.AutomationCondition.eager() if mode else None


def column_schema(frame: pl.DataFrame, descriptions: Mapping[str, str]) -> dg.TableSchema:
    """The `dagster/column_schema` of a written table: its columns and polars types, described where known."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype), description=descriptions.get(name))
                                   for name, dtype in frame.schema.items()])


CorpusConfig = config_from_spec("CorpusConfig", CorpusSpec, where="corpus config",
                                check=lambda spec: check_source(spec.source))


ActivationsConfig = config_from_spec("ActivationsConfig", ActivationSpec, where="activations config",
                                     omit=("model", "trust_remote_code"))
"""The model comes from the `model` resource; the layer is checked against it when the step starts."""


FeaturesConfig = config_from_spec("FeaturesConfig", FeaturesSpec, where="features config")


LabelsConfig = config_from_spec("LabelsConfig", LabelsSpec, where="feature_labels config")
"""The LLM's endpoint, model and key come from the environment only."""


def _run_config_of(context: dg.AssetExecutionContext, asset: str) -> dict | None:
    """The raw config this run gives `asset`, or None when the run does not materialise it."""
    selection = context.dagster_run.asset_selection
    if selection and dg.AssetKey(asset) not in selection:  # empty or None: the whole job
        return None
    return context.run_config.get("ops", {}).get(asset, {}).get("config", {})


def validate_run_activations_config(context: dg.AssetExecutionContext, model: ModelResource) -> None:
    """In a run that also extracts activations, check their config (the layer above all) before the corpus is
    rewritten, so a bad value fails the run with nothing written."""
    raw = _run_config_of(context, "activations")
    if raw is None:
        return
    spec = parse_spec(ActivationSpec, {**raw, "model": model.name, "trust_remote_code": model.trust_remote_code},
                      where="activations config")
    validate_layer(spec)


DOWNSTREAM_SPECS: dict[str, type[FeaturesSpec | LabelsSpec]] = {"features": FeaturesSpec,
                                                                 "feature_labels": LabelsSpec}


def validate_downstream_config(context: dg.AssetExecutionContext, *assets: str) -> None:
    """Check the config of this run's later steps before this one computes, so a bad `features` or
    `feature_labels` value fails the run before an SAE is trained, with nothing written."""
    for asset in assets:
        raw = _run_config_of(context, asset)
        if raw is not None:
            parse_spec(DOWNSTREAM_SPECS[asset], raw, where=f"{asset} config")
