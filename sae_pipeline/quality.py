"""Pure quality checks: each reads data and returns a finding with what it measured, the threshold and the verdict.

`checks.py` names each check once (`CHECKS`) and runs them; the Dagster layer (`sae_pipeline.defs.checks`) turns
the named outcomes into asset-check results; the verdict file written
beside each partition's outputs (`quality.json`) lets downstream assets refuse a partition whose blocking checks
failed, also when they are launched in a later run. Thresholds live in `QualityThresholds`; the defaults come
from the seeds (003: L0 3-7 % for a 5 % target, dead latents < 10 %, max activation > 1e-6; 000: collapse to
"1.2 % L0, 91 % dead", judge on window means, never one step).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_pipeline.activation_scan import ActivationScan, DuplicateScan
from sae_pipeline.features import LIVE_THRESHOLD
from sae_pipeline.saes import architecture_class
from sae_pipeline.spec_errors import parse_spec
from sae_pipeline.storage import read_json, write_json_atomic

VERDICT_FILE = "quality.json"
Severity = Literal["ERROR", "WARN"]


class QualityThresholds(BaseModel):
    """Every threshold the checks use. Unknown keys are errors; each pair is ordered (warn <= error)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_zero_token_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Share of all-zero token rows above which a shard is degenerate (ERROR)."""
    max_constant_row_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Share of constant token rows (every dimension equal, zero rows included) above which a shard is degenerate."""
    outlier_norm_ratio: float = Field(10.0, gt=1.0)
    """A token whose norm exceeds this multiple of the median token norm is an outlier (attention sink, BOS)."""
    max_outlier_fraction: float = Field(0.001, ge=0.0, le=1.0)
    """Share of outlier tokens above which `activations_norm_outliers` warns."""
    collapse_live_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """Collapse: live latents fall below this fraction of their running peak and stay there (seed 000: 91 % dead)."""
    collapse_l0_fraction: float = Field(0.01, gt=0.0, lt=1.0)
    """Collapse: L0 falls below this fraction of its running peak and stays there (an L1 warmup legitimately
    lowers L0, so this bound is a 100x fall)."""
    dead_fraction_warn: float = Field(0.1, ge=0.0, le=1.0)
    """Target bound on latents that never fire on held-out tokens: WARN above (seed 003: < 10 %)."""
    dead_fraction_error: float = Field(0.9, ge=0.0, le=1.0)
    """ERROR above this dead fraction (seed 003's collapsed runs: 95-99 % dead)."""
    dense_frequency: float = Field(0.1, gt=0.0, le=1.0)
    """A latent firing on more than this share of held-out tokens is dense."""
    dense_fraction_warn: float = Field(0.05, ge=0.0, le=1.0)
    """WARN when more than this share of latents is dense."""
    dense_fraction_error: float = Field(0.5, ge=0.0, le=1.0)
    """ERROR when more than this share of latents is dense (the dictionary is not sparse)."""
    l0_warn_low: float = Field(0.6, gt=0.0, le=1.0)
    """With `target_l0` set: WARN below this multiple of the target (seed 003: 3 % for a 5 % target)."""
    l0_warn_high: float = Field(1.4, ge=1.0)
    """WARN above this multiple of the target (seed 003: 7 % for a 5 % target)."""
    l0_error_low: float = Field(0.2, gt=0.0, le=1.0)
    """ERROR below this multiple of the target (seed 003's red flag: < 1 % for a 5 % target)."""
    l0_error_high: float = Field(2.0, ge=1.0)
    """ERROR above this multiple of the target (seed 003's red flag: > 10 % for a 5 % target)."""
    fvu_warn: float = Field(0.5, gt=0.0)
    """WARN when the held-out fraction of variance unexplained is above this."""
    fvu_error: float = Field(1.0, gt=0.0)
    """ERROR above this FVU (1.0: no better than predicting the mean activation)."""
    l0_trend_window: float = Field(0.25, gt=0.0, le=0.5)
    """Share of the metrics log averaged at each end when judging the L0 trend (seed 000: window means)."""
    l0_trend_tolerance: float = Field(0.05, ge=0.0)
    """L1-trained SAEs: the last-window mean L0 may exceed the first-window mean by this relative amount at most
    (seed 003: "L0 must decrease"; it rose 11.9 % -> 15.6 % before the collapse)."""
    live_threshold: float = Field(LIVE_THRESHOLD, gt=0.0)
    """A latent whose max held-out activation is below this is not live for labelling (seed 003's 1e-16)."""
    near_zero_error_share: float = Field(0.5, ge=0.0, le=1.0)
    """ERROR when more than this share of latents is not live."""
    duplicate_row_fraction_warn: float = Field(0.01, ge=0.0, le=1.0)
    """WARN when more than this share of token rows is identical to another row (an attention-sink-like vector
    repeated at ordinary norm, or a corpus of repeated documents)."""
    duplicate_row_fraction_error: float = Field(0.1, ge=0.0, le=1.0)
    """ERROR when more than this share of token rows is identical to another row."""

    @model_validator(mode="after")
    def _ordered(self) -> QualityThresholds:
        pairs = (("dead_fraction_warn", "dead_fraction_error"), ("dense_fraction_warn", "dense_fraction_error"),
                 ("l0_error_low", "l0_warn_low"), ("l0_warn_high", "l0_error_high"), ("fvu_warn", "fvu_error"),
                 ("duplicate_row_fraction_warn", "duplicate_row_fraction_error"))
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}: {getattr(self, low)} must be <= {high} ({getattr(self, high)})")
        return self


