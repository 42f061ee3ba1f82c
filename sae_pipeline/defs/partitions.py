"""One partition per SAE configuration; keys are registered from sweep specs (see `sae-pipeline register-sweep`)."""

import dagster as dg

sae_configs = dg.DynamicPartitionsDefinition(name="sae_configs")
