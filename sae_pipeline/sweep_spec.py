"""Sweep files: a grid of SAE configs (`SweepSpec`) read from strict YAML (size-bounded, no aliases, no duplicate
keys), with its closed-loop calibration settings; expanded into validated `SAEConfig`s."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from sae_pipeline.config import ConfigError, Int, SAEConfig, StrictSpec, validate_name
from sae_pipeline.spec_errors import format_validation_error, parse_sae_config

MAX_SPEC_BYTES = 256 * 1024
"""Sweep files larger than this are refused before parsing (a real spec is a few hundred bytes)."""
MAX_SWEEP_CONFIGS = 10_000
"""Upper bound on the configs one sweep expands to, checked before the cross product is built."""


class CalibrationSpec(StrictSpec):
    """Settings of the calibration sensor for one sweep: propose l1_alpha runs until L0 is on target."""

    enabled: bool = True
    """Whether the calibration sensor acts on this sweep's relu configs with a `target_l0`."""
    tolerance: float = Field(0.10, gt=0.0, lt=1.0)
    """Relative tolerance: a run is on target when |L0 - target_l0| <= tolerance * target_l0."""
    max_rounds: Int = Field(5, ge=1)
    """Proposed runs per base config before the loop stops."""


class SweepSpec(StrictSpec):
    """A grid of SAE configs: `base` fields shared by all, `grid` values crossed, `points` added as they are."""

    name: str = Field(min_length=1)
    """Sweep name (shown in reports); the file-name rule of partition keys applies (see validate_name)."""
    description: str = ""
    """Free text."""
    base: dict[str, Any] = Field(default_factory=dict)
    """SAEConfig fields shared by every point."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """SAEConfig field -> values; the sweep is their cross product (over `base`)."""
    points: list[dict[str, Any]] = Field(default_factory=list)
    """Explicit extra points (each over `base`)."""
    calibration: CalibrationSpec | None = None
    """Closed-loop l1_alpha calibration of the sweep's relu configs that set `target_l0` (off when absent)."""

    @model_validator(mode="after")
    def _bounded_size(self) -> SweepSpec:
        """Count the points from the grid lengths, before any cross product is built."""
        n_grid = math.prod(len(values) for values in self.grid.values()) if self.grid else 0
        total = n_grid + len(self.points)
        if total > MAX_SWEEP_CONFIGS:
            sizes = " x ".join(f"{field} {len(values)}" for field, values in self.grid.items()) or "no grid"
            raise ValueError(f"sweep size: {total} configs (grid {sizes} = {n_grid}, plus {len(self.points)} "
                             f"points); allowed: at most {MAX_SWEEP_CONFIGS}")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        try:
            return validate_name(name, "name")
        except ConfigError as error:
            raise ValueError(str(error).removeprefix("name: ")) from None

    def expand(self) -> list[SAEConfig]:
        """All configs of the sweep, de-duplicated by key, in a stable order; ConfigError on any bad point."""
        known = set(SAEConfig.model_fields)
        for section, fields in (("base", self.base), ("grid", self.grid)):
            for field in fields:
                if field not in known:
                    raise ConfigError(f"{section}.{field}: unknown SAEConfig field; allowed: {sorted(known)}")
        for field, values in self.grid.items():
            if not values:
                raise ConfigError(f"grid.{field}: empty list; give at least one value")
        names = list(self.grid)
        combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*self.grid.values())]
        if not names:
            combos = [] if self.points else [{}]
        raw_points = [{**self.base, **combo} for combo in combos] + [{**self.base, **p} for p in self.points]
        configs: dict[str, SAEConfig] = {}
        for index, raw in enumerate(raw_points):
            config = parse_sae_config(raw, where=f"sweep {self.name!r} point {index}")
            configs.setdefault(config.partition_key(), config)
        if not configs:
            raise ConfigError(f"sweep {self.name!r}: expands to zero configs")
        return list(configs.values())


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (`*a`): a few lines of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a sweep file", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 (PyYAML's signature)
        """A key given twice in one mapping is an error naming both lines (YAML would keep the last silently)."""
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {first_line[key]} and line {line})",
                    key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_spec_yaml(path: Path) -> Any:
    """Parse a spec file: at most MAX_SPEC_BYTES, no aliases; ConfigError names the file (and the line)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path}: does not exist") from None
    if not path.is_file():  # a folder, or a device such as /dev/zero that would be read forever
        raise ConfigError(f"sweep file {path}: not a regular file")
    if size > MAX_SPEC_BYTES:
        raise ConfigError(f"sweep file {path}: {size} bytes; at most {MAX_SPEC_BYTES} bytes")
    with open(path, "rb") as handle:
        data = handle.read(MAX_SPEC_BYTES + 1)  # the file may grow between stat and read
    if len(data) > MAX_SPEC_BYTES:
        raise ConfigError(f"sweep file {path}: more than {MAX_SPEC_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"sweep file {path}, line {line}: not UTF-8 text ({error})") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {path}, line {_error_line(error, text)}: not valid YAML ({error})") from None


def _error_line(error: yaml.YAMLError, text: str) -> int:
    """1-based line of a YAML error: its mark, or for a reader error (a forbidden character) its position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(error, "position", None)
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file; ConfigError names the file and the field."""
    path = Path(path)
    validate_name(path.stem, f"sweep file {path}: file name")
    raw = read_spec_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path}: top level must be a mapping with name/base/grid/points")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        raise format_validation_error(error, f"sweep file {path}", SweepSpec) from None
    try:
        spec.expand()
    except ConfigError as error:
        raise ConfigError(f"sweep file {path}: {error}") from None
    return spec