DEFAULT_THRESHOLDS = QualityThresholds()


def parse_thresholds(raw: dict[str, Any] | None) -> QualityThresholds:
    """Thresholds from overrides; ConfigError names the field, the value and the rule."""
    return parse_spec(QualityThresholds, raw or {}, where="quality thresholds")


class _Blocking:
    """`blocks`, for anything with `passed` and `severity`."""

    passed: bool
    severity: Severity

    @property
    def blocks(self) -> bool:
        """A failed ERROR check blocks everything downstream of the partition (labelling above all)."""
        return not self.passed and self.severity == "ERROR"


@dataclass(frozen=True)
class Finding(_Blocking):
    """What a check function measured: `passed`, how bad a failure is, and the values with their thresholds."""

    passed: bool
    severity: Severity
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def named(self, name: str) -> CheckOutcome:
        return CheckOutcome(name, self.passed, self.severity, self.description, self.metadata)


@dataclass(frozen=True)
class CheckOutcome(_Blocking):
    """A finding under its check's name (from `checks.CHECKS`): what the verdict file and Dagster record."""

    name: str
    passed: bool
    severity: Severity
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _graded(value: float, warn: float, error: float, what: str, extra: dict[str, Any]) -> Finding:
    """A value that should stay at or below `warn`: WARN above it, ERROR above `error` (NaN is an ERROR)."""
    bad = not math.isfinite(value)
    severity: Severity = "ERROR" if bad or value > error else "WARN"
    passed = not bad and value <= warn
    verdict = "ok" if passed else severity
    return Finding(passed, severity, f"{what} {value:.4g} (warn > {warn:g}, error > {error:g}): {verdict}",
                        {what.replace(" ", "_"): value, "warn_above": warn, "error_above": error, **extra})


# ----------------------------------------------------------------------------------------------- activations


def activations_finite(scan: ActivationScan) -> Finding:
    """Every stored token activation is finite (a NaN/Inf row poisons training and every metric)."""
    n_bad = sum(s.n_nonfinite for s in scan.shards)
    bad_shards = {s.file: s.n_nonfinite for s in scan.shards if s.n_nonfinite}
    return Finding(n_bad == 0, "ERROR",
                        f"{n_bad} non-finite token row(s) of {scan.n_tokens}"
                        + (f" in {', '.join(sorted(bad_shards))}" if bad_shards else ""),
                        {"n_nonfinite_tokens": n_bad, "threshold": 0, "n_tokens": scan.n_tokens,
                         "nonfinite_by_shard": bad_shards})


