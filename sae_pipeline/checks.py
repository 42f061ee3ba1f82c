"""Every data check in one table (`CHECKS`): its name, the asset it judges, what it means and how it is measured.
The Dagster check specs (`defs/checks.py`), the runs of the checks and the verdict files all come from it, so a
new check is one entry here plus its function in `quality.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
import torch

from sae_pipeline import quality
from sae_pipeline.activation_scan import ActivationScan
from sae_pipeline.quality import DEFAULT_THRESHOLDS, CheckOutcome, Finding, QualityThresholds

if TYPE_CHECKING:
    from sae_pipeline.evaluation import EvalMetrics

Asset = Literal["activations", "sae", "features"]


@dataclass(frozen=True)
class ActivationEvidence:
    """What the `activations` checks read: one scan of the written shards, and meta.json's count of tokens
    dropped at extraction as norm outliers."""

    scan: ActivationScan
    n_excluded: int


@dataclass(frozen=True)
class SAEEvidence:
    """What the `sae` checks read: the trained weights, the training log and the held-out evaluation."""

    state: dict[str, torch.Tensor]
    training_log: pl.DataFrame
    d_sae: int
    metrics: EvalMetrics
    frequency: torch.Tensor
    """[d_sae] share of held-out tokens each latent fires on."""
    target_l0: float | None
    architecture: str
    trained: bool = True
    """False for an imported SAE: the training-trajectory checks do not apply."""


@dataclass(frozen=True)
class Check:
    """One data check: its name, the asset it judges, what it means (the UI's text), and how it is measured
    from that asset's evidence (`ActivationEvidence`, `SAEEvidence` or the features table)."""

    name: str
    asset: Asset
    description: str
    measure: Callable[[Any, QualityThresholds], Finding]
    shown: str | None = None
    """The metadata entry holding the measured value that the check matrix shows beside the verdict."""


CHECKS: tuple[Check, ...] = (
    Check("activations_finite", "activations", "Every stored token activation is finite (ERROR otherwise)",
          lambda e, t: quality.activations_finite(e.scan)),
    Check("activations_not_degenerate", "activations",
          "No shard with too many all-zero or constant token rows; token norms vary (ERROR)",
          lambda e, t: quality.activations_not_degenerate(e.scan, t)),
    Check("activations_norm_outliers", "activations",
          "Norm statistics; tokens with norm > N x median counted (WARN above a share), optionally excluded",
          lambda e, t: quality.activations_norm_outliers(e.scan, t, e.n_excluded)),
    Check("activations_duplicates", "activations",
          "Token rows identical to another row: WARN > 1 %, ERROR > 10 % (positions in the metadata)",
          lambda e, t: quality.activations_duplicates(e.scan, t)),
    Check("sae_finite_weights", "sae", "No NaN/Inf in the saved weights (ERROR)",
          lambda e, t: quality.finite_weights(e.state), shown="n_nonfinite"),
    Check("sae_not_collapsed", "sae",
          "Live latents / L0 do not fall and stay far below their running peak; names the step (ERROR)",
          lambda e, t: quality.not_collapsed(e.training_log, e.d_sae, t) if e.trained
          else quality.not_trained_here("ERROR"), shown="final_live_latents"),
    Check("sae_dead_fraction", "sae", "Latents never firing on held-out tokens: WARN > 10 %, ERROR > 90 %",
          lambda e, t: quality.dead_fraction(e.metrics.dead_fraction, t), shown="dead_fraction"),
    Check("sae_dense_fraction", "sae", "Latents firing on > 10 % of held-out tokens: WARN > 5 %, ERROR > 50 %",
          lambda e, t: quality.dense_fraction(e.frequency, t), shown="dense_fraction"),
    Check("sae_l0_in_target_band", "sae",
          "Held-out L0 vs target_l0 when set: WARN outside 0.6-1.4 x target, ERROR outside 0.2-2 x",
          lambda e, t: quality.l0_in_target_band(e.metrics.l0_fraction, e.target_l0, t), shown="l0_fraction"),
    Check("sae_fvu", "sae", "Held-out fraction of variance unexplained: WARN > 0.5, ERROR > 1",
          lambda e, t: quality.fvu_bound(e.metrics.fvu, t), shown="fvu"),
    Check("sae_l0_trend", "sae", "L1-steered SAEs: last-window mean L0 must not rise above the first window's",
          lambda e, t: quality.l0_trend(e.training_log, e.architecture, t) if e.trained
          else quality.not_trained_here("WARN"), shown="last_window_l0"),
    Check("features_not_near_zero", "features",
          "Latents with max activation < 1e-6 are not live; ERROR when most latents are like that",
          lambda frame, t: quality.features_not_near_zero(frame, t), shown="share_not_live"),
    Check("features_table_valid", "features",
          "Great Expectations suite: ids unique, no nulls, frequency in [0, 1], max >= mean >= 0, contexts "
          "non-empty for live latents (ERROR)",
          lambda frame, t: quality.features_table_valid(frame), shown="n_failed"),
)
"""Every data check, once: the Dagster check specs, the runs and the verdict files all come from here."""


def checks_of(asset: Asset) -> list[Check]:
    return [check for check in CHECKS if check.asset == asset]


def merge_store_outcomes(per_store: dict[str, list[CheckOutcome]]) -> list[CheckOutcome]:
    """The `activations` checks of several hooks' stores as one outcome per check: passed when every store's
    passed, failed at the worst failing severity, each store's description and metadata under its hook. One
    store's outcomes are returned as they are."""
    if len(per_store) == 1:
        return next(iter(per_store.values()))
    merged = []
    for outcomes in zip(*per_store.values(), strict=True):
        judged = [o for o in outcomes if not o.passed] or list(outcomes)  # the failing ones decide, if any
        severity = "ERROR" if any(o.severity == "ERROR" for o in judged) else "WARN"
        merged.append(CheckOutcome(
            outcomes[0].name, all(o.passed for o in outcomes), severity,
            "; ".join(f"{hook}: {o.description}" for hook, o in zip(per_store, outcomes, strict=True)),
            {hook: o.metadata for hook, o in zip(per_store, outcomes, strict=True)}))
    return merged


def run_checks(asset: Asset, evidence: Any, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
               ) -> list[CheckOutcome]:
    """Every check of `asset` measured on its evidence, in table order, each under its name."""
    return [check.measure(evidence, thresholds).named(check.name) for check in checks_of(asset)]
