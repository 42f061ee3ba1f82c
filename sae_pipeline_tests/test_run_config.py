"""Each step's run config is its spec: the same fields, and the defaults the launchpad shows (Dagster's config
schema) equal the spec's, so `run-sweep`, the UI and the core read one default (the 2048/4096 split of
`max_sequences` cannot come back); a value the spec refuses is refused at launch, naming the field."""

from __future__ import annotations

import dagster as dg
import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sae_pipeline.config import ActivationSpec, ConfigError, CorpusSpec, FeaturesSpec, LabelsSpec
from sae_pipeline.defs.assets import ActivationsConfig, CorpusConfig, FeaturesConfig, LabelsConfig

PAIRS = [(CorpusConfig, CorpusSpec, set()), (ActivationsConfig, ActivationSpec, {"model", "trust_remote_code"}),
         (FeaturesConfig, FeaturesSpec, set()), (LabelsConfig, LabelsSpec, set())]


def _launchpad_defaults(config: type[dg.Config]) -> dict:
    """The default of every field as Dagster's config schema holds it (what the launchpad scaffolds)."""
    fields = config.to_config_schema().as_field().config_type.fields
    return {name: field.default_value if field.default_provided else None for name, field in fields.items()}


@pytest.mark.parametrize(("config", "spec", "from_resources"), PAIRS, ids=lambda item: getattr(item, "__name__", ""))
def test_run_config_defaults_equal_the_specs(config: type[dg.Config], spec: type[BaseModel],
                                             from_resources: set[str]) -> None:
    expected = {name: info.default for name, info in spec.model_fields.items() if name not in from_resources}
    assert PydanticUndefined not in expected.values()  # every run-config field has a default
    assert _launchpad_defaults(config) == expected
    assert config().model_dump() == expected


def test_the_corpus_default_is_one_number_everywhere() -> None:
    assert CorpusSpec().max_sequences == CorpusConfig().max_sequences == 4096  # make run's corpus


@pytest.mark.parametrize(("config", "field", "value"), [(CorpusConfig, "context_length", 4),
                                                        (ActivationsConfig, "eval_fraction", 0.95),
                                                        (FeaturesConfig, "top_n", 0),
                                                        (LabelsConfig, "labeller", "gpt")])
def test_a_value_the_spec_refuses_is_refused_at_launch_naming_the_field(config, field: str, value) -> None:
    with pytest.raises((ConfigError, ValueError), match=field):
        config(**{field: value})


def test_descriptions_are_the_specs_attribute_docstrings() -> None:
    fields = LabelsConfig.to_config_schema().as_field().config_type.fields
    assert fields["step_timeout"].description == LabelsSpec.model_fields["step_timeout"].description
    assert "labelling and scoring" in fields["step_timeout"].description