def activations_not_degenerate(scan: ActivationScan, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
                               ) -> Finding:
    """No shard has more than the allowed share of all-zero or constant rows, and token norms vary at all."""
    bad = {}
    for s in scan.shards:
        zero, constant = s.n_zero / max(s.n_tokens, 1), s.n_constant / max(s.n_tokens, 1)
        if zero > thresholds.max_zero_token_fraction or constant > thresholds.max_constant_row_fraction:
            bad[s.file] = {"zero_fraction": zero, "constant_fraction": constant}
    stats = scan.norm_stats()
    flat = not (math.isfinite(stats["std"]) and stats["std"] > 1e-6 * abs(stats["mean"]) and stats["max"] > 0)
    n = max(scan.n_tokens, 1)
    zero_fraction = sum(s.n_zero for s in scan.shards) / n
    constant_fraction = sum(s.n_constant for s in scan.shards) / n
    passed = not bad and not flat
    description = (f"{len(bad)} degenerate shard(s); zero rows {zero_fraction:.2%}, constant rows "
                   f"{constant_fraction:.2%}; norm std {stats['std']:.4g}")
    if bad:
        description += f" (worst: {max(bad, key=lambda f: max(bad[f].values()))})"
    return Finding(passed, "ERROR", description, {
        "zero_token_fraction": zero_fraction, "max_zero_token_fraction": thresholds.max_zero_token_fraction,
        "constant_row_fraction": constant_fraction,
        "max_constant_row_fraction": thresholds.max_constant_row_fraction,
        "norm_std": stats["std"], "norms_all_equal": flat, "degenerate_shards": bad,
    })


def activations_norm_outliers(scan: ActivationScan, thresholds: QualityThresholds = DEFAULT_THRESHOLDS,
                              n_excluded: int = 0) -> Finding:
    """Record the norm statistics; count tokens with norm > N x median (attention sinks); WARN above a share."""
    stats = scan.norm_stats()
    limit = thresholds.outlier_norm_ratio * stats["median"]
    n_outliers = int((scan.norms > limit).sum()) if math.isfinite(limit) else 0
    share = n_outliers / max(scan.n_tokens, 1)
    passed = share <= thresholds.max_outlier_fraction
    return Finding(
        passed, "WARN",
        f"{n_outliers} token(s) with norm > {thresholds.outlier_norm_ratio:g} x median ({limit:.4g}): {share:.3%} "
        f"(warn > {thresholds.max_outlier_fraction:.3%}); {n_excluded} excluded at extraction",
        {"n_outlier_tokens": n_outliers, "outlier_fraction": share, "outlier_norm_ratio": thresholds.outlier_norm_ratio,
         "outlier_norm_limit": limit, "max_outlier_fraction": thresholds.max_outlier_fraction,
         "n_excluded_at_extraction": n_excluded, **{f"norm_{k}": v for k, v in stats.items()}})


def activations_duplicates(scan: ActivationScan, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
                           ) -> Finding:
    """Share of token rows identical to another row: WARN / ERROR above the thresholds; the metadata says where
    some of them are (seq_id and position in corpus.parquet)."""
    found = scan.duplicates or DuplicateScan(0, 0, [])
    share = found.n_rows / max(scan.n_tokens, 1)
    return _graded(share, thresholds.duplicate_row_fraction_warn,
                   thresholds.duplicate_row_fraction_error, "duplicate row fraction",
                   {"n_duplicate_rows": found.n_rows, "n_tokens": scan.n_tokens,
                    "largest_duplicate_group": found.largest_group, "duplicate_positions": found.examples})


# ------------------------------------------------------------------------------------------------------- sae


