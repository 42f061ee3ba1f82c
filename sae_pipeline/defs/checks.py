"""Asset checks: specs declared on the assets (so each evaluates only its own partition) and results built
from the core's pure check outcomes. ERROR checks are blocking."""

from typing import Any

import dagster as dg

from sae_pipeline.quality import CheckOutcome


def _blocking(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)


ACTIVATIONS_CHECKS = [_blocking("activations_finite", "activations", "All activations finite, norms not degenerate")]

SAE_CHECKS = [
    _blocking("sae_finite_weights", "sae", "No NaN/Inf in the saved weights"),
    _blocking("sae_not_collapsed", "sae", "Live latents / L0 do not fall and stay far below their running peak"),
    _blocking("sae_dead_fraction", "sae", "Latents never firing on held-out tokens: ERROR > 90 %, WARN > 10 %"),
]

FEATURES_CHECKS = [_blocking("features_not_near_zero", "features",
                             "Most latents must reach max activation >= 1e-6 to be labelled")]


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    """A core check outcome as a Dagster check result; metadata carries the measurement and threshold."""
    metadata: dict[str, Any] = {"verdict": "passed" if outcome.passed else "failed", **outcome.metadata}
    return dg.AssetCheckResult(check_name=outcome.name, passed=outcome.passed,
                               severity=dg.AssetCheckSeverity[outcome.severity],
                               description=outcome.description, metadata=metadata)
