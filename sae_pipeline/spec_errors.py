"""Validating a spec into a ConfigError a user can act on: the field, the value given and the rule it broke
(`; allowed: finite, >= 0, <= 4294967295`), or the fields allowed when a key is unknown."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sae_pipeline.config import ConfigError, SAEConfig

_M = TypeVar("_M", bound=BaseModel)

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _allowed_range(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`; allowed: finite, >= 0, <= 4294967295` from a top-level field's constraints, or "" without any."""
    info = model.model_fields.get(str(loc[0])) if len(loc) == 1 else None
    if info is None:
        return ""
    rules = [f"{sign} {getattr(rule, name)}" for rule in info.metadata for name, sign in _BOUNDS
             if hasattr(rule, name)]
    if info.annotation in (float, float | None) and not model.model_config.get("allow_inf_nan", True):
        rules.insert(0, "finite")
    return f"; allowed: {', '.join(rules)}" if rules else ""


def format_validation_error(error: ValidationError, where: str, model: type[BaseModel]) -> ConfigError:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) if str(p) else repr(p) for p in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden" and len(item["loc"]) == 1:  # a misspelt or unknown field
            lines.append(f"{field}: unknown field; allowed: {', '.join(model.model_fields)}")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{field}: {item['msg']}{shown}{_allowed_range(model, item['loc'])}")
    return ConfigError(f"{where}: " + "; ".join(lines))


def parse_sae_config(raw: dict[str, Any], where: str = "config") -> SAEConfig:
    """Build an SAEConfig, turning pydantic's error into a ConfigError that names field, value and rule."""
    return parse_spec(SAEConfig, raw, where)


def parse_spec(model: type[_M], raw: dict[str, Any], where: str) -> _M:
    """Validate `raw` as any pydantic model (specs, thresholds); ConfigError names field, value and rule."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise format_validation_error(error, where, model) from None