def finite_weights(state: dict[str, torch.Tensor]) -> Finding:
    """No NaN or Inf in any parameter of the saved SAE."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items()}
    n_bad = sum(bad.values())
    return Finding(n_bad == 0, "ERROR", f"{n_bad} non-finite weight(s)",
                        {"nonfinite_by_tensor": bad, "n_nonfinite": n_bad, "threshold": 0})


def _stays_below(values: list[float], steps: list[int], fraction: float) -> tuple[int | None, float]:
    """First step after which the series stays below `fraction` x its running peak; and that peak."""
    peak, collapsed_at = -math.inf, None
    for step, value in zip(steps, values, strict=True):
        peak = max(peak, value)
        below = value < fraction * peak
        collapsed_at = (collapsed_at if collapsed_at is not None else step) if below else None
    return collapsed_at, peak


def _never_alive(steps: list[int], live: list[float], l0: list[float]) -> tuple[int, str] | None:
    """A run that cannot have collapsed from a peak because it never had one: a NaN/Inf in the log (NaN
    training), or live latents or L0 that never rose above 0. (step, description), or None when it did."""
    for step, n_live, value in zip(steps, live, l0, strict=True):
        if not (math.isfinite(n_live) and math.isfinite(value)):
            return step, f"collapsed at step {step}: non-finite metrics (live latents {n_live}, L0 {value})"
    if max(live) <= 0 or max(l0) <= 0:
        return steps[0], (f"collapsed at step {steps[0]}: never alive (live latents peaked at {max(live):.0f}, "
                          f"L0 at {max(l0):.3g})")
    return None


def not_trained_here(severity: str) -> Finding:
    """A training-trajectory check on an imported SAE: nothing was trained here, so there is no log to judge
    (it passes, marked not applicable)."""
    return Finding(True, severity, "not applicable: an imported SAE, not trained here (no training log)",
                   {"applicable": False, "n_log_rows": 0})


def not_collapsed(metrics: pl.DataFrame, d_sae: int, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
                  ) -> Finding:
    """Collapse: live latents fall below `collapse_live_fraction` x their running peak, or L0 below
    `collapse_l0_fraction` x its running peak, and stay there to the end of the log (seed 000: "step 15,000:
    1.2 % L0, 91 % dead"). The outcome names the step where the final collapse began."""
    live_fraction, l0_fraction = thresholds.collapse_live_fraction, thresholds.collapse_l0_fraction
    if metrics.is_empty():
        return Finding(False, "ERROR", "empty metrics log: nothing to judge",
                            {"collapsed_at_step": -1, "n_log_rows": 0})
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
    never = _never_alive(steps, live, l0)
    if never is not None:
        at, description = never
    return Finding(at is None, "ERROR", description, {
        "collapsed_at_step": at if at is not None else -1,
        "final_live_latents": live[-1], "peak_live_latents": live_peak, "live_threshold_fraction": live_fraction,
        "final_l0": l0[-1], "peak_l0": l0_peak, "l0_threshold_fraction": l0_fraction,
    })


def dead_fraction(value: float, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> Finding:
    """Latents that never fire on held-out tokens: WARN above the target, ERROR above the collapse bound."""
    return _graded(value, thresholds.dead_fraction_warn, thresholds.dead_fraction_error,
                   "dead fraction", {})


def dense_fraction(frequency: torch.Tensor, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> Finding:
    """Share of latents firing on more than `dense_frequency` of held-out tokens (`frequency`: per latent)."""
    value = (frequency > thresholds.dense_frequency).double().mean().item() if frequency.numel() else math.nan
    return _graded(value, thresholds.dense_fraction_warn, thresholds.dense_fraction_error,
                   "dense fraction", {"dense_frequency": thresholds.dense_frequency,
                                      "n_dense": int((frequency > thresholds.dense_frequency).sum())})


def l0_in_target_band(l0_fraction: float, target_l0: float | None,
                      thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> Finding:
    """Held-out L0 (fraction of latents active per token) against the config's `target_l0`: WARN outside
    [warn_low, warn_high] x target, ERROR outside [error_low, error_high] x target. No target: passes."""
    if target_l0 is None:
        return Finding(True, "WARN", f"no target_l0 set; held-out L0 fraction {l0_fraction:.4g}",
                            {"l0_fraction": l0_fraction, "target_l0": "none", "applicable": False})
    warn = (thresholds.l0_warn_low * target_l0, thresholds.l0_warn_high * target_l0)
    error = (thresholds.l0_error_low * target_l0, thresholds.l0_error_high * target_l0)
    finite = math.isfinite(l0_fraction)
    ratio, eps = l0_fraction / target_l0, 1e-9  # a band edge such as 7 % of a 5 % target is inside

    def inside(low: float, high: float) -> bool:
        return finite and low * (1 - eps) <= ratio <= high * (1 + eps)

    far = not inside(thresholds.l0_error_low, thresholds.l0_error_high)
    passed = inside(thresholds.l0_warn_low, thresholds.l0_warn_high)
    severity: Severity = "ERROR" if far else "WARN"
    verdict = "ok" if passed else severity
    return Finding(passed, severity,
                        f"held-out L0 {l0_fraction:.3%} vs target {target_l0:.3%} (band {warn[0]:.2%}-{warn[1]:.2%}, "
                        f"error outside {error[0]:.2%}-{error[1]:.2%}): {verdict}",
                        {"l0_fraction": l0_fraction, "target_l0": target_l0, "warn_band": list(warn),
                         "error_band": list(error), "applicable": True})


def fvu_bound(fvu: float, thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> Finding:
    """Held-out fraction of variance unexplained: WARN above `fvu_warn`, ERROR above `fvu_error` or NaN."""
    return _graded(fvu, thresholds.fvu_warn, thresholds.fvu_error, "fvu", {})


def l0_trend(metrics: pl.DataFrame, architecture: str, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
             ) -> Finding:
    """An L1-steered SAE's L0 must fall during training: the mean L0 of the last window of log rows may not
    exceed the first window's mean by more than the tolerance (windows, not single steps: seed 000). Elsewhere
    (TopK fixes L0 at k) the check does not apply."""
    n = len(metrics)
    steered = architecture_class(architecture).l1_steered
    if not steered or n < 2:
        why = f"{n} log row(s): too few to judge" if steered else f"{architecture}'s L0 is not set by l1_alpha alone"
        return Finding(True, "WARN", f"not applicable: {why}", {"applicable": False, "n_log_rows": n})
    width = max(1, int(n * thresholds.l0_trend_window))
    l0 = metrics["l0"]
    first, last = float(l0.head(width).mean()), float(l0.tail(width).mean())
    limit = first * (1.0 + thresholds.l0_trend_tolerance)
    passed = last <= limit
    return Finding(passed, "WARN",
                        f"L0 window mean {first:.4g} (first {width} rows) -> {last:.4g} (last {width} rows): "
                        + ("falls or holds" if passed else f"rises above {limit:.4g}"),
                        {"first_window_l0": first, "last_window_l0": last, "window_rows": width,
                         "max_allowed_last_window_l0": limit, "tolerance": thresholds.l0_trend_tolerance,
                         "applicable": True})


# -------------------------------------------------------------------------------------------------- features


def features_not_near_zero(features: pl.DataFrame, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
                           ) -> Finding:
    """Latents whose max activation is below `live_threshold` are not live for labelling (seed 003's 1e-16
    activations); a partition where more than `near_zero_error_share` of latents are like that is an ERROR."""
    live_threshold, error_above = thresholds.live_threshold, thresholds.near_zero_error_share
    n = len(features)
    not_live = int((features["max_activation"] < live_threshold).sum())
    share = not_live / n if n else 1.0
    return Finding(share <= error_above, "ERROR",
                        f"{not_live}/{n} latents below {live_threshold:g} max activation ({share:.1%}; "
                        f"error > {error_above:.0%})",
                        {"n_not_live": not_live, "n_latents": n, "share_not_live": share,
                         "live_threshold": live_threshold, "error_above_share": error_above,
                         "max_of_max_activation": float(features["max_activation"].max() or 0.0)})


def _expectations():
    import great_expectations as gx

    e = gx.expectations
    return [
        e.ExpectColumnValuesToBeUnique(column="latent_id"),
        *[e.ExpectColumnValuesToNotBeNull(column=c) for c in
          ("latent_id", "frequency", "mean_activation", "max_activation", "is_live", "n_contexts")],
        e.ExpectColumnValuesToBeBetween(column="frequency", min_value=0.0, max_value=1.0),
        e.ExpectColumnValuesToBeBetween(column="mean_activation", min_value=0.0),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_activation", column_B="mean_activation",
                                                  or_equal=True),
        e.ExpectColumnValuesToBeInSet(column="live_has_contexts", value_set=[True]),
    ]


@functools.cache
def _feature_suite():
    """The ephemeral context's batch definition for a feature table and the suite, made once per process (a
    sweep validates one table per partition)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    definition = (context.data_sources.add_pandas("features").add_dataframe_asset("feature_table")
                  .add_batch_definition_whole_dataframe("all"))
    suite = gx.ExpectationSuite(name="feature_table")
    for expectation in _expectations():
        suite.add_expectation(expectation)
    return definition, suite


def features_table_valid(features: pl.DataFrame) -> Finding:
    """A Great Expectations 1.x suite over the feature table, run directly (ephemeral context, pandas frame):
    ids unique, no nulls, frequency in [0, 1], max >= mean >= 0, context windows non-empty for live latents."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    table = features.select(
        "latent_id", "frequency", "mean_activation", "max_activation", "is_live",
        n_contexts=pl.col("top_contexts").list.len(),
        live_has_contexts=~pl.col("is_live").fill_null(True)
        | (pl.col("top_contexts").list.eval(pl.element().str.len_chars() > 0).list.all()
           & (pl.col("top_contexts").list.len() > 0)).fill_null(False),
    ).to_pandas()
    definition, suite = _feature_suite()
    result = definition.get_batch(batch_parameters={"dataframe": table}).validate(suite)
    failed = {}
    for item in result.results:
        if not item.success:
            kwargs = item.expectation_config.kwargs
            label = f"{item.expectation_config.type}({kwargs.get('column') or kwargs.get('column_A', '')})"
            failed[label] = int(item.result.get("unexpected_count", 0) or 0)
    n = len(result.results)
    return Finding(bool(result.success), "ERROR",
                        f"{n - len(failed)}/{n} expectations met"
                        + (f"; failed: {', '.join(failed)}" if failed else ""),
                        {"n_expectations": n, "n_failed": len(failed), "failed_unexpected_counts": failed,
                         "n_rows": len(table), "great_expectations_version": gx.__version__})


# --------------------------------------------------------------------------------------------------- verdicts


def write_verdict(folder: Path, outcomes: list[CheckOutcome]) -> None:
    """Record the outcomes beside the partition's outputs (read by downstream assets in later runs)."""
    write_json_atomic(folder / VERDICT_FILE, {
        "blocked": any(o.blocks for o in outcomes),
        "checks": {o.name: {"passed": o.passed, "severity": o.severity, "description": o.description,
                            "metadata": o.metadata} for o in outcomes},
    })


def blocking_failures(folder: Path, missing_ok: bool = False) -> list[str]:
    """Descriptions of the failed blocking checks recorded in `folder`; a missing verdict counts as one
    unless `missing_ok`."""
    path = folder / VERDICT_FILE
    if not path.exists():
        return [] if missing_ok else [f"no quality verdict at {path}: materialise it first"]
    verdict = read_json(path)
    return [f"{name}: {check['description']}" for name, check in verdict["checks"].items()
            if not check["passed"] and check["severity"] == "ERROR"]
