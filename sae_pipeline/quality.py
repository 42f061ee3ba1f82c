"""Pure quality checks: each reads data and returns an outcome with what it measured and the threshold.

The Dagster layer turns outcomes into asset-check results; the verdict file written beside each partition's
outputs lets `feature_labels` refuse a partition whose blocking checks failed, also in a later run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch

from sae_pipeline.features import LIVE_THRESHOLD
from sae_pipeline.storage import read_json, write_json_atomic

VERDICT_FILE = "quality.json"
Severity = Literal["ERROR", "WARN"]


@dataclass(frozen=True)
class CheckOutcome:
    """Result of one check: `passed`, how bad a failure is, and the measured values with their thresholds."""

    name: str
    passed: bool
    severity: Severity
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        """A failed ERROR check blocks everything downstream of the partition (labelling above all)."""
        return not self.passed and self.severity == "ERROR"


def activations_finite(meta: dict) -> CheckOutcome:
    """Every stored token activation is finite, and the norms are not degenerate (all equal or all zero)."""
    n_bad = int(meta.get("n_nonfinite_tokens", 0))
    stats = meta["norm_stats"]
    degenerate = not (math.isfinite(stats["std"]) and stats["max"] > 0 and stats["std"] > 0)
    return CheckOutcome(
        "activations_finite", n_bad == 0 and not degenerate, "ERROR",
        f"{n_bad} non-finite token(s); norm std {stats['std']:.4g}",
        {"n_nonfinite_tokens": n_bad, "threshold_nonfinite": 0, "norm_std": stats["std"],
         "norm_mean": stats["mean"], "degenerate": degenerate},
    )


def finite_weights(state: dict[str, torch.Tensor]) -> CheckOutcome:
    """No NaN or Inf in any parameter of the saved SAE."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items()}
    n_bad = sum(bad.values())
    return CheckOutcome("sae_finite_weights", n_bad == 0, "ERROR", f"{n_bad} non-finite weight(s)",
                        {"nonfinite_by_tensor": bad, "threshold": 0})


def _stays_below(values: list[float], steps: list[int], fraction: float) -> tuple[int | None, float]:
    """First step after which the series stays below `fraction` x its running peak; and that peak."""
    peak, collapsed_at = -math.inf, None
    for step, value in zip(steps, values, strict=True):
        peak = max(peak, value)
        below = value < fraction * peak
        collapsed_at = (collapsed_at if collapsed_at is not None else step) if below else None
    return collapsed_at, peak


def not_collapsed(metrics: pl.DataFrame, d_sae: int, live_fraction: float = 0.25,
                  l0_fraction: float = 0.01) -> CheckOutcome:
    """Collapse: live latents fall below `live_fraction` x their running peak, or L0 below `l0_fraction` x
    its running peak, and stay there to the end of the log (seed 000: "step 15,000: 1.2 % L0, 91 % dead").

    L0 legitimately falls as an L1 penalty warms up, so its bound is far lower (a 100x fall) than the
    live-latent bound.
    """
    steps = metrics["step"].to_list()
    live = [(1.0 - d) * d_sae for d in metrics["dead_fraction"].to_list()]
    l0 = metrics["l0"].to_list()
    live_step, live_peak = _stays_below(live, steps, live_fraction)
    l0_step, l0_peak = _stays_below(l0, steps, l0_fraction)
    collapsed_steps = [s for s in (live_step, l0_step) if s is not None]
    at = min(collapsed_steps) if collapsed_steps else None
    description = (f"collapsed at step {at}: live latents {live[-1]:.0f} (peak {live_peak:.0f}), "
                   f"L0 {l0[-1]:.3g} (peak {l0_peak:.3g})" if at is not None else
                   f"no collapse: live latents {live[-1]:.0f} (peak {live_peak:.0f}), L0 {l0[-1]:.3g}")
    return CheckOutcome("sae_not_collapsed", at is None, "ERROR", description, {
        "collapsed_at_step": at if at is not None else -1,
        "final_live_latents": live[-1], "peak_live_latents": live_peak, "live_threshold_fraction": live_fraction,
        "final_l0": l0[-1], "peak_l0": l0_peak, "l0_threshold_fraction": l0_fraction,
    })


def dead_fraction(value: float, error_above: float = 0.9, warn_above: float = 0.1) -> CheckOutcome:
    """Latents that never fire on held-out tokens: ERROR above `error_above`, WARN above the target."""
    severity: Severity = "ERROR" if value > error_above else "WARN"
    passed = value <= warn_above
    return CheckOutcome("sae_dead_fraction", passed, severity,
                        f"dead fraction {value:.3f} (target <= {warn_above}, error > {error_above})",
                        {"dead_fraction": value, "warn_above": warn_above, "error_above": error_above})


def features_not_near_zero(features: pl.DataFrame, error_above: float = 0.5,
                           live_threshold: float = LIVE_THRESHOLD) -> CheckOutcome:
    """Latents whose max activation is below `live_threshold` are not live for labelling (seed 003's 1e-16
    activations); a partition where more than `error_above` of latents are like that is an ERROR."""
    n = len(features)
    not_live = int((features["max_activation"] < live_threshold).sum())
    share = not_live / n if n else 1.0
    return CheckOutcome("features_not_near_zero", share <= error_above, "ERROR",
                        f"{not_live}/{n} latents below {live_threshold:g} max activation ({share:.1%})",
                        {"n_not_live": not_live, "n_latents": n, "share_not_live": share,
                         "live_threshold": live_threshold, "error_above_share": error_above})


def write_verdict(folder: Path, outcomes: list[CheckOutcome]) -> None:
    """Record the outcomes beside the partition's outputs (read by downstream assets in later runs)."""
    write_json_atomic(folder / VERDICT_FILE, {
        "blocked": any(o.blocks for o in outcomes),
        "checks": {o.name: {"passed": o.passed, "severity": o.severity, "description": o.description}
                   for o in outcomes},
    })


def blocking_failures(folder: Path) -> list[str]:
    """Descriptions of the failed blocking checks recorded in `folder`; a missing verdict counts as one."""
    path = folder / VERDICT_FILE
    if not path.exists():
        return [f"no quality verdict at {path}: materialise it first"]
    verdict = read_json(path)
    return [f"{name}: {check['description']}" for name, check in verdict["checks"].items()
            if not check["passed"] and check["severity"] == "ERROR"]
