"""The run config of each step, built from its spec in `config.py`: every field is declared once, so the
launchpad's names, types, defaults and descriptions are the spec's and cannot drift from it."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import dagster as dg
from pydantic import BaseModel, Field, create_model, model_validator

from sae_pipeline.spec_errors import parse_spec


def plain_type(annotation: Any) -> Any:
    """`annotation` as a plain Dagster config type: `Int | None` becomes `int | None`, and a Literal of strings
    becomes `str`, so that a value outside it fails the run with the spec's own error (the field, the allowed
    values), as every other bad value does, not with Dagster's config-type error before the run exists; a
    variable-length tuple becomes a list."""
    origin = get_origin(annotation)
    if origin is Literal:
        return type(get_args(annotation)[0])
    if origin is tuple:  # `tuple[str, ...]`: YAML and Dagster's config have lists (the spec turns it back)
        return list[plain_type(get_args(annotation)[0])]
    if origin is Annotated:
        return plain_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return Union[tuple(plain_type(arg) for arg in get_args(annotation))]  # noqa: UP007 (built at run time)
    return annotation


def config_from_spec(name: str, spec: type[BaseModel], *, where: str, omit: Sequence[str] = (),
                     check: Callable[[Any], None] | None = None) -> type[dg.Config]:
    """A `dg.Config` class `name` with the fields of `spec` (less `omit`, which come from a resource): a run
    config is validated by the spec itself when the run is launched (`where` names it in the error), then by
    `check`."""

    def valid(config: dg.Config) -> dg.Config:
        parsed = parse_spec(spec, config.model_dump(), where=where)
        if check is not None:
            check(parsed)
        return config

    fields = {name: (plain_type(info.annotation), Field(info.default, description=info.description))
              for name, info in spec.model_fields.items() if name not in omit}
    return create_model(name, __base__=dg.Config, __doc__=spec.__doc__, __module__=__name__,
                        __validators__={"_valid": model_validator(mode="after")(valid)}, **fields)
