"""The config registry: each partition key maps back to its full config, stored under the storage root; and the
sweep files the sensors watch."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sae_pipeline.config import ConfigError, SAEConfig, validate_partition_key
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_spec import MAX_SPEC_BYTES, SweepSpec, load_sweep

SWEEP_SUFFIX = ".sweep"
"""`configs/<sweep name>.sweep`: the keys a sweep registered, one per line (`record_sweep`)."""


def store_configs(layout: Layout, configs: list[SAEConfig], sweep: str | None = None) -> list[str]:
    """Write `configs/<key>.json` for each config (idempotent) and, for a named sweep, record that its keys
    belong to it (`record_sweep`); returns the keys in order."""
    keys = []
    for config in configs:
        key = config.partition_key()
        path = layout.configs_dir / f"{key}.json"
        payload = config.model_dump(mode="json")
        stored = layout.read_bytes(path)
        if stored is None:
            layout.write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
        elif json.loads(stored) != payload:
            raise ConfigError(f"partition key {key}: already registered with a different config "
                              f"({layout.location(layout.configs_dir, path.name)})")
        keys.append(key)
    if sweep is not None:
        record_sweep(layout, sweep, keys)
    return keys


def record_sweep(layout: Layout, sweep: str, keys: list[str]) -> None:
    """Add `keys` to the members of sweep `sweep` (a union over its registrations), so that wherever a key
    trains its sweep is known: the tracking runs' group (`sweep_of`)."""
    path = layout.configs_dir / f"{sweep}{SWEEP_SUFFIX}"
    members = set((layout.read_bytes(path) or b"").decode().split())
    if not members.issuperset(keys):
        layout.write_bytes(path, "".join(f"{key}\n" for key in sorted(members | set(keys))).encode())


def sweeps_of_keys(layout: Layout) -> dict[str, str]:
    """Each registered key -> the first sweep, by name, that registered it (keys no sweep registered are absent);
    the sweep files are read once."""
    found: dict[str, str] = {}
    for name in reversed(layout.names(layout.configs_dir, SWEEP_SUFFIX)):  # earlier names overwrite later ones
        for key in (layout.read_bytes(layout.configs_dir / name) or b"").decode().split():
            found[key] = name.removesuffix(SWEEP_SUFFIX)
    return found


def sweep_of(layout: Layout, key: str) -> str | None:
    """The first sweep, by name, that registered `key`; None for a key no sweep registered."""
    return sweeps_of_keys(layout).get(key)


def validate_configs_for_model(configs: Iterable[SAEConfig], d_model: int, where: str = "") -> None:
    """Check the width-dependent fields (k < d_sae, ...) of every config; ConfigError names the key."""
    for config in configs:
        try:
            config.validate_for_model(d_model)
        except ConfigError as error:
            raise ConfigError(f"{where}{config.partition_key()}: {error}") from None


def load_config(layout: Layout, key: str) -> SAEConfig:
    """The full config registered for a partition key."""
    name = f"{validate_partition_key(key)}.json"
    where = layout.location(layout.configs_dir, name)
    stored = layout.read_bytes(layout.configs_dir / name)
    if stored is None:
        raise ConfigError(f"partition key {key}: not registered (no {where}); a partition added by hand (the UI's "
                          "\"Add partition\") has no config: register the sweep file that defines it with "
                          "`sae-pipeline register-sweep <file>` (e.g. data/sweeps/default.yaml)")
    return parse_sae_config(json.loads(stored), where=where)


def registered_keys(layout: Layout) -> list[str]:
    return [name.removesuffix(".json") for name in layout.names(layout.configs_dir, ".json")]


def sweeps_dir(layout: Layout) -> Path:
    """Folder of sweep specs the sensors watch: `$SAE_PIPELINE_SWEEPS`, else `<storage root>/sweeps` (on
    object storage, a local copy of it refreshed on each call)."""
    if os.environ.get("SAE_PIPELINE_SWEEPS"):
        return Path(os.environ["SAE_PIPELINE_SWEEPS"])
    return layout.mirror(layout.root / "sweeps", ".yaml")


@dataclass(frozen=True)
class SweepFile:
    """A sweep spec found in the sweeps folder."""

    path: Path
    digest: str
    """sha256 of the file's bytes (the sensor's cursor compares these)."""
    spec: SweepSpec | None
    """The validated spec, or None when the file is not a valid sweep spec."""
    error: str | None
    configs: tuple[SAEConfig, ...] = ()


def read_sweep_file(path: Path) -> SweepFile:
    """One sweep file, validated; an invalid one carries its error instead of a spec."""
    path = Path(path)
    with open(path, "rb") as handle:  # bounded: load_sweep refuses anything larger
        digest = hashlib.sha256(handle.read(MAX_SPEC_BYTES + 1)).hexdigest()
    try:
        spec = load_sweep(path)
        return SweepFile(path, digest, spec, None, tuple(spec.expand()))
    except ConfigError as error:
        return SweepFile(path, digest, None, str(error))


def scan_sweeps(folder: Path) -> list[SweepFile]:
    """Every `*.yaml` in `folder`, sorted by name, validated (invalid ones carry their error)."""
    return [read_sweep_file(path) for path in (sorted(folder.glob("*.yaml")) if folder.exists() else [])]


def registered_configs(layout: Layout) -> dict[str, SAEConfig]:
    """Every registered key -> its full config."""
    return {key: load_config(layout, key) for key in registered_keys(layout)}
