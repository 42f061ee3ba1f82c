"""Partition keys and stored configs are pinned as computed at c29de9f, before the architecture registry.

`data/partition_keys.json` maps each key to `SAEConfig.model_dump(mode="json")`, for every config of
data/sweeps/*.yaml and a hand-made set covering every architecture and non-default fields (the `h<digest>` part):
a partition registered before the redesign must keep its key, and its stored config must still load.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from sae_pipeline.config import SAEConfig
from sae_pipeline.sweep_spec import load_sweep

PINNED: dict[str, dict] = json.loads((Path(__file__).parent / "data" / "partition_keys.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key", sorted(PINNED))
def test_stored_config_loads_with_its_key(key: str) -> None:
    config = SAEConfig.model_validate(PINNED[key])
    assert config.partition_key() == key
    dumped = config.model_dump(mode="json")
    later = {name: dumped.pop(name) for name in set(dumped) - set(PINNED[key])}  # fields added since the pin
    assert dumped == PINNED[key] and later == {"hook": None}


def test_sweep_files_keep_their_keys() -> None:
    keys = set()
    for path in sorted(glob.glob(str(ROOT / "data" / "sweeps" / "*.yaml"))):
        if Path(path).stem == "ci_run_config":  # a run config, not a sweep
            continue
        keys |= {config.partition_key() for config in load_sweep(path).expand()}
    assert keys <= set(PINNED)
    assert len(keys) >= 150
