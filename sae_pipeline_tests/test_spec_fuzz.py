"""Property-based fuzzing of the sweep-spec parser and the run config (Hypothesis).

Any generated spec, of any shape and value type, is either accepted, and its configs round-trip through their
stored form to the same partition keys, or refused with a ConfigError that names a field or a line. It never
raises anything else, never takes a second (Hypothesis' deadline) and writes nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.defs.assets import ActivationsConfig, CorpusConfig
from sae_pipeline.defs.launch import config_error_message
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.sweep_spec import CalibrationSpec, SweepSpec, load_sweep

EXAMPLES = 300
"""Examples per property; benchmarks/RESULTS.md records the number tried."""
FUZZ = settings(max_examples=EXAMPLES, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])
SAE_FIELDS = sorted(SAEConfig.model_fields)
RUN_CONFIG_FIELDS = sorted({*CorpusConfig.model_fields, *ActivationsConfig.model_fields})
SPEC_FIELDS = sorted(SweepSpec.model_fields)
KNOWN_NAMES = set(SAE_FIELDS) | set(SPEC_FIELDS) | set(CalibrationSpec.model_fields)
NAMES_A_PLACE = re.compile(r"line \d+|top level|sweep size|expands to zero|\b(" + "|".join(sorted(KNOWN_NAMES))
                           + r")\b")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["topk", "relu", "jumprelu", "gated", "batchtopk",
                                                           "matryoshka", "16", "1e-3", "auto", "cosine"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
sae_fields = st.dictionaries(st.sampled_from(SAE_FIELDS) | st.text(max_size=10), values, max_size=6)
plausible = st.fixed_dictionaries({"architecture": st.sampled_from(["topk", "batchtopk", "matryoshka"]),
                                   "k": st.integers(1, 64)},
                                  optional={"expansion_factor": st.integers(1, 16), "lr": st.floats(1e-5, 1e-2),
                                            "train_tokens": st.integers(1, 10**6),
                                            "log_every": st.integers(1, 2000), "seed": st.integers(0, 99)})
plausible_specs = st.fixed_dictionaries(
    {"name": st.just("fuzz"), "base": plausible},
    optional={"grid": st.dictionaries(st.sampled_from(["k", "seed", "expansion_factor"]),
                                      st.lists(st.integers(1, 32), min_size=1, max_size=3), max_size=2),
              "points": st.lists(plausible, max_size=3)})
wild_specs = st.fixed_dictionaries(
    {"name": st.sampled_from(["fuzz", "a.b-c_1"]) | st.text(max_size=10) | values},
    optional={"base": plausible | sae_fields | values,
              "grid": st.dictionaries(st.sampled_from(SAE_FIELDS) | st.text(max_size=8),
                                      st.lists(values, max_size=3) | values, max_size=3),
              "points": st.lists(plausible | sae_fields, max_size=3) | values,
              "description": values, "calibration": values},
) | values
specs = plausible_specs | wild_specs


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_spec_file(folder: Path, text: str) -> None:
    path = folder / "fuzz.yaml"
    path.write_text(text)
    before = _files(folder)
    try:
        configs = load_sweep(path).expand()
    except ConfigError as error:
        assert NAMES_A_PLACE.search(str(error)), f"names no field or line: {error}"
        event("refused")
    else:
        event("accepted")
        for config in configs:
            stored = json.loads(json.dumps(config.model_dump(mode="json")))
            assert parse_sae_config(stored).partition_key() == config.partition_key()
    assert _files(folder) == before, "loading a spec wrote a file"


@FUZZ
@given(spec=specs)
@example(spec={"name": "fuzz", "points": [{"": None}]})  # an empty key once named no field
def test_generated_specs_are_accepted_and_round_trip_or_refused_naming_a_field(tmp_path: Path, spec: object) -> None:
    _check_spec_file(tmp_path, yaml.safe_dump(spec, allow_unicode=True))


@FUZZ
@given(lines=st.lists(st.sampled_from(["name: fuzz", "base:", "  architecture: topk", "  k: 16", "  k: '16'",
                                       "grid:", "  lr: [1e-3, 2e-3]", "points:", "  - {k: 8}", "  - *a",
                                       "base: &a {k: 4}", "- 1", "  : x", "\t", "{", "name: [", "k: 16"])
                      | st.text(max_size=20), max_size=8))
def test_generated_yaml_text_is_parsed_or_refused_naming_a_line(tmp_path: Path, lines: list[str]) -> None:
    _check_spec_file(tmp_path, "\n".join(lines))


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(RUN_CONFIG_FIELDS), values, max_size=4),
       which=st.sampled_from([CorpusConfig, ActivationsConfig]))
def test_generated_run_configs_are_accepted_or_refused_naming_a_field(raw: dict, which: type) -> None:
    """The run config of `corpus` / `activations` as the launch check validates it (defs/launch.py)."""
    raw = {key: value for key, value in raw.items() if key in which.model_fields} | (
        {} if which is CorpusConfig else {"layer": 1})
    try:
        which.model_validate(raw)
    except ValidationError as error:
        message = config_error_message(error)
        assert any(name in message for name in which.model_fields) or "(config)" in message, message
