"""Run config checked at launch: an asset's `dg.Config` validators run when Dagster resolves the run config
(the launchpad's launch, `dagster job execute`, `execute_in_process`), so a bad value is refused before any step
starts, not 20-75 s later inside the step.

Dagster's config schema carries types but not pydantic's bounds and validators; a `configured` op with the
same schema runs a function while the run config is resolved, and that function validates the `dg.Config`.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import ValidationError

from sae_pipeline.config import ConfigError


def config_error_message(error: ValidationError) -> str:
    """`field: rule (got value)` for each error of a Config validation (a ConfigError's text as it is)."""
    parts = []
    for item in error.errors():
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            parts.append(str(cause))
            continue
        field = ".".join(str(p) for p in item["loc"]) or "(config)"
        parts.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def validated_at_launch(asset: dg.AssetsDefinition, config_class: type[dg.Config]) -> dg.AssetsDefinition:
    """`asset` whose op config is validated by `config_class` when the run config is resolved."""
    op = asset.node_def
    name = op.name

    def validate(config: dict[str, Any]) -> dict[str, Any]:
        try:
            config_class.model_validate(config)
        except ValidationError as error:
            raise dg.DagsterInvalidConfigError(
                f"Invalid run config for asset {name!r} (ops.{name}.config): {config_error_message(error)}",
                [], config) from None
        return config

    checked = op.configured(validate, name=name, config_schema=op.config_schema.as_field().config_type,
                            description=op.description)
    return dg.AssetsDefinition.dagster_internal_init(**{**asset.get_attributes_dict(), "node_def": checked})
