"""Calibration of `l1_alpha` to a target L0 for ReLU (L1-penalised) SAEs: fit, bracket, propose. No Dagster.

Seeds 000 and 002 tuned l1_alpha by hand over 17-minute runs and interpolated linearly, once in the wrong direction.
Here the finished runs of one *base config* (every field equal except `l1_alpha`) give points (l1_alpha, L0);
L0 is the held-out `l0_fraction` (the unit of `SAEConfig.target_l0`). The proposer:

1. averages log L0 over runs that share an l1_alpha, sorts by l1_alpha and fits a monotone *decreasing* curve
   through the points in log-log (pool-adjacent-violators), so one noisy run cannot reverse the direction;
2. if two neighbouring fitted points bracket the target, interpolates linearly in log-log between them;
3. otherwise extrapolates from the nearest end point with the least-squares log-log slope of all points
   (clamped to [-5, -0.2]; -1, "L0 inversely proportional to l1_alpha", when fewer than two distinct alphas or a
   non-negative fit), moving at most one decade (10x) per proposal: far from the target the local slope is
   unknown (near L0 = 0 it is much steeper than -1), so a trust region keeps one bad slope from overshooting
   by orders of magnitude (seed 000's own rule of thumb was "log-scale adjustments of up to 10x").

Direction is right by construction: the proposal lies above every l1_alpha whose fitted L0 is above the target,
and below every l1_alpha whose fitted L0 is below it (a higher l1_alpha lowers L0).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from matplotlib.figure import Figure

from sae_pipeline.config import SAEConfig
from sae_pipeline.markdown import round_significant
from sae_pipeline.plots import figure_png
from sae_pipeline.registry import SweepFile, registered_configs, scan_sweeps, sweeps_dir
from sae_pipeline.results import finished_l0
from sae_pipeline.saes import architecture_class
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_spec import CalibrationSpec

DEFAULT_TOLERANCE = 0.10
"""Relative tolerance on L0: a run is on target when |L0 - target| <= tolerance * target."""
DEFAULT_MAX_ROUNDS = 5
"""Proposed runs per base config before the loop gives up."""
PRIOR_SLOPE = -1.0
"""d log L0 / d log l1_alpha assumed before two distinct l1_alpha values have finished."""
SLOPE_BOUNDS = (-5.0, -0.2)
"""The fitted slope is clamped into this range: always negative, never so flat that one step explodes."""
MAX_STEP = 10.0
"""Extrapolation moves l1_alpha by at most this factor per proposal (interpolation stays inside its bracket)."""
L0_FLOOR = 1e-6
"""L0 fraction used in log space for a run with no active latent (it counts as 'far below target')."""
SIGNIFICANT_DIGITS = 3
"""Proposals are rounded to this many significant digits (readable keys; no spurious precision)."""

Status = Literal["converged", "propose", "no_data"]
GroupStatus = Literal["converged", "propose", "waiting", "round_limit", "stalled", "no_data"]


@dataclass(frozen=True)
class CalibrationPoint:
    """One finished run of a base config."""

    key: str
    """Partition key of the run."""
    l1_alpha: float
    """Its L1 coefficient."""
    l0: float
    """Its held-out L0 as a fraction of d_sae (`l0_fraction`)."""


@dataclass(frozen=True)
class Proposal:
    """What the proposer concluded from a set of points."""

    status: Status
    """`converged` (a run is within tolerance), `propose` (try `l1_alpha`), `no_data` (no usable run)."""
    l1_alpha: float | None
    """The next l1_alpha to run (`propose` only), rounded to SIGNIFICANT_DIGITS."""
    reason: str
    """One sentence saying how the proposal was reached (bracket or extrapolation, from which points)."""
    slope: float | None
    """Log-log slope used (least squares, clamped), or None."""
    fitted: list[tuple[float, float]] = field(default_factory=list)
    """(l1_alpha, fitted L0) after averaging duplicates and the monotone fit, sorted by l1_alpha."""
    best: CalibrationPoint | None = None
    """The run closest to the target in log space."""


def within_tolerance(l0: float, target: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    return math.isfinite(l0) and abs(l0 - target) <= tolerance * target


def isotonic_decreasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Least-squares non-increasing fit of `values` (in order), by pool-adjacent-violators."""
    weights = list(weights) if weights is not None else [1.0] * len(values)
    blocks: list[list[float]] = []  # [weighted mean, total weight, count]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:  # a rise violates "non-increasing": pool
            mean2, w2, n2 = blocks.pop()
            mean1, w1, n1 = blocks.pop()
            blocks.append([(mean1 * w1 + mean2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [mean for mean, _, count in blocks for _ in range(count)]


def fit_slope(log_alpha: Sequence[float], log_l0: Sequence[float]) -> float | None:
    """Least-squares slope of log L0 on log l1_alpha; None with fewer than two distinct alphas."""
    n = len(log_alpha)
    if n < 2:
        return None
    mean_x, mean_y = sum(log_alpha) / n, sum(log_l0) / n
    sxx = sum((x - mean_x) ** 2 for x in log_alpha)
    if sxx <= 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(log_alpha, log_l0, strict=True)) / sxx


def _usable(points: Iterable[CalibrationPoint]) -> list[CalibrationPoint]:
    return [p for p in points if math.isfinite(p.l1_alpha) and p.l1_alpha > 0 and math.isfinite(p.l0) and p.l0 >= 0]


def propose_l1_alpha(points: Sequence[CalibrationPoint], target: float,
                     tolerance: float = DEFAULT_TOLERANCE) -> Proposal:
    """The next l1_alpha toward `target` (an L0 fraction) from finished runs of one base config."""
    if not 0 < target < 1:
        raise ValueError(f"target: {target} must be an L0 fraction in (0, 1)")
    usable = _usable(points)
    if not usable:
        return Proposal("no_data", None, "no finished run with a positive l1_alpha and a finite L0", None)
    log_target = math.log(target)
    best = min(usable, key=lambda p: (abs(math.log(max(p.l0, L0_FLOOR)) - log_target), p.key))

    by_alpha: dict[float, list[float]] = {}
    for p in usable:
        by_alpha.setdefault(p.l1_alpha, []).append(math.log(max(p.l0, L0_FLOOR)))
    alphas = sorted(by_alpha)
    log_alpha = [math.log(a) for a in alphas]
    mean_log_l0 = [sum(by_alpha[a]) / len(by_alpha[a]) for a in alphas]
    fitted_log = isotonic_decreasing(mean_log_l0, [len(by_alpha[a]) for a in alphas])
    fitted = [(a, math.exp(f)) for a, f in zip(alphas, fitted_log, strict=True)]

    raw_slope = fit_slope(log_alpha, mean_log_l0)
    slope = PRIOR_SLOPE if raw_slope is None or raw_slope >= 0 else raw_slope
    slope = min(max(slope, SLOPE_BOUNDS[0]), SLOPE_BOUNDS[1])
    if within_tolerance(best.l0, target, tolerance):
        return Proposal("converged", None, f"`{best.key}` (l1_alpha={best.l1_alpha:.4g}) has L0 {best.l0:.4g}, "
                        f"within {tolerance:.0%} of the target {target:.4g}", slope, fitted, best)

    above = [i for i, f in enumerate(fitted_log) if f > log_target]  # L0 too high: l1_alpha too low
    below = [i for i, f in enumerate(fitted_log) if f < log_target]  # L0 too low: l1_alpha too high
    if above and below and above[-1] < below[0]:
        lo, hi = above[-1], below[0]
        t = (log_target - fitted_log[lo]) / (fitted_log[hi] - fitted_log[lo])
        proposal = math.exp(log_alpha[lo] + t * (log_alpha[hi] - log_alpha[lo]))
        reason = (f"interpolated in log-log between l1_alpha={alphas[lo]:.4g} (L0 {fitted[lo][1]:.4g}) and "
                  f"l1_alpha={alphas[hi]:.4g} (L0 {fitted[hi][1]:.4g}), which bracket the target {target:.4g}")
    else:
        anchor = len(alphas) - 1 if above else 0  # all too dense: go up from the largest; all too sparse: down
        step = (log_target - fitted_log[anchor]) / slope
        step = max(min(step, math.log(MAX_STEP)), -math.log(MAX_STEP))
        proposal = math.exp(log_alpha[anchor] + step)
        source = "fitted" if raw_slope is not None and raw_slope < 0 else "prior"
        side = "above" if above else "below"
        reason = (f"every run's L0 is {side} the target {target:.4g}: extrapolated from l1_alpha="
                  f"{alphas[anchor]:.4g} (L0 {fitted[anchor][1]:.4g}) with the {source} log-log slope {slope:.3g}")
    rounded = round_significant(proposal, SIGNIFICANT_DIGITS)
    # rounding must not cross a run already known to be on the wrong side
    low_bound = max((alphas[i] for i in above), default=0.0)
    high_bound = min((alphas[i] for i in below), default=math.inf)
    if not low_bound < rounded < high_bound:
        rounded = proposal
    return Proposal("propose", rounded, reason, slope, fitted, best)


# --- base-config groups --------------------------------------------------------------------------------


LATER_FIELDS: dict[str, object] = {"hook": None}
"""SAEConfig fields added after group ids were first stored, left out of the id while at these defaults so that a
stored group keeps its id."""


def base_fields(config: SAEConfig) -> dict[str, object]:
    """Every field except l1_alpha: two configs calibrate together when these are equal."""
    return {name: value for name, value in config.model_dump(mode="json").items()
            if name != "l1_alpha" and not (name in LATER_FIELDS and value == LATER_FIELDS[name])}


def group_id(config: SAEConfig) -> str:
    """A readable, deterministic id of a config's base group, e.g. `relu_exp4_tgt5e-02_3f9a1c`."""
    digest = hashlib.sha256(json.dumps(base_fields(config), sort_keys=True).encode()).hexdigest()[:6]
    target = f"_tgt{config.target_l0:.0e}" if config.target_l0 is not None else ""
    return f"{config.architecture}_exp{config.expansion_factor}{target}_{digest}"


def calibratable(config: SAEConfig) -> bool:
    return (architecture_class(config.architecture).l1_steered and config.target_l0 is not None
            and config.l1_alpha is not None)


def with_l1_alpha(config: SAEConfig, l1_alpha: float) -> SAEConfig:
    return SAEConfig.model_validate({**config.model_dump(), "l1_alpha": l1_alpha})


@dataclass(frozen=True)
class GroupPlan:
    """The calibration state of one base config, and what to do next."""

    group: str
    target: float
    status: GroupStatus
    """`propose` (register and run `config`), `converged`, `waiting` (a run of the group is pending),
    `round_limit` (max_rounds proposed runs without reaching the target), `stalled` (the proposal is a config
    that already ran and failed), `no_data`."""
    reason: str
    proposal: Proposal
    points: list[CalibrationPoint]
    n_proposed: int
    """Runs of the group that the loop itself added (keys outside the seed keys)."""
    config: SAEConfig | None = None
    """The config to register and run (status `propose`)."""


def plan_groups(configs: Mapping[str, SAEConfig], l0_by_key: Mapping[str, float], seed_keys: Iterable[str],
                pending: Iterable[str] = (), tolerance: float = DEFAULT_TOLERANCE,
                max_rounds: int = DEFAULT_MAX_ROUNDS) -> list[GroupPlan]:
    """One plan per base group that a seed key belongs to (relu with target_l0).

    configs: every registered key -> config; l0_by_key: held-out l0_fraction of finished keys; seed_keys: the
    keys the user's sweep declared (everything else in a group counts as a proposed round); pending: registered
    keys that are queued or running (the group waits for them).
    """
    seed_keys, pending = set(seed_keys), set(pending)
    groups: dict[str, list[str]] = {}
    for key, config in configs.items():
        if calibratable(config):
            groups.setdefault(group_id(config), []).append(key)
    plans = []
    for gid in sorted({group_id(configs[k]) for k in seed_keys if k in configs and calibratable(configs[k])}):
        keys = sorted(groups[gid])
        base = configs[next(k for k in keys if k in seed_keys)]
        target = float(base.target_l0)  # type: ignore[arg-type]
        points = [CalibrationPoint(k, float(configs[k].l1_alpha), float(l0_by_key[k]))  # type: ignore[arg-type]
                  for k in keys if k in l0_by_key]
        proposal = propose_l1_alpha(points, target, tolerance)
        n_proposed = sum(1 for k in keys if k not in seed_keys)
        waiting = [k for k in keys if k in pending]
        config = None
        if proposal.status == "converged":
            status, reason = "converged", proposal.reason
        elif waiting:
            status, reason = "waiting", f"waiting for {', '.join(waiting)}"
        elif proposal.status == "no_data":
            status, reason = "no_data", proposal.reason
        elif n_proposed >= max_rounds:
            status, reason = "round_limit", (f"{n_proposed} proposed runs (limit {max_rounds}) without reaching "
                                             f"L0 {target:.4g} within {tolerance:.0%}; closest: {proposal.reason}")
        else:
            config = with_l1_alpha(base, float(proposal.l1_alpha))  # type: ignore[arg-type]
            if config.partition_key() in configs:
                status, reason, config = "stalled", (f"the proposal {config.partition_key()} is already registered "
                                                     "and has no finished run (did it fail?)"), None
            else:
                status, reason = "propose", proposal.reason
        plans.append(GroupPlan(gid, target, status, reason, proposal, points, n_proposed, config))
    return plans


# --- plot ----------------------------------------------------------------------------------------------


def calibration_png(plan: GroupPlan, tolerance: float = DEFAULT_TOLERANCE) -> bytes:
    """L0 against l1_alpha (log-log): runs, the monotone fit, the target line and band, the proposal."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.axhline(plan.target, color="C3", linestyle="--", label=f"target L0 {plan.target:.3g}")
    ax.axhspan(plan.target * (1 - tolerance), plan.target * (1 + tolerance), color="C3", alpha=0.1)
    if plan.points:
        ax.scatter([p.l1_alpha for p in plan.points], [max(p.l0, L0_FLOOR) for p in plan.points], color="C0",
                   zorder=3, label="finished runs")
        fitted = plan.proposal.fitted
        ax.plot([a for a, _ in fitted], [f for _, f in fitted], color="C0", alpha=0.6, label="monotone fit")
    if plan.proposal.l1_alpha is not None:
        ax.axvline(plan.proposal.l1_alpha, color="C2", linestyle=":",
                   label=f"proposal l1_alpha {plan.proposal.l1_alpha:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("l1_alpha")
    ax.set_ylabel("L0 (fraction of d_sae, held out)")
    ax.set_title(f"{plan.group}: {plan.status}", fontsize=9)
    ax.legend(fontsize=7)
    return figure_png(fig)


def how_to_calibrate(sweeps_folder: object) -> str:
    """What an empty calibration says: where it looks and which sweep fields make a config calibratable."""
    return ("No relu config with a target_l0 is registered from a sweep file in "
            f"`{sweeps_folder}`, so there is nothing to calibrate. The calibration reads the `*.yaml` sweep files "
            "of that folder (`SAE_PIPELINE_SWEEPS` overrides it) and needs one whose configs set "
            "`architecture: relu` and `target_l0` (held-out L0 as a fraction of d_sae, in (0, 1)), registered. "
            "For example `sae-pipeline calibrate data/sweeps/calibration_demo.yaml` registers that sweep and runs "
            "the loop; or `sae-pipeline register-sweep data/sweeps/calibration_demo.yaml`, then turn on "
            "`calibration_sensor`.")


def plans_markdown(plans: Sequence[GroupPlan]) -> str:
    """The fitted points and the proposal of each group, as markdown."""
    if not plans:
        return "No relu config with a target_l0 is registered."
    parts = []
    for plan in plans:
        rows = ["| key | l1_alpha | L0 | on target |", "|---|---|---|---|"]
        for p in sorted(plan.points, key=lambda p: p.l1_alpha):
            rows.append(f"| `{p.key}` | {p.l1_alpha:.4g} | {p.l0:.4g} | "
                        f"{'yes' if within_tolerance(p.l0, plan.target) else 'no'} |")
        nxt = f"propose l1_alpha = {plan.proposal.l1_alpha:.4g}" if plan.status == "propose" else plan.status
        parts.append(f"### {plan.group} (target L0 {plan.target:.4g}, {plan.n_proposed} proposed runs)\n\n"
                     + "\n".join(rows) + f"\n\n**{nxt}**: {plan.reason}")
    return "\n\n".join(parts)


# --- calibration state of the sweep files (registry + results) -------------------------------------------------


@dataclass(frozen=True)
class SweepCalibration:
    """The calibration plans of one sweep spec's relu configs with a target_l0."""

    sweep: SweepFile
    settings: CalibrationSpec
    """The spec's `calibration` section, or the defaults when it has none."""
    plans: list[GroupPlan]

    @property
    def enabled(self) -> bool:
        return self.sweep.spec is not None and self.sweep.spec.calibration is not None and self.settings.enabled


def calibration_state(layout: Layout, pending: Iterable[str] = (), sweeps: list[SweepFile] | None = None
                      ) -> list[SweepCalibration]:
    """Plans for every valid sweep spec (in the sweeps folder) that has a relu config with a target_l0.

    A spec's own keys are its seed runs; other registered keys of the same base config are proposed rounds.
    Only registered seed keys count (a spec not yet registered has nothing to calibrate). `sweeps`: the specs
    to look at (default: every file in the sweeps folder).
    """
    configs = registered_configs(layout)
    l0 = finished_l0(layout, list(configs))
    result = []
    for sweep in scan_sweeps(sweeps_dir(layout)) if sweeps is None else sweeps:
        seeds = [c.partition_key() for c in sweep.configs if calibratable(c) and c.partition_key() in configs]
        if sweep.spec is None or not seeds:
            continue
        settings = sweep.spec.calibration or CalibrationSpec()
        plans = plan_groups(configs, l0, seeds, pending, settings.tolerance, settings.max_rounds)
        result.append(SweepCalibration(sweep, settings, plans))
    return result
